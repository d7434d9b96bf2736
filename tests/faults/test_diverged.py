"""A diverged state never replaces the last good checkpoint, and a resume with a lower lr recovers."""
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY_AE
from launching import clean_env


@pytest.mark.slow
def test_a_diverged_step_keeps_the_last_good_checkpoint_and_a_lower_lr_recovers(tmp_path):
    args = [sys.executable, "main.py", "+experiment=shapes_autoencoder", f"paths.root_dir={tmp_path}", *TINY_AE,
            "callbacks=none", "checkpoint_every_n_steps=1", "trainer.val_check_interval=1000"]
    run = lambda *extra: subprocess.run([*args, *extra], cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                                        timeout=300)
    good = run("trainer.max_steps=2")
    assert good.returncode == 0, good.stderr[-2000:]
    checkpoints = tmp_path / "experiments" / "shapes_autoencoder" / "checkpoints"
    before = (checkpoints / "last.ckpt").read_bytes()

    diverged = run("trainer.max_steps=4", "model.lr=inf")  # the resumed optimizer takes the new lr: NaN weights
    assert diverged.returncode == 2 and "non-finite values at step 3" in diverged.stderr, diverged.stderr[-2000:]
    assert "Traceback" not in diverged.stderr
    assert (checkpoints / "last.ckpt").read_bytes() == before  # the good one, untouched
    assert not (checkpoints / "step-00000003.ckpt").exists()
    aside = torch.load(checkpoints / "diverged-step-00000003.ckpt", weights_only=True)
    assert not all(torch.isfinite(t).all() for t in aside["state_dict"].values())

    recovered = run("trainer.max_steps=4", "model.lr=1e-3")
    assert recovered.returncode == 0 and "at step 2" in recovered.stdout, recovered.stderr[-2000:]
    final = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert final["global_step"] == 4 and all(torch.isfinite(t).all() for t in final["state_dict"].values())
