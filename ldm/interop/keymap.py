"""Renaming state dicts between another library's layout and ours, strictly: every tensor is accounted for.

A key map is a table {our name: Key(their name(s))}. Several of their names are concatenated along dim 0 into one
of ours (fused q,k,v projections); `their_form` converts 1x1 convolutions to linear weights and back. Nothing is
dropped or guessed: an unknown, missing or mis-shaped tensor is an error that lists them all.
"""
from dataclasses import dataclass

import torch
from torch import Tensor

from ldm.utils.errors import ConfigError


@dataclass(frozen=True)
class Key:
    """Their tensor name(s) for one of ours; their_form says how their weight is laid out where ours differs."""

    theirs: tuple[str, ...]
    their_form: str | None = None  # "linear" ([out, in]) | "conv1x1" ([out, in, 1, 1]) | None: as ours

    def __post_init__(self):
        if self.their_form not in (None, "linear", "conv1x1"):
            raise ValueError(f"their_form must be linear, conv1x1 or None, got {self.their_form!r}")


KeyMap = dict[str, Key]


def key(*theirs: str, form: str | None = None) -> Key:
    """Key(...) with the names as positional arguments: key('to_q.weight', 'to_k.weight', 'to_v.weight')."""
    return Key(tuple(theirs), form)


def prefixed(keymap: KeyMap, ours: str = "", theirs: str = "") -> KeyMap:
    """The same table with `ours` and `theirs` put in front of every name on each side."""
    return {ours + o: Key(tuple(theirs + t for t in k.theirs), k.their_form) for o, k in keymap.items()}


def _their_layout(t: Tensor, form: str | None) -> Tensor:
    if form == "linear" and t.dim() == 4:
        return t.reshape(t.shape[0], t.shape[1])
    if form == "conv1x1" and t.dim() == 2:
        return t.reshape(*t.shape, 1, 1)
    return t


def _our_layout(t: Tensor, our_dim: int) -> Tensor:
    if our_dim == 4 and t.dim() == 2:
        return t.reshape(*t.shape, 1, 1)
    if our_dim == 2 and t.dim() == 4 and t.shape[2:] == (1, 1):
        return t.reshape(t.shape[0], t.shape[1])
    return t


def _fail(what: str, problems: dict[str, list[str]]) -> None:
    found = {kind: names for kind, names in problems.items() if names}
    if found:
        lines = [f"{kind} ({len(names)}): {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}"
                 for kind, names in found.items()]
        raise ConfigError(f"{what}: the tensors do not fit; " + "; ".join(lines))


def to_ours(theirs: dict[str, Tensor], keymap: KeyMap, our_shapes: dict[str, torch.Size], *, what: str,
            ignore: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """Their state dict -> ours. `our_shapes` is our module's {name: shape}; `ignore` lists their names known to be
    unused (e.g. position_ids buffers). Raises one ConfigError listing unknown, missing and mis-shaped tensors."""
    unmapped = sorted(set(our_shapes) - set(keymap))
    used = {name for k in keymap.values() for name in k.theirs}
    problems = {"ours without a mapping": unmapped,
                "missing in the source": sorted({n for n in used if n not in theirs}),
                "unknown in the source": sorted(n for n in theirs if n not in used and n not in ignore),
                "mis-shaped": []}
    out = {}
    for ours, k in keymap.items():
        if ours not in our_shapes:
            problems["ours without a mapping"].append(f"{ours} (in the table, not in the model)")
            continue
        if any(n not in theirs for n in k.theirs):
            continue
        parts = [_our_layout(theirs[n], len(our_shapes[ours])) if k.their_form else theirs[n] for n in k.theirs]
        t = torch.cat(parts) if len(parts) > 1 else parts[0]
        if t.shape != our_shapes[ours]:
            problems["mis-shaped"].append(f"{ours} {tuple(our_shapes[ours])} <- {' + '.join(k.theirs)} "
                                          f"{' + '.join(str(tuple(theirs[n].shape)) for n in k.theirs)}")
            continue
        out[ours] = t
    _fail(what, problems)
    return out


def to_theirs(ours: dict[str, Tensor], keymap: KeyMap, *, what: str) -> dict[str, Tensor]:
    """Our state dict -> theirs (fused tensors split into equal parts along dim 0). Raises if a tensor of ours has no
    mapping or the table names one we do not have."""
    _fail(what, {"ours without a mapping": sorted(set(ours) - set(keymap)),
                 "in the table, not in the model": sorted(set(keymap) - set(ours))})
    out = {}
    for name, k in keymap.items():
        parts = ours[name].chunk(len(k.theirs)) if len(k.theirs) > 1 else (ours[name],)
        for their_name, part in zip(k.theirs, parts):
            out[their_name] = _their_layout(part.contiguous(), k.their_form)
    return out
