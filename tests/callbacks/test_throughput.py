"""Throughput logging: images/s and data wait from the step timeline, MFU from counted FLOPs and the card's peak,
all the way to the run's metrics.csv."""
import time
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from conftest import TINY_AE, compose_run, restored_environ
from ldm.callbacks.throughput import (
    HostClock, Throughput, batch_images, bf16_peak_flops, model_flops_utilisation, throughput,
)


class FakeTime:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Recorder:
    """Stands in for the LightningModule: keeps what the callback logs."""

    def __init__(self):
        self.logged: dict[str, float] = {}

    def log(self, name: str, value: float, **kwargs) -> None:
        self.logged[name] = value


def _trainer(device: str = "cpu", world_size: int = 1):
    return SimpleNamespace(is_global_zero=True, global_step=0, world_size=world_size,
                           strategy=SimpleNamespace(root_device=torch.device(device)))


def _step(callback, trainer, module, now: FakeTime, fetch_s: float, compute_s: float, batch, work=None) -> None:
    """One training batch on the fake clock: the loader takes `fetch_s`, the step `compute_s` (running `work`)."""
    now.t += fetch_s
    callback.on_train_batch_start(trainer, module, batch, 0)
    if work is not None:
        work()
    now.t += compute_s
    trainer.global_step += 1
    callback.on_train_batch_end(trainer, module, None, batch, 0)


def test_images_per_s_is_images_over_step_time_and_data_wait_the_share_of_it_between_steps():
    assert throughput(64, busy_s=0.3, wait_s=0.1) == pytest.approx((160.0, 0.25))
    now, trainer, module = FakeTime(), _trainer(world_size=2), Recorder()
    callback = Throughput(every_n_steps=3, clock=HostClock(now))
    callback.on_train_start(trainer, module)
    batch = {"image": torch.zeros(4, 3, 8, 8), "caption": ["a"] * 4}
    _step(callback, trainer, module, now, 50.0, 20.0, batch)  # first batch: warm-up, not timed
    _step(callback, trainer, module, now, 3.0, 1.0, batch)
    assert module.logged == {}  # step 2: not a logging step
    _step(callback, trainer, module, now, 3.0, 1.0, batch)
    # two timed batches of 4 images on each of 2 ranks in 2 x (3 s waiting + 1 s stepping)
    assert module.logged == pytest.approx({"train/images_per_s": 16 / 8, "train/data_wait": 6 / 8})

    callback.on_validation_start(trainer, module)  # validation sits in the next gap: left out
    _step(callback, trainer, module, now, 100.0, 1.0, batch)
    _step(callback, trainer, module, now, 3.0, 1.0, batch)
    _step(callback, trainer, module, now, 1.0, 2.0, batch)
    # three timed batches: 1 + 1 + 2 s stepping, 3 + 1 s waiting (the 100 s gap is not counted)
    assert module.logged == pytest.approx({"train/images_per_s": 24 / 8, "train/data_wait": 4 / 8})


def test_mfu_is_counted_model_flops_per_second_over_the_cards_dense_bf16_peak(monkeypatch, capsys):
    # by hand: 1e12 FLOPs per batch, 50 batches in 0.25 s = 2e14 FLOP/s, on an H200 (989.4e12 peak) = 20.2 %
    assert model_flops_utilisation(1e12, 50, 0.25, 989.4e12) == pytest.approx(2e14 / 989.4e12)
    assert bf16_peak_flops("NVIDIA H200") == bf16_peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert bf16_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12 and bf16_peak_flops("NVIDIA GeForce RTX 4090") == 165.2e12
    assert bf16_peak_flops("NVIDIA H100 NVL") is None and bf16_peak_flops("Tesla T4") is None

    # the GPU path on a fake clock: FLOPs counted over the first batch, MFU over the next ones
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    now, trainer, module = FakeTime(), _trainer("cuda"), Recorder()
    callback = Throughput(every_n_steps=2, clock=HostClock(now))
    callback.on_train_start(trainer, module)
    assert "MFU against the NVIDIA H200's dense bf16 peak of 989 TFLOP/s" in capsys.readouterr().out
    linear, x = torch.nn.Linear(64, 32), torch.randn(8, 64)
    _step(callback, trainer, module, now, 0.0, 1.0, x, work=lambda: linear(x).sum().backward())
    # forward 2*B*in*out, backward the weight gradient only (x needs none): 2*B*in*out
    assert callback.flops_per_batch == 4 * 8 * 64 * 32
    _step(callback, trainer, module, now, 0.5, 1.5, x)
    assert module.logged["train/mfu"] == pytest.approx(4 * 8 * 64 * 32 / 2.0 / 989.4e12)
    assert module.logged["train/images_per_s"] == pytest.approx(8 / 2.0)


