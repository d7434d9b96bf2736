"""Run directories, atomic checkpoint writes, allow-listed rebuilds, EMA."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from omegaconf import OmegaConf

from ldm.models.ema import EMA, ema_decay
from ldm.utils.atomic import atomic_torch_save
from ldm.utils.errors import ConfigError
from ldm.utils.rundir import resolve_checkpoint, resume_checkpoint
from ldm.utils.safe_config import check_targets, safe_instantiate


def test_resume_picks_last_and_refuses_fresh_start_over_checkpoints(tmp_path):
    assert resume_checkpoint(tmp_path, resume=True) is None
    assert resume_checkpoint(tmp_path, resume=False) is None
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step-00000010.ckpt").write_bytes(b"x")
    assert resume_checkpoint(tmp_path, True).name == "step-00000010.ckpt"
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert resume_checkpoint(tmp_path, True).name == "last.ckpt"
    with pytest.raises(ConfigError, match="resume=false"):
        resume_checkpoint(tmp_path, False)
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()  # nothing deleted


def test_resolve_checkpoint_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="`task.ckpt`"):
        resolve_checkpoint(tmp_path, "last")


def test_atomic_save_survives_a_kill_mid_write(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1}, path)
    # A child writes a new checkpoint over `path` and is killed (SIGKILL) before the rename.
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import os, time, torch
            from ldm.utils.atomic import atomic_torch_save
            os.replace = lambda *a: (print("written", flush=True), time.sleep(600))
            atomic_torch_save({{"step": 2}}, {str(path)!r})
        """)],
        stdout=subprocess.PIPE,
    )
    assert child.stdout.readline().strip() == b"written"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert torch.load(path, weights_only=True)["step"] == 1  # the previous good checkpoint, intact


def test_safe_instantiate_refuses_targets_outside_the_allow_list():
    conditioner = {"_target_": "ldm.nn.conditioners.ClassConditioner", "num_classes": 2, "dim": 4}
    assert safe_instantiate(conditioner).y_dim == 4
    with pytest.raises(PermissionError, match="`torch.nn.Linear` at `_target_`"):  # exact names, not a torch. prefix
        safe_instantiate({"_target_": "torch.nn.Linear", "in_features": 2, "out_features": 3})
    with pytest.raises(PermissionError, match=r"`os.system` at `a.b\[0\]._target_`"):
        check_targets(OmegaConf.create({"a": {"b": [{"_target_": "os.system", "_args_": ["true"]}]}}), stored=True)


def test_ema_tracks_weights_with_warmup():
    net = torch.nn.Linear(2, 2)
    ema = EMA(net, decay=0.9, warmup=True)
    assert ema_decay(0, 0.9) == pytest.approx(0.1) and ema_decay(1000, 0.9) == 0.9
    before = ema.net.weight.clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)  # decay 0.1 at the first update: 90% of the way to the new weights
    assert torch.allclose(ema.net.weight, before + 0.9, atol=1e-6)
    assert int(ema.num_updates) == 1 and not any(p.requires_grad for p in ema.net.parameters())


def test_ema_counts_on_the_host_and_a_loaded_count_takes_over():
    """The fused update equals the per-parameter formula, step after step, and a state_dict load (a resume)
    replaces the host's copy of the update count, so the decay warm-up continues from the loaded step."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = EMA(net, decay=0.99)
    expected = [p.clone() for p in ema.net.parameters()]
    for n in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
            net[1].running_mean.add_(1.0)
        ema.update(net)
        d = ema_decay(n, 0.99)
        expected = [e * d + p.detach() * (1 - d) for e, p in zip(expected, net.parameters())]
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ema.net.parameters(), expected))
        assert torch.equal(ema.net[1].running_mean, net[1].running_mean)  # buffers are copied
    resumed = EMA(net, decay=0.99)
    resumed.update(net)  # a host count of 1 before the load...
    resumed.load_state_dict(ema.state_dict())  # ...replaced by the loaded 3
    before = [p.clone() for p in resumed.net.parameters()]
    resumed.update(net)
    d = ema_decay(3, 0.99)
    assert all(torch.allclose(a, b * d + p.detach() * (1 - d), atol=1e-6)
               for a, b, p in zip(resumed.net.parameters(), before, net.parameters()))
    assert int(resumed.num_updates) == 4
