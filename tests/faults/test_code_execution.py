"""No code runs from a checkpoint, a .safetensors export or a cache: each payload below, planted in a checkpoint
(a hand-made one for the loading helper, a real tiny one for the tasks and main.py), is refused with one line and
leaves its marker file absent; the same payloads against an unguarded loader do create it."""
import ast
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

import ldm.utils.checkpoint
from conftest import CONFIGS, ROOT, TINY_AE, compose_run, restored_environ
from ldm.data.latent_cache.format import FORMAT, MANIFEST, VERSION
from ldm.data.latents import LatentDataModule
from ldm.nn.conditioners import ClassConditioner
from ldm.utils.checkpoint import CONFIG_KEY, FIRST_STAGE_CONFIG_KEY, load_module
from ldm.utils.consolidate import save_safetensors
from ldm.utils.safe_config import ALLOWED_TARGETS, allow_targets, safe_instantiate


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
                overrides += ["sampling.steps=2", "eval.num_samples=2", "eval.held_out_samples=0", "eval.resolution=16",
                              f"eval.feature_weights={shapes_feature_weights}"]
            with restored_environ():
                task[entry].run(compose_run(name, overrides))
    message = str(refused.value) + str(refused.value.__cause__ or "")
    assert re.search(r"refusing|interpolation", message), message
    assert not marker.exists() and not resolver_marker.exists()


