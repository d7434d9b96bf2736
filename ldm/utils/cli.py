"""The command line before and around Hydra: both spellings of the experiment, a usage line when none is given,
config mistakes as one line (not Hydra's multi-line report), and one-line task errors.

The full traceback stays available: `debug=true`, or Hydra's own `HYDRA_FULL_ERROR=1`.
"""
import errno
import os
import re
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException, InstantiationException
from omegaconf.errors import OmegaConfBaseException


def normalise_experiment(argv: list[str]) -> list[str]:
    """`+experiment=x` and `experiment=x` both work: the group has a null default, so Hydra wants the latter."""
    return [a.replace("+experiment=", "experiment=", 1) if a.startswith("+experiment=") else a for a in argv]


def overrides_of(argv: list[str]) -> list[str]:
    return [a for a in argv[1:] if not a.startswith("-")]


def usage_problem(argv: list[str], config_dir: Path) -> str | None:
    """The usage line when no experiment (and no run name) is given; None otherwise."""
    keys = {a.split("=", 1)[0].lstrip("+~") for a in overrides_of(argv)}
    if keys & {"experiment", "name"} or any(a in ("-h", "--help", "--info", "--cfg") for a in argv):
        return None
    names = ", ".join(sorted(p.stem for p in (config_dir / "experiment").glob("*.yaml")))
    return f"usage: python main.py +experiment=NAME [task=fit|cache_latents|sample|evaluate|export] [key=value ...]; " \
           f"experiments: {names}"


def one_line(text: str) -> str:
    """A multi-line Hydra/OmegaConf report as one line: object_type, the config search path and blank lines dropped,
    a list of available options joined by commas."""
    parts: list[str] = []
    listing = False  # inside "Available options in 'group':" followed by one option per line
    for line in (line.strip() for line in str(text).splitlines()):
        if line.startswith("Config search path"):
            break
        if not line or line.startswith(("object_type", "Set the environment variable HYDRA_FULL_ERROR")):
            continue
        if listing and " " not in line:
            parts[-1] += f"{'' if parts[-1].endswith(':') else ','} {line}"
            continue
        listing = line.startswith("Available options")
        parts.append(line.rstrip("."))
    return "; ".join(parts)


def composition_problem(argv: list[str], config_dir: Path, config_name: str) -> str | None:
    """Compose the config as Hydra will (single runs; a sweep composes per job); a mistake as one line, else None."""
    if any(a in ("-m", "--multirun") for a in argv):
        return None
    overrides = [a for a in overrides_of(argv) if not a.startswith(("hydra.", "hydra/"))]
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            compose(config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as error:
        return one_line(error)
    return None


def task_error_line(error: BaseException, clear: BaseException | None) -> str:
    """One line for an error raised by a task: a clear error as it is, a full disk with the fix, anything else with
    its type and how to see the traceback."""
    disk_full = next((e for e in _chain(error) if isinstance(e, OSError) and e.errno == errno.ENOSPC), None)
    if disk_full is not None:
        where = f" writing {disk_full.filename}" if disk_full.filename else ""
        return f"no space left on device{where}: free space or point paths.root_dir at a larger disk " \
               f"(the last checkpoint is intact: writes are atomic)"
    if clear is not None:
        return one_line(clear)
    line = building_error(error) or f"{type(error).__name__}: {one_line(error)}"
    return f"{line} (debug=true shows the traceback)"


def building_error(error: BaseException) -> str | None:
    """A constructor's own error, named by its config key and target, in place of Hydra's wrapper around it."""
    wrapper = next((e for e in _chain(error) if isinstance(e, InstantiationException) and e.__cause__), None)
    if wrapper is None:
        return None
    key, target = re.search(r"full_key: (\S+)", str(wrapper)), re.search(r"target '([^']+)'", str(wrapper))
    cause = wrapper.__cause__
    where = f"`{key.group(1)}`" if key else "building an object"
    if target:
        where += f" ({target.group(1)})"
    return f"{where}: {type(cause).__name__}: {one_line(cause)}"


def _chain(error: BaseException | None):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def clear_cause(error: BaseException, clear_types: tuple[type[BaseException], ...]) -> BaseException | None:
    """The first error in the chain that already explains itself (so users see it, not a deep traceback)."""
    return next((e for e in _chain(error) if isinstance(e, clear_types)), None)


def full_errors(debug: bool) -> bool:
    """Whether to show tracebacks: `debug=true`, or Hydra's HYDRA_FULL_ERROR=1."""
    return bool(debug) or os.environ.get("HYDRA_FULL_ERROR") == "1"
