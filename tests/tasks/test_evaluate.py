"""Evaluation: the shapes suite, task=evaluate over every checkpoint, and the eval-during-training callback."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_TXT2IMG, compose_run, restored_environ
from ldm.eval.suites import ShapesSuite, _stack
from ldm.utils.hashing import sha256_path


def test_shapes_suite_floor_is_perfect_and_a_prefix_is_scored_against_its_prompts(shapes_feature_weights):
    suite = ShapesSuite(num_samples=40, resolution=32, seed=3, feature_weights=str(shapes_feature_weights))
    floor = suite.floor()
    assert {k: floor[k] for k in floor if k.startswith("acc_")} == {
        "acc_color": 1.0, "acc_shape": 1.0, "acc_size": 1.0, "acc_position": 1.0, "acc_binding": 1.0,
        "acc_object_count": 1.0}
    assert 0 <= floor["fid_shapes"] < float("inf")
    real = _stack(suite.prompts)["image"]
    prefix = suite.score(real[:10])  # the first 10 prompts' images, as the callback samples them
    assert prefix["acc_color"] == 1.0 and prefix["acc_position"] == 1.0
    # RGB -> BGR turns red into blue and blue into red; green, white and (nearly) purple stay themselves
    swapped = suite.score(real.flip(1))
    assert swapped["acc_color"] < 0.8 and swapped["acc_shape"] == 1.0
    shifted = suite.score(real[:, :, :, list(range(8, 32)) + list(range(8))])  # objects moved 8 px left
    assert shifted["acc_position"] < 0.8
    # the floor after a transform (task=evaluate's first-stage column): a 2x2 box down-and-up blurs small shapes
    assert suite.floor(lambda x: x) == floor
    coarse = suite.floor(lambda x: torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(x, 2), scale_factor=2))
    assert coarse["acc_shape"] < 0.95 and coarse["acc_size"] == 1.0


@pytest.mark.slow
def test_eval_during_training_then_evaluate_every_checkpoint(tiny_runs, shapes_feature_weights, monkeypatch):
    from ldm.tasks import evaluate, fit

    overrides = [
        f"paths.root_dir={tiny_runs.root}", "name=ldm_eval", "first_stage_name=ae", *TINY_TXT2IMG,
        "trainer.max_steps=6", "checkpoint_every_n_steps=3", "trainer.val_check_interval=3",
        "eval.resolution=16", "eval.num_samples=6", "eval.held_out_samples=2",
        f"eval.feature_weights={shapes_feature_weights}",
    ]
    with restored_environ():
        fit.run(compose_run("shapes_txt2img", [  # TINY_TXT2IMG drops the callback (32 px suite): add it back small
            *overrides, "+callbacks.periodic_eval._target_=ldm.callbacks.periodic_eval.PeriodicEval",
            "+callbacks.periodic_eval.suite=${eval}", "+callbacks.periodic_eval.sampling=${sampling}",
            "+callbacks.periodic_eval.out_dir=${paths.run_dir}/eval",
            "+callbacks.periodic_eval.every_n_steps=3", "+callbacks.periodic_eval.num_samples=4",
            "+callbacks.periodic_eval.steps=2",
        ]))
    eval_dir = tiny_runs.root / "experiments" / "ldm_eval" / "eval"
    with open(eval_dir / "during_training.csv") as f:
        during = list(csv.DictReader(f))
    assert [int(r["step"]) for r in during] == [3, 6]
    for r in during:
        assert int(r["num_samples"]) == 4
        assert all(0.0 <= float(r[k]) <= 1.0 for k in r if k.startswith("acc_"))
        assert 0 < float(r["fid_shapes"]) < float("inf")

    eval_cfg = compose_run("shapes_txt2img", [*overrides, "task=evaluate", "task.ckpt=all", "sampling.steps=2",
                                              "task.progress=false"])
    rows = evaluate.run(eval_cfg)
    assert [r["step"] for r in rows] == [3, 6]
    assert all(r["tag"] == "euler-2-default-g3-ema-n8" for r in rows)  # 6 seen prompts + 2 held-out ones
    assert all(r["feature_extractor"].startswith("shapes-smallcnn-") and (r["weights"], r["n"], r["seeds"]) ==
               ("ema", 8, "0..7") for r in rows)  # the protocol, with every row
    assert all(0 <= r["seen_acc_color"] <= 1 and 0 <= r["held_out_acc_color"] <= 1 for r in rows)
    stored = json.loads((eval_dir / "metrics.json").read_text())
    assert [(r["step"], r["acc_color"]) for r in stored] == [(r["step"], r["acc_color"]) for r in rows]
    with open(eval_dir / "metrics.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [3, 6]
    assert (eval_dir / "metrics-euler-2-default-g3-ema-n8.png").stat().st_size > 0
    [floor] = eval_dir.glob("floor-shapes-*.json")  # one per suite protocol (here: the feature network's weights)
    assert json.loads(floor.read_text())["acc_color"] == 1.0
    # the real images through the last checkpoint's first stage: the same metrics, named by that checkpoint
    [first_stage] = eval_dir.glob(f"floor-first-stage-shapes-*-{sha256_path(rows[-1]['ckpt'])[:16]}.json")
    first_stage = json.loads(first_stage.read_text())
    assert first_stage.keys() == json.loads(floor.read_text()).keys()
    assert all(0 <= v <= 1 for k, v in first_stage.items() if "acc_" in k) and first_stage["fid_shapes"] > 0

    # a second evaluation reuses the stored samples: no checkpoint is loaded, the numbers are the same
    monkeypatch.setattr(evaluate, "load_module", lambda *a, **k: pytest.fail("samples were regenerated"))
    again = evaluate.run(eval_cfg)
    assert [r["acc_shape"] for r in again] == [r["acc_shape"] for r in rows]
    # scored as stored (8-bit) the first time too: the same FID, not one from float images and one from 8-bit
    assert [r["fid_shapes"] for r in again] == [r["fid_shapes"] for r in rows]
    assert torch.isfinite(torch.tensor([r["fid_shapes"] for r in again])).all()


def test_first_stage_floor_script_scores_real_images_through_each_autoencoder(tiny_runs, shapes_feature_weights,
                                                                             tmp_path):
    import subprocess
    import sys

    ae = tiny_runs.root / "experiments" / "ae" / "checkpoints" / "last.ckpt"  # 4 steps: it keeps little of an image
    out = tmp_path / "floors.json"
    script = Path(__file__).parents[2] / "scripts" / "first_stage_floor.py"
    done = subprocess.run([sys.executable, str(script), "shapes_txt2img", str(ae), str(tiny_runs.ldm_ckpt),
                           "--json", str(out), "--set", "eval.resolution=16", "eval.num_samples=12",
                           "eval.held_out_samples=4", f"eval.feature_weights={shapes_feature_weights}"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    floors = json.loads(out.read_text())
    assert list(floors) == [str(ae), str(tiny_runs.ldm_ckpt), "real images"] and "first stage" in done.stdout
    assert floors["real images"]["held_out_acc_color"] == 1.0 and floors["real images"]["acc_shape"] == 1.0
    # the diffusion checkpoint carries the same first stage: the same numbers; an untrained one loses the shapes
    assert floors[str(ae)] == floors[str(tiny_runs.ldm_ckpt)]
    assert floors[str(ae)]["acc_binding"] < 0.5 and floors[str(ae)]["fid_shapes"] > floors["real images"]["fid_shapes"]
    typo = subprocess.run([sys.executable, str(script), "shapes_txt2img_dti", str(ae)], capture_output=True, text=True,
                          timeout=120)
    assert typo.returncode != 0 and "shapes_txt2img_dti" in typo.stderr and "Traceback" not in typo.stderr


@pytest.mark.slow
def test_evaluate_against_a_reference_folder_writes_metrics_and_protocol(tiny_runs, inception_weights_file, tiny_clip,
                                                                       tmp_path):
    """eval=reference on a rehearsal set: built-in shapes exported as PNGs, a prompts file, a random Inception file."""
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "eval"))
    from ldm.tasks import evaluate
    from reference_sets import shapes_images, write_folder, write_prompts

    reference = write_folder(shapes_images(8, resolution=16), tmp_path / "reference")
    overrides = [  # its own run directory (the shared `ldm` run is copied by other tests): the ldm checkpoint by path
        *(o for o in tiny_runs.ldm_overrides if not o.startswith("name=")), "name=ldm_reference_eval",
        "task=evaluate", f"task.ckpt={tiny_runs.ldm_ckpt}", "task.progress=false", "sampling.steps=2",
        "eval=reference", f"eval.prompts_file={write_prompts(tmp_path / 'prompts.txt', 6)}",
        f"eval.reference_dir={reference}", "eval.num_samples=6", "eval.resolution=16",
        f"eval.inception.weights_path={inception_weights_file}", f"eval.clip.model_name={tiny_clip}",
        "eval.clip.pretrained=null", "eval.kid_subsets=5", "eval.is_splits=2", f"eval.stats_dir={tmp_path / 'stats'}",
    ]
    [row] = evaluate.run(compose_run("shapes_txt2img", overrides))
    assert row["suite"] == "reference" and row["step"] == tiny_runs.ldm_steps
    assert all(np.isfinite(row[k]) for k in ("fid", "kid", "kid_std", "is", "is_std", "clip_score"))
    assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1 and row["fid"] > 0
    assert (row["ckpt_sha256"], row["weights"], row["sampler"], row["steps"], row["seeds"], row["n"]) == (
        sha256_path(tiny_runs.ldm_ckpt), "ema", "euler", 2, "0..5", 6)
    assert row["resize"] == "clean-pil-bicubic-299" and row["feature_extractor"].startswith("inception-v3-2048-")
    assert row["extractor_clip"] == f"{tiny_clip}/None" and row["n_reference"] == 8
    assert len(list((tmp_path / "stats").glob("reference-*.npz"))) == 1  # computed once, cached

    eval_dir = tiny_runs.root / "experiments" / "ldm_reference_eval" / "eval"
    assert json.loads((eval_dir / "metrics.json").read_text()) == [row]
    with open(eval_dir / "metrics.csv") as f:
        [csv_row] = list(csv.DictReader(f))
    assert csv_row["ckpt_sha256"] == row["ckpt_sha256"] and float(csv_row["fid"]) == pytest.approx(row["fid"])
    [floor] = eval_dir.glob("floor-reference-*.json")  # two disjoint halves of the reference set
    assert set(json.loads(floor.read_text())) == {"fid", "kid", "kid_std", "precision", "recall"}
