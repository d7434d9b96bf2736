"""task.sweep: FID vs NFE per sampler and FID vs prompt alignment over guidance, as CSV and PNG, each setting's
samples cached like any evaluation's."""
import csv
import json

import pytest

from conftest import compose_run, restored_environ
from ldm.utils.errors import ConfigError


def read_csv(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_sampler_and_guidance_sweeps_write_tables_and_plots(tiny_runs, shapes_feature_weights):
    from ldm.tasks import evaluate

    base = [*(o for o in tiny_runs.ldm_overrides if not o.startswith("name=")), "name=eval_sweeps", "task=evaluate",
            f"task.ckpt={tiny_runs.ldm_ckpt}", "task.progress=false", "eval.resolution=16", "eval.num_samples=4", "eval.held_out_samples=0",
            f"eval.feature_weights={shapes_feature_weights}", "sampling.guidance_scale=3"]
    eval_dir = tiny_runs.root / "experiments" / "eval_sweeps" / "eval"
    with restored_environ():
        rows = evaluate.run(compose_run("shapes_txt2img", [
            *base, "task.sweep=samplers", "task.sweep_samplers=[heun,euler]", "task.sweep_steps=[2,1]"]))
    points = read_csv(eval_dir / "sweep-samplers-shapes.csv")
    # NFE: Euler 1 per step, Heun 2 per step but 1 on the last; x2 for the guided (cond + uncond) evaluations
    assert [(p["sampler"], int(p["steps"]), int(p["nfe"])) for p in points] == [
        ("euler", 1, 2), ("euler", 2, 4), ("heun", 1, 2), ("heun", 2, 6)]
    fid = {(r["sampler"], r["steps"]): r["fid_shapes"] for r in rows}
    assert all(float(p["fid_shapes"]) == pytest.approx(fid[p["sampler"], int(p["steps"])], rel=1e-12) for p in points)
    assert fid["heun", 1] == fid["euler", 1]  # Heun's last step (to sigma = 0) is an Euler step: one step, same images
    assert len({fid["euler", 1], fid["euler", 2], fid["heun", 2]}) == 3
    stored = json.loads((eval_dir / "metrics.json").read_text())
    assert sorted(r["tag"] for r in stored) == sorted(r["tag"] for r in rows)  # each setting its row
    assert (eval_dir / "sweep-samplers-shapes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((eval_dir / "samples").iterdir())) == 4

    with restored_environ():
        rows = evaluate.run(compose_run("shapes_txt2img", [
            *base, "sampling.steps=2", "task.sweep=guidance", "task.sweep_guidance=[3,1]"]))
    assert len(list((eval_dir / "samples").iterdir())) == 5  # euler, 2 steps, g=3 was drawn by the sampler sweep
    points = read_csv(eval_dir / "sweep-guidance-shapes.csv")
    assert [(float(p["guidance_scale"]), int(p["nfe"])) for p in points] == [(1.0, 2), (3.0, 4)]
    by_scale = {r["guidance_scale"]: r for r in rows}
    for p in points:  # the suite's alignment metric (shapes: every attribute right) against its FID
        r = by_scale[float(p["guidance_scale"])]
        assert (float(p["acc_binding"]), float(p["fid_shapes"])) == pytest.approx((r["acc_binding"], r["fid_shapes"]))
    assert by_scale[3.0]["fid_shapes"] == fid["euler", 2]  # the cached samples, scored again: the same number
    assert (eval_dir / "sweep-guidance-shapes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(json.loads((eval_dir / "metrics.json").read_text())) == 5


def test_an_unknown_sweep_or_a_sweep_over_every_checkpoint_is_refused(tmp_path):
    from ldm.tasks import evaluate

    cfg = compose_run("shapes_txt2img", [f"paths.root_dir={tmp_path}", "task=evaluate", "task.sweep=steps"])
    with pytest.raises(ConfigError, match="unknown task.sweep 'steps': none | samplers | guidance"):
        evaluate.run(cfg)
