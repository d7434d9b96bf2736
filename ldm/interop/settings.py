"""Reading another library's config.json strictly, and completing our network configs with their defaults."""

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from ldm.utils.errors import ConfigError


def _entries(value: Any) -> list:
    return list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]


def _holds(value: Any, allowed: tuple) -> bool:
    # Per-block settings may come as a list: every entry must hold an allowed value (True is not taken for 1).
    return all(any(v == a and isinstance(v, bool) == isinstance(a, bool) for a in allowed) for v in _entries(value))


def read_settings(
    config: Mapping[str, Any],
    *,
    used: Mapping[str, Any],
    fixed: Mapping[str, tuple],
    ignored: frozenset[str],
    what: str,
) -> dict[str, Any]:
    """Their config dict -> the `used` settings (their defaults where absent). Every other key must be in `fixed`
    (holding one of the listed values), in `ignored` (no effect on the network) or start with "_" (metadata)."""
    known = set(used) | set(fixed) | ignored
    unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
    if unknown:
        raise ConfigError(f"{what}: unknown settings {unknown}; this version of the importer does not know them")
    for key, allowed in fixed.items():
        if key in config and not _holds(config[key], allowed):
            options = " or ".join(repr(a) for a in allowed)
            raise ConfigError(f"{what}: {key}={config[key]!r} is not supported (our network needs {options})")
    return {key: config.get(key, default) for key, default in used.items()}


def our_args(net_cfg: Mapping[str, Any], cls: type, what: str) -> dict[str, Any]:
    """Our net config ({"_target_": ..., args}) -> every constructor argument of `cls`, defaults filled in."""
    target = f"{cls.__module__}.{cls.__qualname__}"
    if net_cfg.get("_target_", target) != target:
        raise ConfigError(f"{what}: _target_ must be {target}, got {net_cfg['_target_']!r}")
    params = inspect.signature(cls).parameters
    unknown = sorted(set(net_cfg) - set(params) - {"_target_"})
    missing = sorted(n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in net_cfg)
    if unknown or missing:
        raise ConfigError(f"{what}: unknown keys {unknown}, missing keys {missing} for {target}")
    return {n: net_cfg.get(n, p.default) for n, p in params.items()}


def uniform(value: Any, key: str, what: str) -> Any:
    """A setting given once or per block (a list) -> the single value; differing per-block values are an error."""
    values = _entries(value)
    if not values or any(v != values[0] for v in values):
        raise ConfigError(f"{what}: {key}={value!r} varies per block; our network uses one value for all blocks")
    return values[0]


def block_lists(c: Mapping[str, Any], what: str) -> tuple[list[int], list[str], list[str]]:
    """(block_out_channels, down_block_types, up_block_types) of a diffusers UNet/VAE config: one block type per
    width each way, every width a multiple of the first (ours: `ch` x `ch_mult` / `model_channels` x `channel_mult`)."""
    widths = list(c["block_out_channels"])
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    if len(down) != len(widths) or len(up) != len(widths):
        raise ConfigError(f"{what}: down_block_types {down} and up_block_types {up} need one entry per "
                          f"block_out_channels {widths}")
    if any(w % widths[0] for w in widths):
        raise ConfigError(f"{what}: block_out_channels {widths} must be multiples of the first")
    return widths, down, up
