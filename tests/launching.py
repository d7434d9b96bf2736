"""Helpers for tests that launch `main.py` in other processes: the probes such runs load as callbacks (importable
as `launching.X` once tests/ is on PYTHONPATH, see clean_env) and the launch utilities."""
import hashlib
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import lightning as L
import pytest

from tiny_sizes import ROOT, TINY_TXT2IMG

TIMEOUT = 300  # seconds for any one launch: nothing may hang CI
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "MASTER_ADDR",
                "MASTER_PORT")


class RankProbe(L.Callback):
    """Test probe: each rank records its step as it trains, then the sample keys it saw, its first and last step
    and a hash of its final weights."""

    def __init__(self, out_dir: str):
        self.out_dir, self.keys, self.start_step = Path(out_dir), [], None

    def on_train_start(self, trainer, pl_module):
        self.start_step = trainer.global_step
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.keys += list(batch["key"])
        (self.out_dir / f"step{trainer.global_rank}").write_text(str(trainer.global_step))

    def on_train_end(self, trainer, pl_module):
        digest = hashlib.sha256()
        for name, tensor in sorted(pl_module.state_dict().items()):
            digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
        record = dict(keys=self.keys, start_step=self.start_step, end_step=trainer.global_step,
                      world_size=trainer.world_size, weights=digest.hexdigest())
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def ranks(probe: Path, world_size: int = 2) -> list[dict]:
    return [json.loads((probe / f"rank{r}.json").read_text()) for r in range(world_size)]


def step(probe: Path, rank: int) -> int:
    try:
        return int((probe / f"step{rank}").read_text())
    except (FileNotFoundError, ValueError):  # not written yet, or caught mid-write
        return -1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without launcher variables (a CI job inside SLURM would steer Lightning), plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_", "SUBMITIT_")) and k not in LAUNCHER_ENV}
    pythonpath = os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")])  # the probes' module (launching.py)
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath, **extra}


def tiny_fit(tiny_runs, name: str, *overrides: str) -> list[str]:
    """main.py overrides: shapes_txt2img at test size on the tiny_runs latent cache, no validation or callbacks."""
    return ["+experiment=shapes_txt2img", f"name={name}", "first_stage_name=ae", f"paths.root_dir={tiny_runs.root}",
            *TINY_TXT2IMG, "callbacks=none", "trainer.limit_val_batches=0", *overrides]


def ddp_fit(tiny_runs, name: str, probe: Path, *overrides: str) -> list[str]:
    """tiny_fit on trainer=ddp over gloo, with a RankProbe writing to `probe`."""
    return tiny_fit(tiny_runs, name, "trainer=ddp", "trainer.accelerator=cpu", "trainer.precision=32-true",
                    "+callbacks.probe._target_=launching.RankProbe", f"+callbacks.probe.out_dir={probe}",
                    "security.allow=[launching.RankProbe]",
                    *overrides)


def wait_until(condition, process: subprocess.Popen, log: Path, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"gave up waiting (exit code {process.poll()}):\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


class RecordBatchKeys(L.Callback):
    """Test probe for the DDP run: each rank writes the keys of the training batches it saw."""

    def __init__(self, out_dir: str):
        self.out_dir, self.keys = Path(out_dir), []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.keys.append(list(batch["key"]))

    def on_train_end(self, trainer, pl_module):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.keys))
