"""Tiny sizes of the built-in experiments, shared by the tests and by the processes they launch.

A module of its own, not conftest: a launched process imports it by name, and another package's `conftest` module
on sys.path (old wandb releases put a vendored one there) would shadow ours.
"""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

QUIET = ["+trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
# f = 2 KL autoencoder on 16 px shapes: latents [4, 8, 8], as shapes_txt2img expects
TINY_AE = [
    "data.resolution=16", "model.net.ch=8", "model.net.ch_mult=[1,2]", "data.train.size=64", "data.val.size=16",
    "data.batch_size=8", "data.num_workers=0", "trainer.limit_val_batches=1", *QUIET,
]
TINY_CACHE = ["task=cache_latents", "data.resolution=16", "model.net.ch=8", "model.net.ch_mult=[1,2]",
              "data.train.size=64", "data.val.size=16", "task.num_workers=0", "task.progress=false"]
TINY_UNET = ["model.backbone.model_channels=32", "model.backbone.channel_mult=[1,2]",
             "model.backbone.attention_resolutions=[2]"]
TINY_TEXT = ["model.conditioner.width=32", "model.conditioner.layers=1", "model.conditioner.heads=2"]
# shapes_txt2img without the backbone and conditioner sizes (for swapping those)
TINY_LDM = [
    "model.optimizer.warmup_steps=0", "model.optimizer.lr=1e-3", "data.batch_size=8", "data.num_workers=0",
    "trainer.limit_val_batches=1", "sampling.steps=2", "sampling.prompts=[a red circle]", "sampling.seeds=[0,1]",
    "~callbacks.periodic_eval",  # its suite renders 32 px scenes; tests/test_evaluate.py runs it at 16 px
    *QUIET,
]
TINY_TXT2IMG = [*TINY_UNET, *TINY_TEXT, *TINY_LDM]
