"""Sweep jobs get their own run directories: `-m model.lr=1e-4,2e-4` trains experiments/<name>/model.lr=0.0001
and experiments/<name>/model.lr=0.0002, not two jobs in (and resuming) one directory.

Hydra names a job's directory `hydra.sweep.subdir = ${hydra.job.override_dirname}` (configs/config.yaml), built from
the job's overrides minus `exclude_keys`. Only the parameters that are swept should name it: a one-job `-m` (a
SLURM submission) keeps experiments/<name>/, whatever else is overridden, and a re-submitted sweep finds its jobs'
directories again. Which overrides are sweeps is known only on the command line, so it is decided there.
"""
from hydra.core.override_parser.overrides_parser import OverridesParser

ALWAYS_EXCLUDED = ("name",)  # a swept name already gives each job its own experiments/<name>/


def is_multirun(argv: list[str]) -> bool:
    return any(arg in ("-m", "--multirun") for arg in argv)


def with_sweep_dirnames(argv: list[str]) -> list[str]:
    """argv plus `hydra.job.config.override_dirname.exclude_keys=[...]` naming every non-swept override, so that a
    multirun job's directory is named by its swept parameters alone (unchanged argv outside multirun)."""
    if not is_multirun(argv):
        return argv
    candidates = [a for a in argv[1:] if ("=" in a or a.startswith("~")) and not a.startswith(("-", "hydra.", "hydra/"))]
    overrides = OverridesParser.create().parse_overrides(candidates)
    fixed = {o.key_or_group for o in overrides if not o.is_sweep_override()}
    excluded = sorted(fixed | set(ALWAYS_EXCLUDED))
    return [*argv, f"hydra.job.config.override_dirname.exclude_keys=[{','.join(excluded)}]"]
