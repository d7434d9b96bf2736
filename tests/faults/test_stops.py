"""Stops: a signal saves at the next optimizer-step boundary and exits 128 + signal; no rank of a DDP job hangs;
re-running the same command resumes where the stop left off."""
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from conftest import ROOT, TINY_AE
from launching import clean_env, ddp_fit, step, wait_until

HANG_S = 120  # a stop that takes longer than this is a hang


def _last_step(run_dir) -> int:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]


def _started(log) -> bool:
    return "[fit] fresh start" in log.read_text() or "[fit] Resuming" in log.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_checkpoints_and_exits_nonzero_then_the_rerun_resumes(tmp_path, signum):
    args = [sys.executable, "main.py", "+experiment=shapes_autoencoder", f"paths.root_dir={tmp_path}", *TINY_AE,
            "callbacks=none", "checkpoint_every_n_steps=1000000"]
    log = tmp_path / "fit.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([*args, "trainer.max_steps=100000"], cwd=ROOT, env=clean_env(), stdout=out,
                                stderr=subprocess.STDOUT)
    wait_until(lambda: _started(log), proc, log)
    time.sleep(1.0)  # a few steps in
    proc.send_signal(signum)
    assert proc.wait(HANG_S) == 128 + signum, log.read_text()[-2000:]
    assert f"stopped by {signal.Signals(signum).name}" in log.read_text()
    run_dir = tmp_path / "experiments" / "shapes_autoencoder"
    stopped_at = _last_step(run_dir)
    assert stopped_at >= 1 and (run_dir / "checkpoints" / f"step-{stopped_at:08d}.ckpt").is_file()

    rerun = subprocess.run([*args, f"trainer.max_steps={stopped_at + 2}"], cwd=ROOT, env=clean_env(),
                           capture_output=True, text=True, timeout=HANG_S)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"at step {stopped_at}" in rerun.stdout and _last_step(run_dir) == stopped_at + 2


def _two_ranks_training(tiny_runs, name: str, probe, log) -> subprocess.Popen:
    """`main.py` fitting on 2 gloo ranks (Lightning's launcher) without end, returned once both have taken 2 steps."""
    args = ddp_fit(tiny_runs, name, probe, "trainer.devices=2", "trainer.max_steps=100000",
                   "checkpoint_every_n_steps=1000000")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "main.py", *args], cwd=ROOT, env=clean_env(), stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: step(probe, 0) >= 2 and step(probe, 1) >= 2, proc, log)
    except BaseException:
        for p in [*psutil.Process(proc.pid).children(recursive=True), proc] if proc.poll() is None else []:
            p.kill()
        raise
    return proc


def _ranks(proc: subprocess.Popen) -> list[psutil.Process]:
    """[rank 0, rank 1]: the launcher and the rank it started (helpers such as multiprocessing's resource tracker
    are children too, so pick by command line)."""
    launcher = psutil.Process(proc.pid)
    return [launcher, *(c for c in launcher.children() if any(a.endswith("main.py") for a in c.cmdline()))]


@pytest.mark.slow
def test_sigterm_to_one_ddp_rank_stops_every_rank_with_a_checkpoint(tiny_runs, tmp_path, stop_tries):
    """SIGTERM to rank 0 or rank 1 (alternating) of a 2-rank DDP fit on gloo: both ranks stop within HANG_S at the
    same step, rank 0 writes last.ckpt there, every process exits non-zero. `--stop-tries=20` for the full check."""
    for attempt in range(stop_tries):
        probe, log = tmp_path / f"probe{attempt}", tmp_path / f"ddp{attempt}.log"
        proc = _two_ranks_training(tiny_runs, f"ddp_stop{attempt}", probe, log)
        try:
            ranks = _ranks(proc)
            assert len(ranks) == 2
            ranks[attempt % 2].send_signal(signal.SIGTERM)
            gone, alive = psutil.wait_procs(ranks, timeout=HANG_S)  # reaps the launcher: its code is in `gone`
            assert not alive, f"try {attempt}: {len(alive)} rank(s) still running {HANG_S} s after SIGTERM (hang)"
        finally:
            for p in psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []:
                p.kill()
            if proc.poll() is None:
                proc.kill()
        assert [p.returncode for p in gone if p.pid == proc.pid] == [128 + signal.SIGTERM], log.read_text()[-3000:]
        assert log.read_text().count("stopped by SIGTERM") == 2  # each rank, at the same step
        run_dir = tiny_runs.root / "experiments" / f"ddp_stop{attempt}"
        assert _last_step(run_dir) == step(probe, 0) == step(probe, 1)  # together, at the checkpointed step


@pytest.mark.slow
def test_a_dead_ddp_peer_is_an_error_not_a_hang(tiny_runs, tmp_path):
    """SIGKILL (no chance to agree on anything) to rank 1: rank 0's next collective fails and it exits non-zero."""
    probe, log = tmp_path / "probe", tmp_path / "ddp.log"
    proc = _two_ranks_training(tiny_runs, "ddp_dead_peer", probe, log)
    try:
        _, peer = _ranks(proc)
        peer.kill()
        assert proc.wait(HANG_S) != 0, log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Connection reset by peer" in log.read_text() or "Connection closed by peer" in log.read_text()
