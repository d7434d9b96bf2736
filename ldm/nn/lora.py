"""Low-rank adaptation (Hu et al. 2021): W x + (alpha / r) B A x on a backbone's attention projections, through peft.

`LoRA` wraps a built backbone: peft swaps each targeted nn.Linear for a layer holding the frozen original
(`<name>.base_layer.weight`) and the adapter (`<name>.lora_A.default.weight` [r, in], `lora_B` [out, r], B zero at
the start, so a fresh wrapper computes exactly what the backbone did). Only the adapters train.
"""
from collections.abc import Sequence

import torch
from torch import Tensor, nn

ADAPTER = "default"  # peft's adapter name: one adapter per wrapper
SD_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")  # Stable Diffusion's LoRA targets (diffusers' training scripts)


class LoRA(nn.Module):
    """A backbone with peft LoRA layers on `target_modules` (module-name suffixes); its own weights frozen."""

    def __init__(
        self,
        net: nn.Module,
        rank: int = 4,
        alpha: float = 4.0,
        target_modules: Sequence[str] = SD_ATTENTION,
        dropout: float = 0.0,
        in_channels: int | None = None,
        gradient_checkpointing: bool | None = None,
    ):
        super().__init__()
        from peft import LoraConfig, inject_adapter_in_model  # lazily: peft is needed by LoRA runs only

        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=dropout)
        self.net = inject_adapter_in_model(config, net, adapter_name=ADAPTER)  # raises if no module matches
        for name, p in self.net.named_parameters():
            p.requires_grad_(is_adapter(name))
        self.rank, self.alpha = rank, alpha
        # latent_diffusion.yaml gives every backbone `in_channels`; the LoRA yaml passes it on to `net`
        self.in_channels = in_channels
        if gradient_checkpointing is not None:  # experiments set it on model.backbone, whatever wraps the UNet
            self.gradient_checkpointing = gradient_checkpointing

    @property
    def scale(self) -> float:
        """alpha / r: the factor on B A (peft's default scaling)."""
        return self.alpha / self.rank

    # what the LDM module, sampler and FSDP read from a backbone
    @property
    def context_dim(self) -> int | None:
        return getattr(self.net, "context_dim", None)

    @property
    def y_dim(self) -> int | None:
        return getattr(self.net, "y_dim", None)

    @property
    def gradient_checkpointing(self) -> bool:
        return getattr(self.net, "gradient_checkpointing", False)

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.net.gradient_checkpointing = value

    def forward(self, *args, **kwargs) -> Tensor:
        return self.net(*args, **kwargs)

    def merged_state_dict(self) -> dict[str, Tensor]:
        """The wrapped backbone's own state dict (its parameter names) with the adapters folded in."""
        state = {name.removeprefix("net."): t for name, t in self.state_dict().items()}
        return merge_lora(state, self.scale)


def is_adapter(name: str) -> bool:
    """Whether a parameter name is one of peft's LoRA adapter tensors (lora_A / lora_B)."""
    return ".lora_A." in name or ".lora_B." in name


def plain_name(name: str) -> str:
    """peft's name of a wrapped layer's own tensor -> the backbone's (to_q.base_layer.weight -> to_q.weight)."""
    return name.replace(".base_layer.", ".")


def lora_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors of a module (a LoRA wrapper or anything holding one), under the module's names."""
    return {name: t for name, t in module.state_dict().items() if is_adapter(name)}


@torch.no_grad()
def merge_lora(state: dict[str, Tensor], scale: float) -> dict[str, Tensor]:
    """A state dict with peft LoRA names -> plain names, each adapted weight W replaced by W + scale B A (Hu et al.
    2021, Eq. 3); every adapter must belong to a base weight."""
    merged, used = {}, set()
    for name, t in state.items():
        layer, _, leaf = name.rpartition(".base_layer.")
        if layer and leaf == "weight":
            pair = f"{layer}.lora_A.{ADAPTER}.weight", f"{layer}.lora_B.{ADAPTER}.weight"
            if not all(n in state for n in pair):
                raise ValueError(f"LoRA layer {layer} has no adapter pair {pair}")
            a, b = state[pair[0]], state[pair[1]]
            t = t + scale * (b.to(torch.float32) @ a.to(torch.float32)).to(t.dtype)  # [out, r] @ [r, in]
            used.update(pair)
        if not is_adapter(name):
            merged[plain_name(name)] = t
    if orphans := sorted(n for n in state if is_adapter(n) and n not in used):
        raise ValueError(f"LoRA adapters without a base weight: {', '.join(orphans)}")
    return merged
