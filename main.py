"""ldm entry point: `python main.py +experiment=NAME [task=fit|cache_latents|sample|evaluate] [overrides]`."""
import importlib
import os
import sys

# Before torch loads OpenMP: idle threads sleep instead of spinning. With spinning threads, one other busy
# process on the same cores made a CPU training step 9x slower (benchmarks/RESULTS.md); override if you like.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

try:
    from ldm.utils.errors import ConfigError, CorruptDataError, DivergedError
    from ldm.utils.sweep_dirs import with_sweep_dirnames
except ImportError as error:  # e.g. a torch older than ldm needs (ldm/__init__.py): one line, not a traceback
    sys.exit(f"error: {error}")

CLEAR_ERRORS = (ConfigError, CorruptDataError, DivergedError, FileNotFoundError, MissingMandatoryValue, PermissionError)


def _clear_cause(error: BaseException) -> BaseException | None:
    """The first error in the chain that already explains itself (so users see it, not a deep traceback)."""
    while error is not None:
        if isinstance(error, CLEAR_ERRORS):
            return error
        error = error.__cause__ or error.__context__
    return None


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    cfg.paths.run_dir = HydraConfig.get().runtime.output_dir  # a sweep job's own directory (sweep_dirs.py)
    task = importlib.import_module(f"ldm.tasks.{cfg.task.name}")
    try:
        task.run(cfg)
    except (InstantiationException, *CLEAR_ERRORS) as error:
        cause = _clear_cause(error)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    sys.argv = with_sweep_dirnames(sys.argv)
    main()
