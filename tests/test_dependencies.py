"""Every third-party import is a declared dependency: the package's in `dependencies`, the tests' in the `test`
extra; and an older torch than the floor stops at import with one line."""
import ast
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
FIRST_PARTY = {"ldm"} | {p.stem for p in (ROOT / "tests").rglob("*.py")}  # the tests' own helper modules


def third_party_imports(files) -> dict[str, str]:
    """{top-level module: first file importing it} for absolute imports outside the standard library."""
    found = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in FIRST_PARTY:
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def declared(requirements: list[str]) -> set[str]:
    return {Requirement(r).name.lower().replace("_", "-") for r in requirements}


def undeclared(modules: dict[str, str], allowed: set[str]) -> list[str]:
    distributions = packages_distributions()
    missing = []
    for module, where in sorted(modules.items()):
        names = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        if not names & allowed:
            missing.append(f"{module} (distribution {sorted(names)}, imported in {where})")
    return missing


def test_the_package_declares_every_import():
    modules = third_party_imports([*sorted((ROOT / "ldm").rglob("*.py")), ROOT / "main.py"])
    assert {"torch", "lightning", "hydra", "scipy", "huggingface_hub"} <= set(modules)  # the parser sees them
    assert not undeclared(modules, declared(PROJECT["dependencies"])), "declare in pyproject.toml dependencies"


def test_the_tests_declare_every_import_in_the_test_extra():
    modules = third_party_imports(sorted((ROOT / "tests").rglob("*.py")))
    allowed = declared(PROJECT["dependencies"]) | declared(PROJECT["optional-dependencies"]["test"])
    allowed |= {"packaging"}  # pip's own, present wherever pip installed the package
    assert not undeclared(modules, allowed), "declare in the `test` extra of pyproject.toml"


@pytest.mark.slow
def test_an_older_torch_stops_main_with_one_line():
    fake_old_torch = ("import runpy, sys, torch; torch.__version__ = '2.5.1'; sys.argv = ['main.py']; "
                      "runpy.run_path('main.py', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", fake_old_torch], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip() == "error: ldm needs torch >= 2.6, found 2.5.1: pip install 'torch>=2.6'"


def test_the_conda_file_installs_this_package_from_conda_forge_and_pip():
    """The `pytorch` conda channel stops at torch 2.5, below the floor: the env file takes Python from conda-forge
    and everything else through pip from pyproject.toml, so conda and pip users get the same versions."""
    env = yaml.safe_load((ROOT / "environment.yaml").read_text())
    assert env["channels"] == ["conda-forge"]
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    assert not [d for d in conda if d.split("=")[0] not in {"python", "pip"}], "everything else comes from pip"
    [pip] = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    assert pip == ["-e .[test,cluster,tensorboard]"]
    assert set(PROJECT["optional-dependencies"]) - {"dev"} == {"test", "cluster", "tensorboard"}  # every extra
