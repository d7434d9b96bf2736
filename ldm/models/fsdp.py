"""FSDP2 (PyTorch `fully_shard`, Zhao et al. 2023): one sharding unit per backbone block, activation checkpointing
on the same blocks, and the Lightning strategy that carries these settings for `trainer=fsdp`."""
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed._composable import checkpoint as checkpoint_activations
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from ldm.utils.errors import ConfigError

BLOCK_TYPES = (
    "ldm.nn.unet.ResBlock",
    "ldm.nn.attention.SpatialTransformer",
    "ldm.nn.dit.DiTBlock",
    "ldm.nn.attention.TransformerBlock",  # a jointly trained text encoder's blocks
)


def outermost_blocks(module: nn.Module, block_types: tuple[type, ...]) -> list[nn.Module]:
    """Submodules of `block_types` that lie inside no other such block, in module order: the sharding units."""
    found = []
    for child in module.children():
        found += [child] if isinstance(child, block_types) else outermost_blocks(child, block_types)
    return found


def shard_module(
    module: nn.Module,
    mesh: DeviceMesh,
    block_types: tuple[type, ...],
    *,
    mp_policy: MixedPrecisionPolicy | None = None,
    reshard_after_forward: bool = True,
    activation_checkpointing: bool = False,
    forward_methods: Sequence[str] = (),
) -> None:
    """fully_shard every block, then `module` for the parameters left over (bottom-up, as FSDP2 needs), in place.

    Parameters become DTensors sharded on dim 0 across `mesh`; two modules of the same structure sharded with the
    same mesh hold the same slice of every tensor on a rank. `forward_methods` (e.g. a conditioner's `encode`)
    gather the parameters like `forward` does. With activation checkpointing, a backbone's own
    `gradient_checkpointing` is switched off.
    """
    if activation_checkpointing and getattr(module, "gradient_checkpointing", False):
        module.gradient_checkpointing = False  # a backbone's own checkpointing of the same blocks: recompute once
    options = dict(mesh=mesh, reshard_after_forward=reshard_after_forward,
                   mp_policy=mp_policy or MixedPrecisionPolicy())
    for block in outermost_blocks(module, block_types):
        if activation_checkpointing:
            checkpoint_activations(block)  # recompute the block's activations in backward; names unchanged
        fully_shard(block, **options)
    fully_shard(module, **options)
    for name in forward_methods:
        register_fsdp_forward_method(module, name)


def shard_with_ema(module: nn.Module, shard: Callable[..., None]) -> None:
    """Shard a LatentDiffusionModule's trained parts (`ema_target()`) and their EMA copy the same way,
    `shard(part, trained=, forward_methods=)`, so the EMA update stays local to each shard; once (Lightning's
    `configure_model` runs again for validate/fit). Frozen parts (first stage, a frozen text encoder) stay whole:
    they have no gradients to synchronise."""
    parts = module.ema_target()
    if all(isinstance(part, FSDPModule) for part in parts.values()):
        return
    averaged = module.ema.net if module.ema is not None else {}
    for name, part in parts.items():
        methods = ("encode", "null") if name == "conditioner" else ()  # a conditioner is called through these
        shard(part, trained=True, forward_methods=methods)
        if name in averaged:
            shard(averaged[name], trained=False, forward_methods=methods)
    whole = [n for n, p in module.named_parameters() if p.requires_grad and not isinstance(p, DTensor)]
    if whole:  # FSDP synchronises only sharded gradients: these would drift apart across ranks
        raise RuntimeError(f"FSDP left trained parameters unsharded: {whole[:5]}")


def remove(path: Path) -> None:
    """Delete a file or a directory tree if it exists."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def torch_dtype(name: str | None) -> torch.dtype | None:
    """A dtype name ("bfloat16") -> torch.bfloat16; None stays None (no cast)."""
    if name is None:
        return None
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch dtype {name!r} (trainer.strategy.param_dtype / reduce_dtype): e.g. bfloat16")
    return dtype


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's FSDP2 strategy with every rank in one sharding group, plus the sharding settings that
    `LatentDiffusionModule.configure_model` applies (`shard`, through `shard_with_ema`). Sharded checkpoints are DCP directories, written
    to a temporary directory and renamed into place, so a kill leaves the previous checkpoint whole."""

    def __init__(
        self,
        block_types: Sequence[str | type] = BLOCK_TYPES,
        activation_checkpointing: bool = True,
        param_dtype: str | None = "bfloat16",
        reduce_dtype: str | None = "float32",
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
    ):
        super().__init__(
            data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
        )
        self.block_types = tuple(get_class(b) if isinstance(b, str) else b for b in block_types)
        self.activation_checkpointing = activation_checkpointing
        self.mp_policy = MixedPrecisionPolicy(param_dtype=torch_dtype(param_dtype),
                                              reduce_dtype=torch_dtype(reduce_dtype))
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        # Every rank shards (no tensor parallelism): the data-parallel group is the whole world, so the
        # DistributedSampler also gives every rank its own data.
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def setup(self, trainer) -> None:
        if not hasattr(self.lightning_module, "ema_target"):
            raise ConfigError(
                f"trainer=fsdp shards a LatentDiffusionModule (backbone, trained text encoder, EMA); "
                f"train a {type(self.lightning_module).__name__} with trainer=ddp"
            )
        super().setup(trainer)

    def shard(self, module: nn.Module, *, trained: bool = True, forward_methods: Sequence[str] = ()) -> None:
        """Shard `module` over all ranks; activations are checkpointed only where gradients flow (`trained`)."""
        shard_module(
            module, self.device_mesh["data_parallel"], self.block_types, mp_policy=self.mp_policy,
            reshard_after_forward=self.reshard_after_forward,
            activation_checkpointing=self.activation_checkpointing and trained, forward_methods=forward_methods,
        )

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(filepath))
        tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
        if self.is_global_zero:
            remove(tmp)  # left by a run killed while saving
        self.barrier()
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier()
        if self.is_global_zero:
            # Directories cannot be renamed over each other: move the old one aside first. Between the two
            # renames `path` is missing and a resume falls back to the newest step checkpoint.
            if path.exists():
                remove(old)
                path.rename(old)
            tmp.rename(path)
            remove(old)
        self.barrier()
