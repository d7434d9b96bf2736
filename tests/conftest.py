"""Shared test helpers: compose the project's Hydra config exactly as main.py does; tiny end-to-end runs."""
import contextlib
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from tiny_sizes import QUIET, ROOT, TINY_AE, TINY_CACHE, TINY_LDM, TINY_TEXT, TINY_TXT2IMG, TINY_UNET  # noqa: F401

CONFIGS = ROOT / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))


def compose_experiment(name: str, overrides: list[str] = ()):
    """The config `python main.py +experiment=NAME *overrides` would run (hydra node included)."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("config", overrides=[f"experiment={name}", *overrides], return_hydra_config=True)


@pytest.fixture
def compose_cfg():
    return compose_experiment


# --- tiny end-to-end runs shared by the latent-diffusion, sample and resume tests ---------------------------

# the sizes live in tiny_sizes.py (imported by launched processes too); re-exported here for the tests


def compose_run(name: str, overrides: list[str] = ()):
    """The config a task receives from `main.py +experiment=NAME *overrides` (no hydra node), for in-process runs."""
    cfg = compose_experiment(name, overrides)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


@contextlib.contextmanager
def restored_environ():
    """Undo what an in-process run leaves in os.environ (Lightning's seed_everything sets PL_GLOBAL_SEED)."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def run_main(*overrides: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python main.py *overrides` in a subprocess (DDP re-launches sys.argv: never run it inside pytest)."""
    return subprocess.run([sys.executable, "main.py", *overrides], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads; on shared CPUs OpenMP contention made them ~10x slower. A module opts
    in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to resolve or connect to a host fails, as on a machine without internet."""

    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


TINY_CLIP = "ldm-test-tiny-clip"


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    """Register a tiny open_clip architecture (random weights are cheap to build); returns its model name."""
    import open_clip

    path = tmp_path_factory.mktemp("open_clip") / f"{TINY_CLIP}.json"
    path.write_text(json.dumps({
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3},
    }))
    open_clip.add_model_config(path)
    return TINY_CLIP


@pytest.fixture(scope="session")
def shapes_feature_weights(tmp_path_factory) -> Path:
    """The shapes feature network (FID space of ShapesSuite), trained once per test session."""
    from ldm.eval.shapes_features import shapes_feature_net

    weights = tmp_path_factory.mktemp("eval") / "shapes_features.pt"
    shapes_feature_net(weights)
    return weights


@dataclass
class TinyRuns:
    """A tiny shapes autoencoder run `ae` with its latent cache, and a txt2img run `ldm` trained on that cache."""

    root: Path
    ldm_overrides: list[str]  # what main.py needs (besides +experiment=shapes_txt2img) to address the ldm run
    ldm_steps: int
    ldm_trainer: object  # the in-process Trainer: its lightning_module is the model that wrote last.ckpt

    @property
    def ldm_ckpt(self) -> Path:
        return self.root / "experiments" / "ldm" / "checkpoints" / "last.ckpt"

    @property
    def cache(self) -> Path:
        return self.root / "data" / "latents" / "ae"


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory) -> TinyRuns:
    """The README flow in miniature, in-process: fit autoencoder (4 steps), cache latents, fit txt2img (12 steps)."""
    from ldm.tasks import cache_latents, fit  # here, so collecting unrelated test files does not import Lightning

    root = tmp_path_factory.mktemp("tiny_runs")
    where = [f"paths.root_dir={root}"]
    ldm_overrides = [*where, "name=ldm", "first_stage_name=ae", *TINY_TXT2IMG]
    steps = 12
    with restored_environ():
        fit.run(compose_run("shapes_autoencoder", [*where, "name=ae", *TINY_AE, "trainer.max_steps=4",
                                                   "trainer.val_check_interval=4", "callbacks=none"]))
        cache_latents.run(compose_run("shapes_autoencoder", [*where, "name=ae", *TINY_CACHE]))
        trainer = fit.run(compose_run("shapes_txt2img", [*ldm_overrides, f"trainer.max_steps={steps}",
                                                         "trainer.val_check_interval=6", "trainer.log_every_n_steps=3"]))
    return TinyRuns(root, ldm_overrides, steps, trainer)


def pytest_addoption(parser):
    # make test runs a CI-sized number of tries; the full rehearsal: pytest tests/faults/test_stops.py --stop-tries=20
    parser.addoption("--stop-tries", type=int, default=2, help="tries of each stop-by-signal fault test")


@pytest.fixture
def stop_tries(request) -> int:
    return request.config.getoption("--stop-tries")


@pytest.fixture(scope="session")
def inception_weights_file(tmp_path_factory) -> Path:
    """torch-fidelity's Inception-v3, randomly initialised (seed 0), saved as a local weights file: stands in for
    pt_inception-2015-12-05, which tests may not download. Both ldm and torch-fidelity load it from this path.

    He-normal convolutions keep the activations' scale through the 94 layers (PyTorch's default init shrinks pool3
    features to ~1e-8, where FID is round-off), so the distances compared are of order one."""
    from unittest import mock

    import torch
    from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

    with mock.patch.object(tf_inception, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda *a: None), \
            torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "inception-random.pth"
    torch.save(net.state_dict(), path)
    return path
