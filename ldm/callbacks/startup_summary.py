"""Prints the run's scale once (rank 0) when training starts: world size, global batch, learning rate after
batch scaling, and the checkpoint it resumed from. On a cluster these are the numbers to check first."""
import lightning as L


def peak_lr(trainer: L.Trainer) -> float | None:
    """The first parameter group's lr before warm-up/decay factors: the scheduler's base lr, else the optimizer's."""
    if trainer.lr_scheduler_configs:
        return trainer.lr_scheduler_configs[0].scheduler.base_lrs[0]
    return trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' if n != 1 else ''}"


class StartupSummary(L.Callback):
    def __init__(self):
        self.printed = False

    def on_fit_start(self, trainer, pl_module) -> None:
        self.printed = False

    def on_train_start(self, trainer, pl_module) -> None:
        self.show(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.show(trainer, pl_module, "\n[fit] nothing left to train: max_steps or max_epochs reached")

    def show(self, trainer: L.Trainer, pl_module: L.LightningModule, note: str = "") -> None:
        if trainer.is_global_zero and not self.printed:
            print(self.summary(trainer, pl_module) + note, flush=True)
        self.printed = True

    def summary(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        world, accumulation = trainer.world_size, trainer.accumulate_grad_batches
        devices, nodes = _count(trainer.num_devices, "device"), _count(trainer.num_nodes, "node")
        lines = [f"world size    {world} = {devices} x {nodes} ({type(trainer.strategy).__name__})"]
        per_device = getattr(trainer.datamodule, "batch_size", None)
        if per_device is not None:
            lines.append(f"global batch  {per_device * world * accumulation} = {per_device} per device x {world} ranks "
                         f"x {accumulation} accumulation")
        lr = peak_lr(trainer)
        if lr is not None:
            scaled = " (scaled with the global batch)" if getattr(getattr(pl_module, "optimizer", None), "scale_lr", False) else ""
            lines.append(f"lr            {lr:.4g} peak{scaled}")
        if trainer.ckpt_path is None:
            lines.append("fresh start")
        else:
            lines.append(f"Resuming from {trainer.ckpt_path} at step {trainer.global_step}")
        return "\n".join(f"[fit] {line}" for line in lines)
