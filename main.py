"""ldm entry point: `python main.py +experiment=NAME [task=fit|cache_latents|sample|evaluate|export] [overrides]`."""
import importlib
import os
import sys
from pathlib import Path

# Before torch loads OpenMP: idle threads sleep instead of spinning. With spinning threads, one other busy
# process on the same cores made a CPU training step 9x slower (benchmarks/RESULTS.md); override if you like.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

try:
    from ldm.utils import cli
    from ldm.utils.errors import ConfigError, CorruptDataError, DivergedError
    from ldm.utils.sweep_dirs import with_sweep_dirnames
except ImportError as error:  # e.g. a torch older than ldm needs (ldm/__init__.py): one line, not a traceback
    sys.exit(f"error: {error}")

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
CLEAR_ERRORS = (ConfigError, CorruptDataError, DivergedError, FileNotFoundError, MissingMandatoryValue, PermissionError)


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    cfg.paths.run_dir = HydraConfig.get().runtime.output_dir  # a sweep job's own directory (sweep_dirs.py)
    task = importlib.import_module(f"ldm.tasks.{cfg.task.name}")
    try:
        task.run(cfg)
    except Exception as error:  # one line, unless the user asked for the traceback
        if cli.full_errors(cfg.get("debug", False)):
            os.environ["HYDRA_FULL_ERROR"] = "1"  # else Hydra prints errors raised while building objects compactly
            raise
        clear = cli.clear_cause(error, CLEAR_ERRORS)
        print(f"error: {cli.task_error_line(error, clear)}", file=sys.stderr)
        sys.exit(2 if clear is not None else 1)


if __name__ == "__main__":
    sys.argv = with_sweep_dirnames(cli.normalise_experiment(sys.argv))
    problem = cli.usage_problem(sys.argv, CONFIG_DIR) or cli.composition_problem(sys.argv, CONFIG_DIR, "config")
    if problem is not None and not cli.full_errors("debug=true" in sys.argv):
        sys.exit(f"error: {problem}")
    main()
