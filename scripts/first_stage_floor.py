"""A first stage's ceiling before any diffusion training: an experiment's eval suite on real images after each given
autoencoder checkpoint's round trip (encode to the posterior mean, decode, 8 bits), beside the real images:

    python scripts/first_stage_floor.py shapes_txt2img_dit experiments/shapes_autoencoder/checkpoints/step-*.ckpt \
        [--set eval.num_samples=100 ...]

No latent model trained on that first stage scores above its column (`task=evaluate` prints the same column for the
checkpoint it evaluates). Prints one table; `--json FILE` also writes {checkpoint: metrics, "real images": metrics}.
"""
import argparse
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console
from rich.table import Table

from ldm.models.first_stage import load_first_stage, round_trip
from ldm.utils.atomic import atomic_write_json
from ldm.utils.cli import one_line
from ldm.utils.errors import ConfigError
from ldm.utils.safe_config import safe_instantiate

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("experiment", help="an experiment with an `eval` suite, e.g. shapes_txt2img_dit")
    parser.add_argument("ckpts", nargs="+", help="autoencoder (or latent diffusion) checkpoints")
    parser.add_argument("--json", default=None, help="also write the metrics to this file")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. eval.seed=3")
    args = parser.parse_args()
    try:  # a misspelt experiment or key, a missing checkpoint: one line, not a traceback
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            cfg = compose("config", overrides=[f"experiment={args.experiment}", *args.set])
        suite = safe_instantiate(cfg.eval, stored=False, where="eval")
        first_stages = {ckpt: load_first_stage(ckpt) for ckpt in args.ckpts}
    except (HydraException, OmegaConfBaseException, ConfigError, FileNotFoundError) as error:
        raise SystemExit(f"first_stage_floor.py: {one_line(str(error))}") from None
    floors = {ckpt: suite.floor(round_trip(first_stage)) for ckpt, first_stage in first_stages.items()}
    floors["real images"] = suite.floor()
    table = Table(title=f"{suite.name} suite after the first stage")
    table.add_column("metric")
    for name in floors:
        table.add_column(name, justify="right")
    for metric in floors["real images"]:
        table.add_row(metric, *(f"{f[metric]:.4f}" for f in floors.values()))
    Console(width=200).print(table)
    if args.json:
        atomic_write_json(Path(args.json), floors)


if __name__ == "__main__":
    main()
