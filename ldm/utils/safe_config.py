"""Instantiate configs with targets from an exact allow-list; refuse stored configs that could run code.

A config loaded from disk (a checkpoint, a .safetensors export, a cache manifest) is data written by whoever
shared the file. Hydra would import and call any `_target_` in it, and OmegaConf would evaluate any `${...}`
interpolation (resolvers such as `oc.env`, or custom ones) on access. So:

- every `_target_` must be one of ALLOWED_TARGETS, exactly (a prefix such as `torch.` would admit
  `torch.utils.collect_env.run`, which runs a shell command); the user extends the list from their own command line
  or config (`security.allow=[my.module.Class]`, applied by each task through `allow_targets`), never from a
  loaded file;
- a stored config becomes a DictConfig only through `stored_config`: a plain mapping (a string would be parsed as
  YAML) holding no interpolation at all (ldm writes configs resolved), checked before OmegaConf touches it; the
  parts that get built may hold no command-running input (`pipe:` URLs, which webdataset hands to a shell).
"""
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

ALLOWED_TARGETS = frozenset({
    # ours
    "ldm.callbacks.image_grid.ImageGrid",
    "ldm.callbacks.periodic_eval.PeriodicEval",
    "ldm.data.condition_inputs.LowRes",
    "ldm.data.condition_inputs.RandomMasks",
    "ldm.data.datamodule.ImageDataModule",
    "ldm.data.digits.DigitsDataset",
    "ldm.data.image_folder.ImageFolderDataset",
    "ldm.data.latents.LatentDataModule",
    "ldm.data.shapes.ShapesDataset",
    "ldm.data.webdataset_images.WebImageDataset",
    "ldm.diffusion.formulations.EDMFormulation",
    "ldm.diffusion.formulations.FlowFormulation",
    "ldm.diffusion.formulations.VPFormulation",
    "ldm.eval.clip_score.CLIPScore",
    "ldm.eval.dinov2.dinov2_features",
    "ldm.eval.inception.InceptionFeatures",
    "ldm.eval.reference_suite.ReferenceSuite",
    "ldm.eval.suites.DigitsSuite",
    "ldm.eval.suites.ShapesSuite",
    "ldm.models.autoencoder.AutoencoderModule",
    "ldm.models.first_stage.load_first_stage",
    "ldm.models.fsdp.FSDP2Strategy",
    "ldm.models.latent_diffusion.LatentDiffusionModule",
    "ldm.models.optimizer.AdamWSchedule",
    "ldm.models.sampling.Sampling",
    "ldm.nn.autoencoder.AutoencoderKL",
    "ldm.nn.conditioners.ClassConditioner",
    "ldm.nn.conditioners.OpenCLIPTextConditioner",
    "ldm.nn.conditioners.TextTransformerConditioner",
    "ldm.nn.conditioners.Unconditional",
    "ldm.nn.discriminator.NLayerDiscriminator",
    "ldm.nn.dit.DiT",
    "ldm.nn.image_conditions.ConcatConditioner",
    "ldm.nn.image_conditions.LowResImage",
    "ldm.nn.image_conditions.MaskedImage",
    "ldm.nn.image_conditions.SemanticMap",
    "ldm.nn.lora.LoRA",
    "ldm.nn.lpips.LPIPS",
    "ldm.nn.unet.UNet",
    # the few library classes the configs build
    "lightning.pytorch.Trainer",
    "lightning.pytorch.callbacks.LearningRateMonitor",
    "lightning.pytorch.loggers.CSVLogger",
    "lightning.pytorch.loggers.TensorBoardLogger",
    "lightning.pytorch.loggers.WandbLogger",
})
TARGET_KEYS = ("_target_", "_partial_target_")
COMMAND_PREFIXES = ("pipe:",)

_user_allowed: set[str] = set()


def allow_targets(names: list[str] | tuple[str, ...] | ListConfig | None) -> None:
    """Add exact dotted names to this process's allow-list: call with the user's own `security.allow` only."""
    for name in names or ():
        if not isinstance(name, str) or not name or name.endswith("."):
            raise PermissionError(f"security.allow takes exact dotted names of classes or functions, got {name!r}")
        _user_allowed.add(name)


def is_allowed(target: str) -> bool:
    return target in ALLOWED_TARGETS or target in _user_allowed


def _walk(node: Any, where: str = ""):
    """(path, key, value) for every dict entry and list or tuple item of a plain container, depth first (tuples
    too: OmegaConf turns them into lists, interpolations and all)."""
    mapping = isinstance(node, dict)
    items = node.items() if mapping else enumerate(node) if isinstance(node, (list, tuple)) else ()
    for key, value in items:
        path = f"{where}.{key}" if mapping and where else f"{where}[{key}]" if where else str(key)
        yield path, key, value
        yield from _walk(value, path)


def _plain(cfg: Any) -> Any:
    """A plain dict/list view of a config, interpolations left unevaluated (resolving could run a resolver)."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=False)
    return cfg


def check_targets(cfg: Any, *, stored: bool, where: str = "", source: str | None = None) -> None:
    """Raise PermissionError naming the first `_target_` outside the allow-list and its key (under `where`, in the
    file `source`); for a `stored` config also the first command-running input (`pipe:`)."""
    origin = f" of {source}" if source else ""
    for path, key, value in _walk(_plain(cfg), where):
        if key in TARGET_KEYS and not (isinstance(value, str) and is_allowed(value)):
            raise PermissionError(
                f"refusing to instantiate `{value}` at `{path}`{origin}: not on the allow-list of classes and "
                f"functions (add it from your own command line with security.allow=[{value}] if you trust it)"
            )
        if stored and isinstance(value, str) and value.lstrip().startswith(COMMAND_PREFIXES):
            raise PermissionError(f"refusing a stored command-running input at `{path}`{origin} ({value[:40]!r}): "
                                  f"`pipe:` URLs are accepted from your own command line or config only")


def check_stored_config(cfg: Any, source: str) -> None:
    """Raise PermissionError if a config loaded from `source` is not a plain mapping (OmegaConf would parse a string
    as YAML) or holds an interpolation or resolver call (`${...}`): ldm stores configs resolved, so one there was
    put by hand, and evaluating it could run code."""
    if not isinstance(cfg, (dict, DictConfig)):
        raise PermissionError(f"refusing the config stored in {source}: a {type(cfg).__name__}, not the mapping "
                              f"ldm writes")
    for path, _, value in _walk(_plain(cfg)):
        if isinstance(value, str) and "${" in value:
            raise PermissionError(f"refusing the config stored in {source}: `{path}` holds an interpolation "
                                  f"({value[:40]!r}), which ldm never writes and will not evaluate")


def stored_config(raw: Any, source: str) -> DictConfig:
    """The one way a config read from a file (a checkpoint, .safetensors metadata) becomes a DictConfig: checked
    by check_stored_config before OmegaConf parses or evaluates any of it."""
    check_stored_config(raw, source)
    return OmegaConf.create(raw)


def safe_instantiate(
    cfg: Any, *, stored: bool = True, where: str = "", source: str | None = None, **kwargs: Any
) -> Any:
    """hydra.utils.instantiate after checking every target against the allow-list (and, for a config loaded from
    disk, refusing command-running inputs); `stored=False` for the user's own live config. `where` (the config's
    key, e.g. `model`) and `source` (the file it came from) name the refused key in the error."""
    cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    check_targets(cfg, stored=stored, where=where, source=source)
    return instantiate(cfg, **kwargs)
