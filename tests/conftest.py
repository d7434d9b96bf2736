"""Shared test helpers: compose the project's Hydra config exactly as main.py does."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))


def compose_experiment(name: str, overrides: list[str] = ()):
    """The config `python main.py +experiment=NAME *overrides` would run (hydra node included)."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("config", overrides=[f"+experiment={name}", *overrides], return_hydra_config=True)


@pytest.fixture
def compose_cfg():
    return compose_experiment
