"""task=fit end to end (main.py subprocesses, tiny autoencoder): re-running resumes, resume=false refuses to
start over, a SIGKILL leaves a loadable last.ckpt, the config travels with the run, the loss goes down."""
import csv
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, TINY_AE, run_main
from ldm.models.first_stage import load_first_stage
from ldm.utils.checkpoint import read_checkpoint

N = 16  # steps of the first run; the re-run goes to 2N


def command(root: Path, name: str, *overrides: str) -> list[str]:
    return ["+experiment=shapes_autoencoder", f"name={name}", f"paths.root_dir={root}", *TINY_AE, "callbacks=none",
            "trainer.log_every_n_steps=1", f"trainer.val_check_interval={N}", *overrides]


def metrics(run_dir: Path, version: int) -> list[dict]:
    with open(run_dir / "logs" / "csv" / f"version_{version}" / "metrics.csv") as f:
        return list(csv.DictReader(f))


@dataclass
class Resumed:
    run_dir: Path
    first: subprocess.CompletedProcess
    second: subprocess.CompletedProcess
    args: list[str]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory) -> Resumed:
    """`fit` for N steps, then the same command with max_steps=2N."""
    root = tmp_path_factory.mktemp("resume")
    args = command(root, "ae", f"checkpoint_every_n_steps={N}")
    first = run_main(*args, f"trainer.max_steps={N}")
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_main(*args, f"trainer.max_steps={2 * N}")
    assert second.returncode == 0, second.stderr[-3000:]
    return Resumed(root / "experiments" / "ae", first, second, args)


@pytest.mark.slow
def test_run_dir_holds_config_and_checkpoints(resumed):
    assert "Resuming from" not in resumed.first.stdout
    config = OmegaConf.load(resumed.run_dir / "config.yaml")
    assert config.name == "ae" and config.model.net.ch == 8 and config.trainer.max_steps == 2 * N  # the latest run's
    first = read_checkpoint(resumed.run_dir / "checkpoints" / f"step-{N:08d}.ckpt")
    assert first["global_step"] == N
    stored = first["ldm_config"]  # the resolved config, inside the checkpoint
    assert stored["model"]["net"]["ch"] == 8 and stored["trainer"]["max_steps"] == N
    assert stored["paths"]["run_dir"] == str(resumed.run_dir)


@pytest.mark.slow
def test_rerun_continues_from_the_last_checkpoint(resumed):
    last = resumed.run_dir / "checkpoints" / "last.ckpt"
    assert f"Resuming from {last}" in resumed.second.stdout
    ckpt = read_checkpoint(last)
    assert ckpt["global_step"] == 2 * N
    assert int(ckpt["optimizer_states"][0]["state"][0]["step"]) == 2 * N  # Adam's moments continued, not restarted
    assert ckpt["ldm_config"]["trainer"]["max_steps"] == 2 * N
    steps = [[int(row["step"]) for row in metrics(resumed.run_dir, v) if row.get("train/rec")] for v in (0, 1)]
    assert steps == [list(range(N)), list(range(N, 2 * N))]  # the second run's log starts at step N
    assert load_first_stage(last).encode(torch.zeros(1, 3, 16, 16)).mean.shape == (1, 4, 8, 8)


@pytest.mark.slow
def test_reconstruction_loss_drops(resumed):
    rec = [float(row["train/rec"]) for v in (0, 1) for row in metrics(resumed.run_dir, v) if row.get("train/rec")]
    early, late = sum(rec[:5]) / 5, sum(rec[-5:]) / 5
    assert late < 0.7 * early, (early, late)


@pytest.mark.slow
def test_resume_false_refuses_to_start_over(resumed):
    last = resumed.run_dir / "checkpoints" / "last.ckpt"
    before = last.read_bytes(), last.stat().st_mtime_ns
    result = run_main(*resumed.args, f"trainer.max_steps={3 * N}", "resume=false")
    assert result.returncode == 2
    assert "error: resume=false" in result.stderr and "Nothing is deleted" in result.stderr
    assert "Traceback" not in result.stderr
    assert (last.read_bytes(), last.stat().st_mtime_ns) == before


@pytest.mark.slow
def test_sigkill_during_training_leaves_a_loadable_checkpoint(tmp_path):
    args = command(tmp_path, "killed", "checkpoint_every_n_steps=1", "trainer.max_steps=100000")
    child = subprocess.Popen([sys.executable, "main.py", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "experiments" / "killed" / "checkpoints"
    try:
        deadline = time.monotonic() + 300
        while not (checkpoints / "last.ckpt").exists():
            assert child.poll() is None and time.monotonic() < deadline, "training ended before a checkpoint"
            time.sleep(0.05)
        time.sleep(0.3)  # a checkpoint per step: the kill lands mid-training, likely mid-write
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    ckpt = read_checkpoint(checkpoints / "last.ckpt")
    assert ckpt["global_step"] >= 1 and "ldm_config" in ckpt
    assert load_first_stage(checkpoints / "last.ckpt").decode(torch.zeros(1, 4, 8, 8)).shape == (1, 3, 16, 16)
    assert (checkpoints / f"step-{ckpt['global_step']:08d}.ckpt").exists()


@pytest.mark.slow
def test_final_step_is_checkpointed_and_a_finished_run_is_not_retrained(tmp_path):
    """max_steps not a multiple of the checkpoint interval: the last steps are saved, and re-running the same
    command trains nothing and rewrites no checkpoint."""
    args = command(tmp_path, "ae", "checkpoint_every_n_steps=4", "trainer.max_steps=6")
    assert run_main(*args).returncode == 0
    ckdir = tmp_path / "experiments" / "ae" / "checkpoints"
    assert read_checkpoint(ckdir / "last.ckpt")["global_step"] == 6
    assert (ckdir / "step-00000006.ckpt").is_file()
    before = {p.name: p.stat().st_mtime_ns for p in ckdir.iterdir()}
    again = run_main(*args)
    assert again.returncode == 0 and "Resuming from" in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in ckdir.iterdir()} == before
