"""Cluster launch paths on CPU processes (gloo): Lightning's launcher, torchrun (one node, and two "nodes" on
localhost) and srun (scripts/slurm/train.sbatch under a fake srun) train one run in lockstep on disjoint data;
the requeue signal checkpoints and requeues, and the requeued job resumes at that step; the submitit launcher
configs agree with the trainer and submit one task per GPU; submitit_local trains end to end."""
import contextlib
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.demos.boring_classes import BoringModel

from conftest import ROOT, compose_experiment
from launching import TIMEOUT, clean_env, ddp_fit, free_port, ranks, step, tiny_fit, wait_until
from ldm.callbacks.slurm_requeue import SlurmRequeue
from ldm.utils.checkpoint import read_checkpoint
from ldm.utils.checkpoint_io import AtomicCheckpointIO

def stop(job: subprocess.Popen, task_pids: Path) -> None:
    """The end of a requeued job, the hard way (SLURM's SIGKILL after its grace time): kill every task."""
    for pid in map(int, task_pids.read_text().split()) if task_pids.exists() else ():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    try:
        job.wait(60)  # the script waits for srun, which waits for its tasks
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()


# --- the requeue callback, in-process ---------------------------------------------------------------------------

class SignalAt(L.Callback):
    """Sends this process `signum` as training batch `batch_idx` starts."""

    def __init__(self, signum: int, batch_idx: int):
        self.signum, self.batch_idx = signum, batch_idx

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.batch_idx:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("scontrol", ["works", "missing"])
def test_requeue_signal_checkpoints_after_the_optimizer_step_then_requeues(tmp_path, monkeypatch, caplog, scontrol):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if scontrol == "works":
        (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
        (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))  # only the fake, or no scontrol at all
    for name in [k for k in os.environ if k.startswith("SLURM_")]:  # one plain process, even on a SLURM CI runner
        monkeypatch.delenv(name)
    before = signal.getsignal(signal.SIGUSR2)
    last = tmp_path / "last.ckpt"
    trainer = L.Trainer(
        accelerator="cpu", max_steps=4, accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        plugins=[AtomicCheckpointIO()],
        # batch 4 is the first of optimizer step 3's two: the signal (USR2, as submitit sends) lands mid-step
        callbacks=[SlurmRequeue(last, "77_3"), SignalAt(signal.SIGUSR2, batch_idx=4)],
    )
    with caplog.at_level(logging.INFO, logger="ldm.callbacks.slurm_requeue"):
        trainer.fit(BoringModel())
    assert torch.load(last, weights_only=False)["global_step"] == 3  # saved once step 3 was complete
    assert trainer.global_step == 4  # training went on: SLURM, not the callback, ends a requeued job
    if scontrol == "works":
        assert (tmp_path / "scontrol.log").read_text() == "requeue 77_3\n"
        assert "requeued SLURM job 77_3" in caplog.text
    else:
        assert "could not requeue SLURM job 77_3" in caplog.text and f"resume from {last}" in caplog.text
    assert signal.getsignal(signal.SIGUSR2) is before


# --- two ranks through each launcher ------------------------------------------------------------------------------

