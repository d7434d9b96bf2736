"""Errors a person can read: a wrong value in any config group, a missing experiment or path, an unknown sampler
or schedule, a constructor refusing a value, a full disk: one line naming the key (or path) and the fix, no
traceback unless debug=true or HYDRA_FULL_ERROR=1."""
import errno
import os
import subprocess
import sys

import pytest
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from conftest import CONFIGS, ROOT
from ldm.utils.cli import composition_problem, normalise_experiment, task_error_line, usage_problem

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
    ([TXT, "sampling=nope"], "Could not find 'sampling/nope'"),
    ([TXT, "nmae=x"], "Could not override 'nmae'"),  # an unknown top-level key
    ([TXT, "model.lrr=1"], "Could not override 'model.lrr'; To append to your config use +model.lrr=1"),
    ([TXT, "eval.num_objectz=2"], "Could not override 'eval.num_objectz'"),
    ([TXT, "task=sample", "sampling.sampler=eulr"],
     "unknown sampler 'eulr' (config key `sampling.sampler`): choose one of"),
    ([TXT, "task=sample", "sampling.schedule=cosine"],
     "unknown step schedule 'cosine' (config key `sampling.schedule`)"),
    ([TXT, "task=sample", "task.ckpt=/no/such.ckpt"], "checkpoint not found: /no/such.ckpt (config key `task.ckpt`"),
    (["+experiment=shapes_autoencoder", "data=image_folder", "data.root=/no/such/dir"], "data.root"),
    (["+experiment=shapes_autoencoder", "trainer.precision=99"],
     "`trainer` (lightning.pytorch.trainer.trainer.Trainer): ValueError: Precision 99 is invalid"),
]


def _main(*args, tmp_path, env=None):
    return subprocess.run([sys.executable, "main.py", *args, f"paths.root_dir={tmp_path}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("args, expected", CASES, ids=[" ".join(a) or "no arguments" for a, _ in CASES])
def test_a_wrong_value_is_one_line_naming_the_key(args, expected, tmp_path):
    result = _main(*args, tmp_path=tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith(("INFO", "["))]
    assert result.returncode != 0 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("how", ["debug=true", "HYDRA_FULL_ERROR=1"])
def test_debug_true_shows_the_traceback(tmp_path, how):
    debug, env = (["debug=true"], None) if how == "debug=true" else ([], {**os.environ, "HYDRA_FULL_ERROR": "1"})
    result = _main(TXT, "task=sample", "sampling.sampler=eulr", *debug, tmp_path=tmp_path, env=env)
    assert result.returncode != 0 and "Traceback" in result.stderr and "unknown sampler 'eulr'" in result.stderr


def test_a_full_disk_is_one_line_with_the_fix():
    full = OSError(errno.ENOSPC, "No space left on device", "/scratch/run/checkpoints/.last.ckpt.tmp-1")
    wrapped = RuntimeError("while saving")
    wrapped.__cause__ = full
    line = task_error_line(wrapped, None)
    assert line.startswith("no space left on device writing /scratch/run/checkpoints/.last.ckpt.tmp-1")
    assert "paths.root_dir" in line and "\n" not in line
    assert task_error_line(KeyError("x"), None) == "KeyError: 'x' (debug=true shows the traceback)"


def test_a_constructor_error_is_named_by_its_key_and_target():
    with pytest.raises(InstantiationException) as raised:
        instantiate({"model": {"net": {"_target_": "builtins.int", "_args_": ["x"]}}})
    assert task_error_line(raised.value, None) == ("`model.net` (builtins.int): ValueError: invalid literal for int() "
                                                   "with base 10: 'x' (debug=true shows the traceback)")


@pytest.mark.parametrize("spelling", ["+experiment=shapes_autoencoder", "experiment=shapes_autoencoder"])
def test_both_spellings_of_the_experiment_compose(spelling):
    argv = normalise_experiment(["main.py", spelling, "task=sample"])
    assert usage_problem(argv, CONFIGS) is None and composition_problem(argv, CONFIGS, "config") is None
