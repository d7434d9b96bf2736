"""task=evaluate on several ranks: samples split by seed, gathered through files, the rows equal a single process's;
a rank that never delivers is named after a timeout instead of hanging the others."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, compose_run, restored_environ
from launching import TIMEOUT, clean_env


def evaluate_overrides(tiny_runs, name: str, shapes_feature_weights) -> list[str]:
    """The shapes suite at 16 px on the tiny ldm checkpoint (by path), in run directory `name`."""
    return [*(o for o in tiny_runs.ldm_overrides if not o.startswith("name=")), f"name={name}", "task=evaluate",
            f"task.ckpt={tiny_runs.ldm_ckpt}", "task.progress=false", "sampling.steps=2", "eval.resolution=16",
            "eval.num_samples=7", "eval.held_out_samples=0", f"eval.feature_weights={shapes_feature_weights}"]


def launch(tiny_runs, name: str, shapes_feature_weights, ranks: int) -> subprocess.CompletedProcess:
    """main.py as one plain process, or as `ranks` processes under torchrun (RANK, WORLD_SIZE), in the same
    environment (OMP_NUM_THREADS=1: the scores' float sums run in one order in both)."""
    torchrun = [] if ranks == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    done = subprocess.run(
        [sys.executable, *torchrun, "main.py", "+experiment=shapes_txt2img",
         *evaluate_overrides(tiny_runs, name, shapes_feature_weights)],
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_two_ranks_write_the_rows_one_process_writes(tiny_runs, shapes_feature_weights):
    launch(tiny_runs, "eval_1rank", shapes_feature_weights, ranks=1)
    two = launch(tiny_runs, "eval_2ranks", shapes_feature_weights, ranks=2)  # they share work through eval/ only
    assert "rank 1: samples written; rank 0 scores them" in two.stdout

    one_dir, two_dir = (tiny_runs.root / "experiments" / name / "eval" for name in ("eval_1rank", "eval_2ranks"))
    rows = json.loads((two_dir / "metrics.json").read_text())
    assert rows == json.loads((one_dir / "metrics.json").read_text())  # every metric and protocol field
    assert [(r["n"], r["seeds"]) for r in rows] == [(7, "0..6")]
    assert (two_dir / "metrics.csv").read_text() == (one_dir / "metrics.csv").read_text()
    [one], [two] = ([torch.load(p, weights_only=True) for p in (d / "samples").iterdir()] for d in (one_dir, two_dir))
    assert torch.equal(one["images"], two["images"])  # the gathered images, in seed order; the parts removed


@pytest.mark.slow
def test_rank_zero_names_a_rank_that_never_delivers(tiny_runs, shapes_feature_weights, monkeypatch):
    from ldm.tasks import evaluate

    monkeypatch.setenv("RANK", "0")  # as torchrun sets them, for a rank 1 that never starts
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = compose_run("shapes_txt2img", [*evaluate_overrides(tiny_runs, "eval_lost_rank", shapes_feature_weights),
                                         "task.gather_timeout_s=1", "eval.num_samples=4"])
    with restored_environ(), pytest.raises(TimeoutError, match=r"^rank 1 of 2 wrote no .*\.pt\.rank1-of-2 in 1 s"):
        evaluate.run(cfg)
    samples = tiny_runs.root / "experiments" / "eval_lost_rank" / "eval" / "samples"
    assert [p.name.split(".pt.")[1] for p in samples.iterdir()] == ["rank0-of-2"]  # its share, kept for a retry