def launches(tiny_runs, launcher: str, probe: Path) -> list[list[str]]:
    """The command lines (one per "node") that start two ranks of the same run through `launcher`."""
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    if launcher == "lightning":
        return [[sys.executable, "main.py", *ddp_fit(tiny_runs, launcher, probe, "trainer.devices=2")]]
    if launcher == "torchrun":
        return [[*torchrun, "--standalone", "--nproc_per_node=2", "main.py",
                 *ddp_fit(tiny_runs, launcher, probe, "trainer.devices=2")]]
    port = free_port()  # two torchrun agents, one process each, meeting on localhost like two nodes
    return [[*torchrun, "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1", "--master_addr=127.0.0.1",
             f"--master_port={port}", "main.py",
             *ddp_fit(tiny_runs, launcher, probe, "trainer.devices=1", "trainer.num_nodes=2")] for node in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("launcher, shape", [("lightning", "2 devices x 1 node"), ("torchrun", "2 devices x 1 node"),
                                             ("torchrun_2_nodes", "1 device x 2 nodes")])
def test_two_ranks_train_in_lockstep_on_disjoint_data(tiny_runs, tmp_path, launcher, shape):
    probe, steps = tmp_path / "probe", 3
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    commands = launches(tiny_runs, launcher, probe)
    processes = [subprocess.Popen([*cmd, f"trainer.max_steps={steps}"], cwd=ROOT, env=clean_env(), stdout=log.open("w"),
                                  stderr=subprocess.STDOUT) for cmd, log in zip(commands, logs)]
    try:
        codes = [p.wait(TIMEOUT) for p in processes]
    finally:
        for p in processes:
            p.kill()
    output = "".join(log.read_text() for log in logs if log.exists())
    assert codes == [0] * len(processes), output[-3000:]
    assert f"[fit] world size    2 = {shape}" in output
    assert "[fit] global batch  16 = 8 per device x 2 ranks" in output
    seen = ranks(probe)
    assert [(r["start_step"], r["end_step"], r["world_size"]) for r in seen] == [(0, steps, 2)] * 2
    rank0, rank1 = (set(r["keys"]) for r in seen)
    assert len(rank0) == len(rank1) == steps * 8 and not rank0 & rank1  # each its own part of the epoch
    assert seen[0]["weights"] == seen[1]["weights"]  # all-reduced gradients: the same model on every rank
    ckpt = read_checkpoint(tiny_runs.root / "experiments" / launcher / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == steps


# --- a SLURM job: sbatch script, requeue signal, requeued job -----------------------------------------------------

def fake_slurm(tmp_path: Path) -> Path:
    """A bin directory with test doubles: srun (starts SLURM_NTASKS_PER_NODE tasks here, with their SLURM_* ranks,
    and writes their pids), scontrol (records its arguments) and python (this interpreter)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"""#!{sys.executable}
import os, subprocess, sys
n = int(os.environ["SLURM_NTASKS_PER_NODE"])
tasks = [subprocess.Popen(sys.argv[1:], env={{**os.environ, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r),
                                              "SLURM_NODEID": "0", "SLURM_STEP_ID": "0"}}) for r in range(n)]
open({str(tmp_path / "pids")!r}, "w").write(" ".join(str(t.pid) for t in tasks))
sys.exit(max(t.wait() for t in tasks))
""")
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return bin_dir


@pytest.mark.slow
def test_sbatch_job_checkpoints_on_the_requeue_signal_and_the_requeued_job_resumes_there(tiny_runs, tmp_path):
    probe, last = tmp_path / "probe", tiny_runs.root / "experiments" / "slurm" / "checkpoints" / "last.ckpt"
    args = ddp_fit(tiny_runs, "slurm", probe, "checkpoint_every_n_steps=1000000")  # only the signal saves
    job_env = clean_env(  # what sbatch gives the script: one node, two tasks
        PATH=f"{fake_slurm(tmp_path)}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_JOB_NAME="ldm",
        SLURM_JOB_NUM_NODES="1", SLURM_NNODES="1", SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2", SLURM_CPUS_PER_TASK="1",
        SLURM_TASKS_PER_NODE="2", SLURM_NODELIST="localhost", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
    )
    log = tmp_path / "attempt1.log"
    job = subprocess.Popen(["bash", "scripts/slurm/train.sbatch", *args, "trainer.max_steps=1000000"], cwd=ROOT,
                           env=job_env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: min(step(probe, 0), step(probe, 1)) >= 2, job, log)
        rank1 = int((tmp_path / "pids").read_text().split()[1])
        os.kill(rank1, signal.SIGUSR1)  # SLURM signals every task; one is enough, the ranks agree on it
        wait_until((tmp_path / "scontrol.log").exists, job, log)
    finally:
        stop(job, tmp_path / "pids")
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    saved = read_checkpoint(last)["global_step"]
    assert f"requeue signal: saved {last} at step {saved}" in log.read_text()

    # SLURM runs the script again with the same arguments (max_steps aside: this time the run should finish)
    requeued = subprocess.run(["bash", "scripts/slurm/train.sbatch", *args, f"trainer.max_steps={saved + 2}"],
                              cwd=ROOT, env={**job_env, "MASTER_PORT": str(free_port()), "SLURM_RESTART_COUNT": "1"},
                              capture_output=True, text=True, timeout=TIMEOUT)
    assert requeued.returncode == 0, requeued.stdout[-3000:] + requeued.stderr[-3000:]
    assert f"[fit] Resuming from {last} at step {saved}" in requeued.stdout
    seen = ranks(probe)
    assert [(r["start_step"], r["end_step"], r["world_size"]) for r in seen] == [(saved, saved + 2, 2)] * 2
    assert seen[0]["weights"] == seen[1]["weights"]
    assert read_checkpoint(last)["global_step"] == saved + 2


# --- Hydra's submitit launchers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("launcher, overrides, nodes", [("slurm_1x8", [], 1), ("slurm_nx8", ["cluster.nodes=4"], 4)])
def test_slurm_launcher_configs_agree_with_the_trainer(launcher, overrides, nodes):
    cfg = compose_experiment("txt2img", [f"hydra/launcher={launcher}", *overrides])
    queue = cfg.hydra.launcher
    assert (queue.nodes, queue.tasks_per_node, queue.gpus_per_node) == (nodes, 8, 8)  # one task (rank) per GPU
    assert (cfg.trainer.num_nodes, cfg.trainer.devices, cfg.trainer.strategy) == (nodes, 8, "ddp")
    assert queue.name == "txt2img" and queue.additional_parameters.requeue
    run_dir = cfg.paths.run_dir  # submission logs, Hydra's outputs and the run itself: one directory, no time in it
    assert queue.submitit_folder.startswith(run_dir) and cfg.hydra.sweep.dir == cfg.hydra.run.dir == run_dir
    built = instantiate(queue)
    assert type(built).__name__ == "SlurmLauncher" and built.params["nodes"] == nodes


def test_ddp_trainer_without_a_slurm_launcher_takes_every_visible_gpu_on_one_node():
    cfg = compose_experiment("shapes_txt2img", ["trainer=ddp"])
    assert (cfg.trainer.devices, cfg.trainer.num_nodes) == (-1, 1)


@pytest.mark.slow
def test_slurm_launcher_submits_one_task_per_gpu_with_the_requeue_signal(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log, submitted = tmp_path / "launcher.log", tmp_path / "submitted.sh"
    sbatch = f'cp "$1" {submitted}.tmp && mv {submitted}.tmp {submitted}\necho "Submitted batch job 4242"'
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\n{sbatch}\n")
    (bin_dir / "srun").write_text("#!/bin/sh\n")  # submitit checks that srun exists
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    launcher = subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), "-m", "+experiment=txt2img", "hydra/launcher=slurm_nx8",
         "cluster.nodes=4", "hydra.launcher.partition=gpu", "hydra.launcher.account=proj",
         f"paths.root_dir={tmp_path}"],
        cwd=tmp_path, env=clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}"), stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(submitted.exists, launcher, log, timeout=120)
    finally:
        launcher.kill()  # it would wait for the job's result
        launcher.wait()
    script = submitted.read_text()
    for flag in ["--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--signal=USR2@120", "--requeue",
                 "--job-name=txt2img", "--partition=gpu", "--account=proj"]:
        assert f"#SBATCH {flag}\n" in script
    assert f"--output={tmp_path}/experiments/txt2img/logs/submitit/" in script
    assert "\nexport SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK\n" in script  # the setup lines, before srun
    assert "\nsrun " in script and "-m submitit.core._submit" in script
    assert not (tmp_path / "multirun").exists()


@pytest.mark.slow
def test_submitit_local_trains_in_the_experiment_directory(tiny_runs, tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "-m", "hydra/launcher=submitit_local",
         *tiny_fit(tiny_runs, "submitit_local", "trainer.max_steps=2")],
        cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tiny_runs.root / "experiments" / "submitit_local"
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 2
    assert (run_dir / "main.log").is_file() and (run_dir / "multirun.yaml").is_file()  # Hydra's outputs: here too
    assert not (tmp_path / "multirun").exists()  # nothing keyed by time
