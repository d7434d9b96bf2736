"""Which checkpoints a run keeps: step checkpoints every N steps (the newest K), last.ckpt by wall clock too,
best.ckpt by a metric, and the final step."""
import lightning as L
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from ldm.callbacks.checkpoints import checkpoint_callbacks
from ldm.utils.checkpoint_io import AtomicCheckpointIO


class LastStepProbe(L.Callback):
    """Records at each step's end the step stored in last.ckpt (None when there is none yet). Lightning runs
    checkpoint callbacks after all others, so this sees what the previous steps wrote."""

    def __init__(self, checkpoint_dir):
        self.last, self.seen = checkpoint_dir / "last.ckpt", []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = torch.load(self.last, weights_only=True)["global_step"] if self.last.is_file() else None
        self.seen.append(step)


def _fit(tmp_path, max_steps: int, **options) -> LastStepProbe:
    probe = LastStepProbe(tmp_path)
    trainer = L.Trainer(max_steps=max_steps, callbacks=[*checkpoint_callbacks(tmp_path, **options), probe],
                        plugins=[AtomicCheckpointIO()], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0)
    trainer.fit(BoringModel())
    return probe


def test_step_checkpoints_keep_the_newest_k_and_last_and_final(tmp_path):
    _fit(tmp_path, max_steps=7, every_n_steps=2, keep_last=2)
    names = sorted(p.name for p in tmp_path.glob("*.ckpt"))
    assert names == ["last.ckpt", "step-00000004.ckpt", "step-00000006.ckpt", "step-00000007.ckpt"]
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 7  # the final step too


def test_every_step_checkpoint_is_kept_by_default(tmp_path):
    _fit(tmp_path, max_steps=6, every_n_steps=2)
    assert sorted(p.name for p in tmp_path.glob("step-*.ckpt")) == [f"step-0000000{s}.ckpt" for s in (2, 4, 6)]


def test_wall_clock_checkpoints_write_last_between_step_checkpoints(tmp_path):
    seen = _fit(tmp_path, max_steps=4, every_n_steps=1000, every_minutes=1e-6).seen  # every step, by the clock
    assert seen == [None, 1, 2, 3] and not list(tmp_path.glob("step-0000000[123].ckpt"))
    without = _fit(tmp_path / "steps_only", max_steps=4, every_n_steps=1000).seen
    assert without == [None, None, None, None]  # only the final checkpoint, after the loop


class ScoredModel(BoringModel):
    """Validates every 2 steps with a made-up score, lowest at step 4 and highest at step 2."""

    SCORES = {2: 5.0, 4: 1.0, 6: 3.0, 8: 4.0}

    def validation_step(self, batch, batch_idx):
        self.log("val/score", self.SCORES[self.trainer.global_step])


def test_best_checkpoint_follows_the_monitored_metric(tmp_path):
    for mode, best_step in (("min", 4), ("max", 2)):
        out = tmp_path / mode
        # an interval of 1 would mean "at epoch ends" to ModelCheckpoint (1 == 1.0); runs validate every N > 1 steps
        trainer = L.Trainer(max_steps=8, val_check_interval=2, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
                            callbacks=checkpoint_callbacks(out, every_n_steps=1000, monitor="val/score", mode=mode),
                            plugins=[AtomicCheckpointIO()], enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=out)
        trainer.fit(ScoredModel())
        assert torch.load(out / "best.ckpt", weights_only=True)["global_step"] == best_step
        assert torch.load(out / "last.ckpt", weights_only=True)["global_step"] == 8
