"""Errors a person can read: a wrong value in any config group, a missing experiment or path, an unknown sampler
or schedule, a full disk: one line naming the key (or path) and the fix, no traceback unless debug=true."""
import errno
import subprocess
import sys

import pytest

from conftest import ROOT
from ldm.utils.cli import task_error_line

TXT = "+experiment=shapes_txt2img"
CASES = [  # (arguments, what the one line must say)
    ([], "usage: python main.py +experiment=NAME"),
    (["+experiment=nope"], "Could not find 'experiment/nope'; Available options in 'experiment': autoencoder_kl_f8,"),
    (["experiment=shapes_autoencoder", "task=nope"], "Could not find 'task/nope'"),
    ([TXT, "model/backbone=nope"], "Available options in 'model/backbone': dit_b,"),
    ([TXT, "model/formulation=nope"], "Available options in 'model/formulation': edm,"),
    ([TXT, "model/conditioner=nope"], "Available options in 'model/conditioner': class,"),
    ([TXT, "data=nope"], "Could not find 'data/nope'"),
    ([TXT, "trainer=nope"], "Could not find 'trainer/nope'"),
    ([TXT, "logger=nope"], "Could not find 'logger/nope'"),
    ([TXT, "callbacks=nope"], "Could not find 'callbacks/nope'"),
    ([TXT, "eval=nope"], "Could not find 'eval/nope'"),
    ([TXT, "model.lrr=1"], "Could not override 'model.lrr'; To append to your config use +model.lrr=1"),
    ([TXT, "eval.num_objectz=2"], "Could not override 'eval.num_objectz'"),
    ([TXT, "task=sample", "task.sampler=eulr"], "unknown sampler 'eulr' (config key `task.sampler`): choose one of"),
    ([TXT, "task=sample", "task.schedule=cosine"], "unknown step schedule 'cosine' (config key `task.schedule`)"),
    ([TXT, "task=sample", "ckpt=/no/such.ckpt"], "checkpoint not found: /no/such.ckpt (config key `ckpt`"),
    (["+experiment=shapes_autoencoder", "data=image_folder", "data.root=/no/such/dir"], "data.root"),
]


def _main(*args, tmp_path):
    return subprocess.run([sys.executable, "main.py", *args, f"paths.root_dir={tmp_path}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("args, expected", CASES, ids=[" ".join(a) or "no arguments" for a, _ in CASES])
def test_a_wrong_value_is_one_line_naming_the_key(args, expected, tmp_path):
    result = _main(*args, tmp_path=tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith(("INFO", "["))]
    assert result.returncode != 0 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_debug_true_shows_the_traceback(tmp_path):
    result = _main(TXT, "task=sample", "task.sampler=eulr", "debug=true", tmp_path=tmp_path)
    assert result.returncode != 0 and "Traceback" in result.stderr and "unknown sampler 'eulr'" in result.stderr


def test_a_full_disk_is_one_line_with_the_fix():
    full = OSError(errno.ENOSPC, "No space left on device", "/scratch/run/checkpoints/.last.ckpt.tmp-1")
    wrapped = RuntimeError("while saving")
    wrapped.__cause__ = full
    line = task_error_line(wrapped, None)
    assert line.startswith("no space left on device writing /scratch/run/checkpoints/.last.ckpt.tmp-1")
    assert "paths.root_dir" in line and "\n" not in line
    assert task_error_line(KeyError("x"), None) == "KeyError: 'x' (debug=true shows the traceback)"