class PicklePayload:
    """Unpickling this runs `touch marker` (what a full torch.load would do with it)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_pickle_payload_in_a_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, CONFIG_KEY: {}, "x": PicklePayload(marker)}, path)
    with pytest.raises(PermissionError, match=r"^refusing checkpoint .*evil.ckpt: it pickles (posix|os|nt)\.system, "):
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
    calls, unsafe = 0, []
    for path in [ROOT / "main.py", *sorted((ROOT / "ldm").rglob("*.py"))]:
        tree = ast.parse(path.read_text())
        # `torch.load(...)`, and `load(...)` where `from torch import load` made that name
        names = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "torch"
                 for a in n.names if a.name == "load"}
        for node in ast.walk(tree):
            func = getattr(node, "func", None)
            if isinstance(node, ast.Call) and (ast.unparse(func) == "torch.load" or ast.unparse(func) in names):
                calls += 1
                if not any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in node.keywords):
                    unsafe.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert calls and not unsafe, f"torch.load without weights_only=True: {unsafe}"


@pytest.mark.slow
@pytest.mark.parametrize("payload", ["stored config", "pickle"])
def test_a_stored_payload_through_main_is_one_line(tiny_runs, tmp_path, payload):
    marker = tmp_path / "MARKER"
    checkpoint = torch.load(tiny_runs.ldm_ckpt, weights_only=True)
    if payload == "pickle":
        checkpoint["x"] = PicklePayload(marker)
    else:
        checkpoint[CONFIG_KEY]["model"]["backbone"] = {"_target_": "torch.utils.collect_env.run",
                                                       "command": f"touch {marker}"}
    crafted = tmp_path / "experiments" / "victim" / "checkpoints" / "last.ckpt"
    crafted.parent.mkdir(parents=True)
    torch.save(checkpoint, crafted)
    result = subprocess.run([sys.executable, "main.py", "+experiment=shapes_txt2img", f"paths.root_dir={tmp_path}",
                             "name=victim", "task=sample", "sampling.steps=2"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and not marker.exists()
    [line] = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith(f"error: refusing checkpoint {crafted}: it pickles" if payload == "pickle" else
                           "error: refusing to instantiate `torch.utils.collect_env.run` at `model.backbone._target_`")


# --- the loading helper on hand-made checkpoints: cheap, so every payload runs in `make test` -------------------

MODEL = {"_target_": "ldm.nn.conditioners.ClassConditioner", "num_classes": 2, "dim": 4}


def _extra(value) -> Callable[[dict], None]:
    """Plant `value` as a keyword of the stored model config: Hydra builds nested targets before the model."""
    return lambda ckpt: ckpt[CONFIG_KEY]["model"].update(extra=value)


def _stored_payloads(marker: Path) -> dict[str, tuple[Callable[[dict], None], str, bool]]:
    """name -> (plant it in a checkpoint dict, what the refusal says, whether an unguarded loader would run it:
    hydra-core 1.3.8 blocks os.system and subprocess.run itself, not torch.utils.collect_env.run)."""
    touch = f"touch {marker}"
    run = {"_target_": "torch.utils.collect_env.run", "command": touch}
    return {
        "collect_env.run": (_extra(run), "`torch.utils.collect_env.run` at `model.extra._target_`", True),
        "os.system with _args_": (_extra({"_target_": "os.system", "_args_": [touch]}),
                                  "`os.system` at `model.extra._target_`", False),
        "subprocess.run": (_extra({"_target_": "subprocess.run", "args": ["touch", str(marker)]}),
                           "`subprocess.run` at `model.extra._target_`", False),
        "nested in a list": (_extra([1, run]), "`torch.utils.collect_env.run` at `model.extra[1]._target_`", True),
        "nested in a dict": (_extra({"deep": {"more": run}}),
                             "`torch.utils.collect_env.run` at `model.extra.deep.more._target_`", True),
        "_args_": (_extra({"_target_": "torch.utils.collect_env.run", "_args_": [touch]}),
                   "`torch.utils.collect_env.run` at `model.extra._target_`", True),
        "_partial_": (_extra({**run, "_partial_": True}), "`torch.utils.collect_env.run` at `model.extra._target_`",
                      False),
        "oc.env": (_extra("${oc.env:HOME}"), "`model.extra` holds an interpolation ('${oc.env:HOME}')", False),
        "oc.decode": (_extra("${oc.decode:'{a: 1}'}"), "`model.extra` holds an interpolation", False),
        "custom resolver": (lambda c: c[CONFIG_KEY]["model"].update(num_classes="${ldm_test_touch:}"),
                            "`model.num_classes` holds an interpolation ('${ldm_test_touch:}')", True),
        "resolver in a tuple": (_extra(("${ldm_test_touch:}",)), "`model.extra[0]` holds an interpolation", True),
        "config as YAML text": (lambda c: c.update({CONFIG_KEY: "model:\n  _target_: ldm.nn.conditioners.Class"
                                                   "Conditioner\n  num_classes: ${ldm_test_touch:}\n  dim: 4\n"}),
                                "a str, not the mapping ldm writes", True),
        "first stage config as text": (lambda c: c.update({FIRST_STAGE_CONFIG_KEY: "a: ${ldm_test_touch:}"}),
                                       "a str, not the mapping ldm writes", True),
        "stored security.allow": (lambda c: (c[CONFIG_KEY].update(security={"allow": [run["_target_"]]}),
                                             _extra(run)(c)),
                                  "`torch.utils.collect_env.run` at `model.extra._target_`", True),
        "pipe: URL": (_extra({"url": f"pipe:{touch}"}), "stored command-running input at `model.extra.url`", False),
    }


def _stored_checkpoint(path: Path, plant: Callable[[dict], None] = lambda ckpt: None) -> Path:
    """A checkpoint of a ClassConditioner with its config stored as fit stores it, `plant` applied, as .ckpt or
    .safetensors (config in the metadata) by the suffix of `path`."""
    ckpt = {CONFIG_KEY: {"model": dict(MODEL), "security": {"allow": []}}, "global_step": 1,
            "state_dict": ClassConditioner(num_classes=2, dim=4).state_dict()}
    plant(ckpt)
    if path.suffix == ".safetensors":
        return save_safetensors(path, ckpt.pop("state_dict"), ckpt)
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_a_clean_hand_made_checkpoint_loads(tmp_path, suffix):
    module, cfg, _ = load_module(_stored_checkpoint(tmp_path / f"clean{suffix}"))
    assert isinstance(module, ClassConditioner) and cfg.model.num_classes == 2


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
@pytest.mark.parametrize("payload", list(_stored_payloads(Path("/x"))))
def test_a_stored_payload_is_refused_before_anything_reads_it(tmp_path, resolver_marker, payload, suffix):
    marker = tmp_path / "MARKER"
    plant, refusal, _ = _stored_payloads(marker)[payload]
    path = _stored_checkpoint(tmp_path / f"victim{suffix}", plant)
    with pytest.raises(PermissionError) as refused:
        load_module(path)
    assert refusal in str(refused.value) and str(path) in str(refused.value) and "\n" not in str(refused.value)
    assert not marker.exists() and not resolver_marker.exists()


@pytest.mark.parametrize("payload", [name for name, (*_, live) in _stored_payloads(Path("/x")).items() if live])
def test_the_payloads_are_live_against_an_unguarded_loader(tmp_path, resolver_marker, payload, monkeypatch):
    """Without the checks (OmegaConf.create and plain instantiate) each payload runs: the tests above mean something."""
    marker = tmp_path / "MARKER"
    monkeypatch.setattr(ldm.utils.checkpoint, "stored_config", lambda raw, source: OmegaConf.create(raw))
    monkeypatch.setattr(ldm.utils.checkpoint, "safe_instantiate", lambda cfg, **kwargs: instantiate(cfg))
    try:
        load_module(_stored_checkpoint(tmp_path / "victim.ckpt", _stored_payloads(marker)[payload][0]))
    except Exception:  # the model may not accept what the payload left behind: it ran already
        pass
    ran = marker.exists() or resolver_marker.exists()
    resolver_marker.unlink(missing_ok=True)  # shared with the other tests of this module
    assert ran


@pytest.mark.parametrize("name", ["pipe:touch MARKER", "../../elsewhere/shard-000000.tar", "/tmp/shard-000000.tar"])
def test_a_cache_manifest_names_only_its_own_shards(tmp_path, name):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / MANIFEST).write_text(json.dumps({"format": FORMAT, "version": VERSION, "shards": [{"name": name}]}))
    with pytest.raises(PermissionError, match=r"refusing latent cache .*names shard 0 .*not shard-000000.tar"):
        LatentDataModule(train_path=str(cache))
    assert not (ROOT / "MARKER").exists() and not (tmp_path / "MARKER").exists()


def _targets(node) -> set[str]:
    """Every `_target_` value in a plain config tree."""
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    own = {node["_target_"]} if isinstance(node, dict) and "_target_" in node else set()
    return own.union(*(_targets(child) for child in children))


def test_the_allow_list_is_every_target_of_the_configs():
    """Exactly the `_target_`s of the configs (Hydra's own launchers aside), each an existing callable: a target
    added to a config without the list would be refused, a stale name would admit whatever takes its place."""
    from hydra._internal.utils import _locate

    used = set().union(*(_targets(OmegaConf.to_container(OmegaConf.load(path))) for path in CONFIGS.rglob("*.yaml")
                         if "hydra" not in path.relative_to(CONFIGS).parts))
    assert used - ALLOWED_TARGETS == set(), "add these to ALLOWED_TARGETS in ldm/utils/safe_config.py"
    assert ALLOWED_TARGETS - used == set(), "no config uses these: remove them from ALLOWED_TARGETS"
    assert [name for name in ALLOWED_TARGETS if not callable(_locate(name))] == []


@pytest.mark.slow
def test_security_allow_on_the_command_line_lets_a_target_through(tmp_path):
    target = "lightning.pytorch.callbacks.ModelSummary"  # harmless, not on the list, and it says when it is used
    run = ["+experiment=shapes_autoencoder", "name=allow", f"paths.root_dir={tmp_path}", *TINY_AE,
           "trainer.max_steps=1", "callbacks=none", f"+callbacks.summary._target_={target}"]
    run.remove("trainer.enable_model_summary=false")  # Lightning says so when a ModelSummary callback replaces its own
    refused = subprocess.run([sys.executable, "main.py", *run], cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [line for line in refused.stderr.splitlines() if line.strip() and not line.startswith(("INFO", "["))]
    assert refused.returncode == 2 and lines == [f"error: refusing to instantiate `{target}` at `callbacks.summary._target_`: not on "
                                      f"the allow-list of classes and functions (add it from your own command line "
                                      f"with security.allow=[{target}] if you trust it)"]
    allowed = subprocess.run([sys.executable, "main.py", *run, f"security.allow=[{target}]"], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "already configured with model summary callbacks: [<class 'lightning.pytorch.callbacks.model_summary." \
           "ModelSummary'>]" in allowed.stdout + allowed.stderr
