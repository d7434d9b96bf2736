"""Honest resume: optimisation changes take effect and are recorded, model/data changes are refused, a checkpoint
cannot run code, and temp files of an interrupted write are cleaned up."""
import hashlib
import shutil

import pytest
import torch
import yaml

from conftest import compose_run, restored_environ
from ldm.utils.errors import ConfigError


def _copy_run(tiny_runs, name: str) -> tuple[list[str], object]:
    """A copy of the tiny txt2img run under `name` (12 steps done); the overrides that address it."""
    src = tiny_runs.root / "experiments" / "ldm"
    dst = tiny_runs.root / "experiments" / name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("lock"))
    return [o for o in tiny_runs.ldm_overrides if not o.startswith("name=")] + [f"name={name}"], dst


def _fit(overrides):
    from ldm.tasks import fit

    with restored_environ():
        return fit.run(compose_run("shapes_txt2img", overrides))


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_a_new_learning_rate_takes_effect_on_resume_and_is_recorded(tiny_runs):
    overrides, run_dir = _copy_run(tiny_runs, "ldm_new_lr")
    old_lr = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["optimizer"]["lr"]
    trainer = _fit([*overrides, "model.optimizer.lr=5e-4", f"trainer.max_steps={tiny_runs.ldm_steps + 1}"])
    assert old_lr != 5e-4 and trainer.global_step == tiny_runs.ldm_steps + 1
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.base_lrs == [5e-4]  # not the checkpoint's
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(5e-4)  # constant schedule, no warm-up
    [entry] = yaml.safe_load((run_dir / "config_history.yaml").read_text())
    assert entry["changes"]["model.optimizer.lr"] == {"old": old_lr, "new": 5e-4}
    assert entry["resumed_from"].endswith("last.ckpt")
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["optimizer"]["lr"] == 5e-4


@pytest.mark.slow
@pytest.mark.parametrize("change", ["model.backbone.model_channels=48", "data.scale=global_std", "seed=3"])
def test_resuming_another_model_or_data_is_refused_and_the_checkpoint_is_untouched(tiny_runs, change):
    overrides, run_dir = _copy_run(tiny_runs, f"ldm_refused_{change.split('=')[0].replace('.', '_')}")
    before = _sha(run_dir / "checkpoints" / "last.ckpt")
    with pytest.raises(ConfigError, match=f"{change.split('=')[0]}: .* -> .*another run.*resume_force=true"):
        _fit([*overrides, change, f"trainer.max_steps={tiny_runs.ldm_steps + 1}"])
    assert _sha(run_dir / "checkpoints" / "last.ckpt") == before
    assert not (run_dir / "config_history.yaml").exists()


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.mark.slow
def test_a_pickle_payload_in_the_resumed_checkpoint_runs_nothing(tiny_runs, tmp_path):
    overrides, run_dir = _copy_run(tiny_runs, "ldm_payload")
    last = run_dir / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    marker = tmp_path / "MARKER"
    torch.save({**checkpoint, "callbacks": {"x": _Payload(marker)}}, last)
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        _fit([*overrides, f"trainer.max_steps={tiny_runs.ldm_steps + 1}"])
    assert not marker.exists()


@pytest.mark.slow
def test_temp_files_of_a_killed_write_are_removed_on_the_next_start(tiny_runs):
    overrides, run_dir = _copy_run(tiny_runs, "ldm_temp_files")
    left = [run_dir / "checkpoints" / ".last.ckpt.tmp-0123abcd", run_dir / ".config.yaml.tmp-4567"]
    for path in left:
        path.write_bytes(b"half a checkpoint")
    _fit([*overrides, f"trainer.max_steps={tiny_runs.ldm_steps + 1}"])
    assert not any(p.exists() for p in left)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_evaluation_reuses_samples_by_checkpoint_content_and_settings_not_by_file_name(tiny_runs,
                                                                                        shapes_feature_weights):
    """last.ckpt overwritten by a later step with the same size and mtime: the old key (name, size, mtime) reused
    the earlier step's samples; the content hash does not."""
    import os

    from ldm.tasks import evaluate

    overrides, run_dir = _copy_run(tiny_runs, "ldm_eval_key")
    last = run_dir / "checkpoints" / "last.ckpt"
    evaluation = [*overrides, "task=evaluate", "sampling.steps=2", "task.progress=false", "eval.resolution=16",
                  "eval.num_samples=4", "eval.held_out_samples=0", f"eval.feature_weights={shapes_feature_weights}"]

    def evaluate_last(*extra):
        with restored_environ():
            return evaluate.run(compose_run("shapes_txt2img", [*evaluation, *extra]))

    checkpoint = torch.load(last, weights_only=True)
    torch.save(checkpoint, last)  # re-saved as the modified copy below will be, so both have the same size
    [first] = evaluate_last()
    assert first["step"] == tiny_runs.ldm_steps
    stat = last.stat()  # other weights, same structure below: same size on disk
    for tensor in checkpoint["state_dict"].values():
        if tensor.is_floating_point():
            tensor.mul_(1.01)  # in place: shared storages stay shared
    checkpoint["global_step"] = tiny_runs.ldm_steps + 50
    torch.save(checkpoint, last)
    assert last.stat().st_size == stat.st_size  # same name and size: the old key could not tell them apart
    os.utime(last, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ... nor with the same mtime
    [second] = evaluate_last()
    assert second["step"] == tiny_runs.ldm_steps + 50  # new weights: sampled again
    [third] = evaluate_last("sampling.guidance_scale=1.5")  # new settings: sampled again, another row
    assert len(list((run_dir / "eval" / "samples").glob("*.pt"))) == 3 and third["tag"] != second["tag"]


def test_a_run_copied_to_another_root_dir_is_not_another_run():
    from ldm.utils.resume_config import config_changes, identity_changes

    old = {"paths": {"root_dir": "."}, "data": {"train_path": "./data/latents/ae/train"}, "model": {"lr": 1.0}}
    new = {"paths": {"root_dir": "/scratch/me"}, "data": {"train_path": "/scratch/me/data/latents/ae/train"},
           "model": {"lr": 1.0}}
    changes = config_changes(old, new)
    assert set(changes) <= {"paths.root_dir"} and identity_changes(changes) == []  # the stored paths moved with it
    moved_data = {**new, "data": {"train_path": "/scratch/me/data/latents/other/train"}}
    assert identity_changes(config_changes(old, moved_data)) == ["data.train_path"]
