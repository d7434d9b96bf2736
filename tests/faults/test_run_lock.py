"""One run per directory: a second fit on a busy run directory is refused; a dead owner's lock is taken over."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TINY_AE
from ldm.data.latent_cache.claims import _claim_abandoned
from ldm.utils.errors import ConfigError
from ldm.utils.ownership import boot_id, owner_record, process_start
from ldm.utils.run_lock import RunLock


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(run_dir, generation: int, owner: dict, age_s: float = 0.0):
    lock = run_dir / "lock" / str(generation)
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(json.dumps(owner))
    os.utime(lock, (time.time() - age_s, time.time() - age_s))
    return lock


def test_a_live_owner_keeps_the_run_and_the_refusal_names_it(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(ConfigError, match=f"in use by pid {os.getpid()} on host {socket.gethostname()}"):
            RunLock(tmp_path).acquire()
    RunLock(tmp_path).acquire().release()  # released: free again


@pytest.mark.parametrize("gone", ["dead pid", "reused pid", "other boot", "other host, no heartbeat"])
def test_a_gone_owner_is_taken_over(tmp_path, gone):
    owner = owner_record()
    if gone == "dead pid":
        owner["pid"] = _dead_pid()
    elif gone == "reused pid":  # the pid is alive, but it is another process than the one that locked
        owner["pid_start"] = str(int(process_start(os.getpid())) - 1)
    elif gone == "other boot":  # the machine rebooted since: our live pid is a coincidence
        owner["boot_id"] = "another-boot"
    else:
        owner["host"] = "elsewhere"
    stale = _write_lock(tmp_path, 0, owner, age_s=1000 if "host" in gone else 0)
    lock = RunLock(tmp_path, stale_after_s=300).acquire()
    assert lock.path.name == "1" and not stale.exists()  # the next generation; the stale file is removed
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    lock.release()


def test_another_hosts_lock_with_a_recent_heartbeat_is_respected(tmp_path):
    _write_lock(tmp_path, 3, {**owner_record(), "host": "elsewhere", "pid": 1}, age_s=10)
    with pytest.raises(ConfigError, match="pid 1 on host elsewhere"):
        RunLock(tmp_path, stale_after_s=300).acquire()


def test_a_cache_claim_whose_pid_was_reused_after_a_reboot_is_taken_over(tmp_path):
    claim = tmp_path / "shard-000000.0"
    claim.write_text(json.dumps({**owner_record(), "boot_id": "before-the-reboot", "tmp": "x"}))
    assert boot_id() and _claim_abandoned(claim, stale_after_s=600)
    claim.write_text(json.dumps({**owner_record(), "tmp": "x"}))  # this very process: alive
    assert not _claim_abandoned(claim, stale_after_s=600)


@pytest.mark.slow
def test_a_second_fit_on_the_same_run_is_refused(tmp_path):
    """Two `main.py` fits with one name at once: the second stops at once naming the first; the first goes on."""
    args = [sys.executable, "main.py", "+experiment=shapes_autoencoder", f"paths.root_dir={tmp_path}", *TINY_AE,
            "trainer.max_steps=100000", "callbacks=none"]
    first = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lock_dir = tmp_path / "experiments" / "shapes_autoencoder" / "lock"
        deadline = time.time() + 120
        while not (lock_dir.is_dir() and any(lock_dir.iterdir())):
            assert first.poll() is None and time.time() < deadline, first.stderr.read() if first.poll() else "timeout"
            time.sleep(0.5)
        second = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert f"in use by pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
        assert first.poll() is None  # the first run was not disturbed
    finally:
        first.kill()
        first.wait()


def test_only_swept_parameters_name_a_sweep_jobs_directory():
    from ldm.utils.sweep_dirs import with_sweep_dirnames

    single = ["main.py", "+experiment=x", "model.lr=1e-4"]
    assert with_sweep_dirnames(single) == single  # not a multirun: untouched
    argv = with_sweep_dirnames(["main.py", "-m", "+experiment=x", "model.lr=1e-4,2e-4", "trainer.max_steps=10",
                                "~callbacks.image_grid", "hydra/launcher=slurm_1x8", "hydra.launcher.partition=gpu"])
    assert argv[-1] == ("hydra.job.config.override_dirname.exclude_keys="
                        "[callbacks.image_grid,experiment,name,trainer.max_steps]")


@pytest.mark.slow
def test_sweep_jobs_train_in_their_own_directories_and_a_resubmission_resumes_them(tmp_path):
    """`-m model.lr=a,b` without distinct names: two runs, not one run "resumed" by the second job."""
    args = [sys.executable, "main.py", "-m", "+experiment=shapes_autoencoder", f"paths.root_dir={tmp_path}", *TINY_AE,
            "model.lr=1e-3,2e-3", "callbacks=none", "trainer.val_check_interval=2"]
    first = subprocess.run([*args, "trainer.max_steps=2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    root = tmp_path / "experiments" / "shapes_autoencoder"
    runs = {p.name: p for p in root.iterdir() if p.is_dir()}
    assert set(runs) == {"model.lr=0.001", "model.lr=0.002"}
    for name, run_dir in runs.items():
        stored = (run_dir / "config.yaml").read_text()
        assert f"lr: {name.split('=')[1]}" in stored and (run_dir / "checkpoints" / "last.ckpt").is_file()
    again = subprocess.run([*args, "trainer.max_steps=3"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("Resuming from") == 2, again.stdout[-2000:]
