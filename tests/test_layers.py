"""The layer contract: every import inside ldm/ (module- or function-level) points down the layer order, and
main.py reaches only tasks and utils.

Order (lowest first): utils -> nn, diffusion (independent of each other) -> data -> eval -> models -> interop
(Stable Diffusion / diffusers key maps) -> callbacks -> tasks -> main.py. `eval` (metrics as pure functions) sits below `models`, whose autoencoder validates with PSNR.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [{"utils"}, {"nn", "diffusion"}, {"data"}, {"eval"}, {"models"}, {"interop"}, {"callbacks"}, {"tasks"}]
RANK = {package: rank for rank, layer in enumerate(LAYERS) for package in layer}
MAIN_MAY_IMPORT = {"tasks", "utils"}


def ldm_imports(source: str, module: str) -> list[tuple[int, str]]:
    """(line, dotted name) of every ldm module that `source` (the module `module`) imports, at any depth: import
    statements (relative ones resolved) and importlib.import_module calls whose name starts with a literal."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import x / from ..pkg import x
                parent = module.split(".")[: -node.level]
                base = ".".join(parent + ([base] if base else []))
            # `from ldm import data` imports ldm.data; `from ldm.data import x` imports from ldm.data
            found += [(node.lineno, f"{base}.{alias.name}" if base == "ldm" else base) for alias in node.names]
        elif isinstance(node, ast.Call) and "import_module" in (getattr(node.func, n, None) for n in ("attr", "id")):
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
                arg = arg.values[0]  # f"ldm.tasks.{name}": the literal prefix names the package
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.append((node.lineno, arg.value))
    return sorted({(line, name) for line, name in found if name == "ldm" or name.startswith("ldm.")})


def package_of(dotted: str) -> str | None:
    """ldm.<package>.module -> <package> (None for `ldm` itself)."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 and parts[1] else None


def test_imports_flow_down_the_layers():
    violations = []
    for path in sorted((ROOT / "ldm").rglob("*.py")):
        relative = path.relative_to(ROOT)
        module = ".".join(relative.with_suffix("").parts)
        if len(relative.parts) == 2:  # ldm/__init__.py: no package of its own
            continue
        own = relative.parts[1]
        assert own in RANK, f"{relative}: package `{own}` has no place in the layer order; add it to LAYERS"
        for line, name in ldm_imports(path.read_text(), module):
            target = package_of(name)
            if target is None or target not in RANK:
                violations.append(f"{relative}:{line} imports {name} (not a package of the layer order)")
            elif target != own and RANK[target] >= RANK[own]:
                allowed = sorted(p for p in RANK if RANK[p] < RANK[own])
                violations.append(f"{relative}:{line} imports {name}: `{own}` may import only {allowed} and itself")
    assert not violations, "imports against the layer order:\n" + "\n".join(violations)


def test_main_reaches_only_tasks_and_utils():
    imports = ldm_imports((ROOT / "main.py").read_text(), "main")
    assert imports, "main.py imports nothing from ldm: the checker missed its imports"
    bad = [f"main.py:{line} imports {name}" for line, name in imports if package_of(name) not in MAIN_MAY_IMPORT]
    assert not bad, "main.py may import only ldm.tasks and ldm.utils:\n" + "\n".join(bad)


def test_checker_sees_nested_relative_and_dynamic_imports():
    source = (
        "import os\n"
        "from ldm import data\n"
        "def f():\n"
        "    from ldm.models.generate import render\n"
        "    from ..tasks import sample\n"
        "    importlib.import_module(f'ldm.tasks.{name}')\n"
    )
    assert ldm_imports(source, "ldm.callbacks.periodic_eval") == [
        (2, "ldm.data"), (4, "ldm.models.generate"), (5, "ldm.tasks"), (6, "ldm.tasks."),
    ]