def test_an_unknown_card_and_a_cpu_say_why_there_is_no_mfu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 NVL")
    Throughput(clock=HostClock()).on_train_start(_trainer("cuda"), Recorder())
    assert "no MFU: no dense bf16 peak known for 'NVIDIA H100 NVL'" in capsys.readouterr().out
    Throughput(clock=HostClock()).on_train_start(_trainer("cpu"), Recorder())
    assert "no MFU on CPU (GPUs only)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="every_n_steps must be >= 1"):
        Throughput(every_n_steps=0)
    assert batch_images({"caption": ["a", "b"], "latent": torch.zeros(5, 4, 2, 2)}) == 5


class _SlowData(Dataset):
    """Each item takes `delay_s` to load, as from a slow disk."""

    def __init__(self, delay_s: float):
        self.delay_s = delay_s

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> torch.Tensor:
        time.sleep(self.delay_s)
        return torch.randn(16)


STEP_S = 0.05


class _Tiny(L.LightningModule):
    """A step that takes `STEP_S` (a sleep: a real model's compute, without loading the shared CPU)."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(16, 1)

    def training_step(self, batch, batch_idx):
        time.sleep(STEP_S)
        return self.net(batch).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit_tiny(delay_s: float) -> dict[str, float]:
    trainer = L.Trainer(accelerator="cpu", max_steps=9, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Throughput(every_n_steps=9)])
    trainer.fit(_Tiny(), DataLoader(_SlowData(delay_s), batch_size=2))
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_a_slow_loader_shows_as_data_wait_in_a_real_fit():
    slow = _fit_tiny(delay_s=0.05)  # 0.1 s to load a batch of 2 for a step of 0.05 s: waits 2/3 of the time
    assert 0.55 < slow["train/data_wait"] < 0.8
    assert 2 / (0.1 + STEP_S) / 1.5 < slow["train/images_per_s"] < 2 / (0.1 + STEP_S)
    fast = _fit_tiny(delay_s=0.0)  # only the loop's own work between steps
    assert fast["train/data_wait"] < 0.3
    assert 2 / STEP_S / 1.5 < fast["train/images_per_s"] < 2 / STEP_S


@pytest.mark.slow
def test_throughput_reaches_the_runs_metrics_csv_and_the_logger(tmp_path, capsys):
    from ldm.callbacks.run_metrics import read_rows
    from ldm.tasks import fit

    with restored_environ():
        trainer = fit.run(compose_run("shapes_autoencoder", [f"paths.root_dir={tmp_path}", *TINY_AE, "callbacks=none",
                                                             "logger=csv", "trainer.max_steps=4",
                                                             "trainer.log_every_n_steps=2",
                                                             "trainer.val_check_interval=4"]))
    assert "[fit] throughput    images/s and data wait every 2 steps; no MFU on CPU" in capsys.readouterr().out
    rows = [r for r in read_rows(tmp_path / "experiments" / "shapes_autoencoder" / "metrics.csv") if "train/loss" in r]
    assert [r["step"] for r in rows] == [2, 4]
    assert all(r["train/images_per_s"] > 0 and 0 <= r["train/data_wait"] < 1 and "train/mfu" not in r for r in rows)
    logged = read_rows(tmp_path / trainer.logger.log_dir / "metrics.csv")  # the CSV logger's own file
    assert len([r for r in logged if "train/images_per_s" in r]) == 2
