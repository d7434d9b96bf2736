"""The rehearsal of the txt2img path at CI size (scripts/rehearsal/run.py; `make rehearsal` runs it full size):
img2dataset shards with bad members -> 2-process cache -> 2-rank DDP fit killed and resumed -> sample ->
evaluate (eval=reference)."""
import importlib.util

import pytest

from conftest import ROOT


def _script(name: str):
    """A module of scripts/rehearsal/ (a script folder, not a package), loaded from its file."""
    spec = importlib.util.spec_from_file_location(f"rehearsal_{name}", ROOT / "scripts" / "rehearsal" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rehearsal = _script("run")  # puts its own folder on sys.path for inputs.py and weights.py


@pytest.mark.slow
def test_rehearsal_at_ci_size(tmp_path):
    size = rehearsal.SIZES["ci"]
    report = rehearsal.rehearse(tmp_path, size)  # each step's own checks have passed

    manifest = report["cache"]["manifest"]
    assert manifest["skipped"]["reasons"] == {"undecodable image": 1, "not an image": 1, "missing caption": 1,
                                              "below min_size": 1}
    assert manifest["num_samples"] == size.shards * size.per_shard - len(rehearsal.inputs.CORRUPT)
    assert any("written" in log and "skipped" in log for log in report["cache"]["logs"])
    assert 0 < report["fit"]["killed_at"] < size.steps
    assert sorted(p.name for p in (tmp_path / "experiments" / "txt2img" / "checkpoints").glob("step-*.ckpt")) == [
        f"step-{s:08d}.ckpt" for s in range(size.checkpoint_every, size.steps + 1, size.checkpoint_every)]
    assert (report["samples"] / "grid.png").is_file()
    row = report["metrics"]  # eval=reference: 4 samples against 8 held-out scenes, local random Inception
    assert row["suite"] == "reference" and row["n_reference"] == 8 and row["extractor_clip"] == "none"
    assert all(row[k] >= 0 for k in ("fid", "kid", "precision", "recall")) and row["is"] >= 1.0 - 1e-6
