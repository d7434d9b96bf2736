"""On resume, the optimizer's state (moments, step counts) comes from the checkpoint, its hyperparameters from the
config: a user who lowers the lr after a divergence, or resumes on another world size with `scale_lr`, gets what
the config says, not what the checkpoint remembers.

Lightning builds the optimizers and schedulers from the config (before `on_fit_start`), then loads their state
dicts from the checkpoint, which overwrite lr, betas, weight decay and the schedulers' base lrs. This callback
snapshots the former and puts them back over the latter at `on_train_start`.
"""
import warnings

import lightning as L

STATE = "params"  # the one param-group entry that is not a hyperparameter


def _plain(value):
    return list(value) if isinstance(value, tuple) else value  # betas come back from a checkpoint as a list


def _hyperparameters(trainer: L.Trainer) -> tuple[list[list[dict]], list[list[float]]]:
    groups = [[{k: v for k, v in g.items() if k != STATE} for g in opt.param_groups] for opt in trainer.optimizers]
    base_lrs = [list(getattr(c.scheduler, "base_lrs", [])) for c in trainer.lr_scheduler_configs]
    return groups, base_lrs


class ConfiguredHyperparameters(L.Callback):
    def __init__(self):
        self.configured: tuple[list[list[dict]], list[list[float]]] | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self.configured = _hyperparameters(trainer)  # built from the config; the checkpoint is not loaded yet

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.ckpt_path is None or self.configured is None:
            return
        groups, base_lrs = self.configured
        scheduled = {id(c.scheduler.optimizer) for c in trainer.lr_scheduler_configs}
        changes = []
        for opt, configured in zip(trainer.optimizers, groups):
            for group, wanted in zip(opt.param_groups, configured):
                for key, value in wanted.items():  # a scheduled lr is the schedule's at step 0: recomputed below
                    if _plain(group.get(key)) != _plain(value) and not (key in ("lr", "initial_lr") and id(opt) in scheduled):
                        changes.append(f"{key} {group.get(key)} -> {value}")
                    group[key] = value
        for config, wanted in zip(trainer.lr_scheduler_configs, base_lrs):
            scheduler = config.scheduler
            if list(scheduler.base_lrs) != wanted:
                changes.append(f"lr {scheduler.base_lrs} -> {wanted}")
                scheduler.base_lrs = list(wanted)
            with warnings.catch_warnings():  # get_lr outside step() warns; LambdaLR's is closed-form anyway
                warnings.simplefilter("ignore")
                lrs = scheduler.get_lr()
            for group, lr in zip(scheduler.optimizer.param_groups, lrs):
                group["lr"] = lr
            scheduler._last_lr = lrs
        if changes and trainer.is_global_zero:
            print("[fit] from the config, not the checkpoint: " + "; ".join(dict.fromkeys(changes)), flush=True)
