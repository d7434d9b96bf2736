"""No code runs from a checkpoint, a .safetensors export or a cache: each payload below, planted in a real tiny
checkpoint, is refused with one line and leaves its marker file absent."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, compose_run, restored_environ
from ldm.utils.checkpoint import CONFIG_KEY, FIRST_STAGE_CONFIG_KEY, load_module
from ldm.utils.consolidate import read_safetensors, save_safetensors
from ldm.utils.safe_config import allow_targets, safe_instantiate


def _payloads(marker: Path) -> dict[str, tuple[str, object]]:
    """name -> (dotted key in the stored model config, value planted there); each would create `marker`."""
    touch = f"touch {marker}"
    return {
        "collect_env.run (a torch. prefix)": ("backbone", {"_target_": "torch.utils.collect_env.run",
                                                          "command": touch}),
        "os.system": ("backbone", {"_target_": "os.system", "_args_": [touch]}),
        "subprocess.run": ("backbone", {"_target_": "subprocess.run", "args": ["touch", str(marker)]}),
        "nested in a list": ("backbone.extra", [1, {"_target_": "os.system", "_args_": [touch]}]),
        "nested in a dict": ("conditioner.extra", {"deep": {"_target_": "os.system", "_args_": [touch]}}),
        "_partial_": ("backbone", {"_target_": "os.system", "_partial_": True}),
        "oc.env interpolation": ("backbone.model_channels", "${oc.env:HOME}"),
        "custom resolver": ("backbone.model_channels", "${ldm_test_touch:}"),
        "pipe: URL": ("backbone.weights", f"pipe:{touch}"),
    }


def _plant(config: dict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        config = config[part]
    config[leaf] = value


@pytest.fixture(scope="module")
def resolver_marker(tmp_path_factory) -> Path:
    """A custom resolver that creates a marker when a config evaluates it (an attacker's stand-in)."""
    marker = tmp_path_factory.mktemp("resolver") / "RESOLVED"
    OmegaConf.register_new_resolver("ldm_test_touch", lambda: marker.touch() or 64, replace=True)
    return marker


@pytest.mark.slow
@pytest.mark.parametrize("payload", list(_payloads(Path("/x"))))
@pytest.mark.parametrize("entry", ["load_module .ckpt", "load_module .safetensors", "task=sample", "task=evaluate",
                                   "first stage of task=cache_latents"])
def test_a_planted_payload_is_refused_and_runs_nothing(tiny_runs, tmp_path, resolver_marker, payload, entry,
                                                       shapes_feature_weights):
    marker = tmp_path / "MARKER"
    key, value = _payloads(marker)[payload]
    if entry == "first stage of task=cache_latents":
        source = tiny_runs.root / "experiments" / "ae" / "checkpoints" / "last.ckpt"
        key = "net." + key.split(".", 1)[-1] if "." in key else "net.extra"
    else:
        source = tiny_runs.ldm_ckpt
    checkpoint = torch.load(source, weights_only=True)
    _plant(checkpoint[CONFIG_KEY]["model"], key, value)
    run_dir = tmp_path / "experiments" / "victim"
    crafted = run_dir / "checkpoints" / "last.ckpt"
    crafted.parent.mkdir(parents=True)
    if entry == "load_module .safetensors":
        crafted = save_safetensors(crafted.with_suffix(".safetensors"), checkpoint["state_dict"],
                                   {CONFIG_KEY: checkpoint[CONFIG_KEY], "global_step": 1})
    else:
        torch.save(checkpoint, crafted)

    with pytest.raises(Exception) as refused:
        if entry.startswith("load_module"):
            load_module(crafted)
        else:
            from ldm.tasks import cache_latents, evaluate, sample

            task = {"task=sample": sample, "task=evaluate": evaluate, "first stage of task=cache_latents": cache_latents}
            name = "shapes_autoencoder" if "cache" in entry else "shapes_txt2img"
            overrides = [f"paths.root_dir={tmp_path}", "name=victim", f"task={entry.split('=')[1].split()[0]}"]
            if "cache" not in entry:
                overrides += ["task.steps=2", "eval.num_samples=2", "eval.resolution=16",
                              f"eval.feature_weights={shapes_feature_weights}"]
            with restored_environ():
                task[entry].run(compose_run(name, overrides))
    message = str(refused.value) + str(refused.value.__cause__ or "")
    assert re.search(r"refusing|interpolation", message), message
    assert not marker.exists() and not resolver_marker.exists()


def test_a_pickle_payload_in_a_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "MARKER"

    class Payload:
        def __reduce__(self):
            import os

            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, CONFIG_KEY: {}, "x": Payload()}, path)
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        load_module(path)
    assert not marker.exists()


def test_the_allow_list_is_exact_and_the_user_extends_it_from_their_own_config(tmp_path):
    with pytest.raises(PermissionError, match="`torch.utils.collect_env.run` at `_target_`"):
        safe_instantiate({"_target_": "torch.utils.collect_env.run"}, stored=False)
    with pytest.raises(PermissionError, match="security.allow=\\[pathlib.PurePosixPath\\]"):
        safe_instantiate({"_target_": "pathlib.PurePosixPath", "_args_": ["a"]}, stored=False)
    allow_targets(["pathlib.PurePosixPath"])  # what a task does with the user's security.allow
    assert str(safe_instantiate({"_target_": "pathlib.PurePosixPath", "_args_": ["a"]}, stored=False)) == "a"
    with pytest.raises(PermissionError, match="exact dotted names"):
        allow_targets(["torch."])


def test_every_torch_load_in_the_package_is_weights_only():
    calls = [(p, line) for p in sorted((ROOT / "ldm").rglob("*.py")) for line in p.read_text().splitlines()
             if "torch.load(" in line]
    assert calls and all("weights_only=True" in line for _, line in calls), calls


@pytest.mark.slow
def test_a_stored_payload_through_main_is_one_line(tiny_runs, tmp_path):
    marker = tmp_path / "MARKER"
    checkpoint = torch.load(tiny_runs.ldm_ckpt, weights_only=True)
    checkpoint[CONFIG_KEY]["model"]["backbone"] = {"_target_": "torch.utils.collect_env.run", "command": f"touch {marker}"}
    crafted = tmp_path / "experiments" / "victim" / "checkpoints" / "last.ckpt"
    crafted.parent.mkdir(parents=True)
    torch.save(checkpoint, crafted)
    result = subprocess.run([sys.executable, "main.py", "+experiment=shapes_txt2img", f"paths.root_dir={tmp_path}",
                             "name=victim", "task=sample", "task.steps=2"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and not marker.exists()
    [line] = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith("error: refusing to instantiate `torch.utils.collect_env.run` at `backbone._target_`")
