"""`trainable=[patterns]`: fine-tune part of a model; the rest of what would train is frozen.

Patterns are fnmatch patterns over the module's parameter names (e.g. "denoiser.net.output_blocks.*"). Only
parameters that train already are candidates (the backbone, a trained conditioner, LoRA adapters): a pattern never
unfreezes a frozen first stage or a LoRA's base weights. Frozen parameters keep their values bit for bit, and their
EMA copies too (the average of a constant is the constant).
"""
from collections.abc import Sequence
from fnmatch import fnmatchcase

from torch import nn

from ldm.utils.errors import ConfigError


def apply_trainable(module: nn.Module, patterns: Sequence[str]) -> tuple[int, int]:
    """Freeze every trainable parameter whose name matches none of `patterns`; returns (trainable, all) counts of
    parameter elements. Raises ConfigError naming `trainable` for a pattern that matches no trainable parameter."""
    if isinstance(patterns, str) or not patterns:
        raise ConfigError(f"trainable={patterns!r}: a non-empty list of fnmatch patterns over parameter names, "
                          f"e.g. trainable=[denoiser.net.output_blocks.*]")
    candidates = {name: p for name, p in module.named_parameters() if p.requires_grad}
    unmatched = [pat for pat in patterns if not any(fnmatchcase(name, pat) for name in candidates)]
    if unmatched:
        shown = ", ".join(sorted(candidates)[:5])
        raise ConfigError(f"trainable: {', '.join(map(repr, unmatched))} match(es) no trainable parameter "
                          f"(the names look like {shown}, ...)")
    for name, p in candidates.items():
        p.requires_grad_(any(fnmatchcase(name, pat) for pat in patterns))
    total = sum(p.numel() for p in module.parameters())
    return sum(p.numel() for p in module.parameters() if p.requires_grad), total
