"""Stores the resolved run config inside every checkpoint, so sampling and evaluation need nothing else."""
from typing import Any

import lightning as L

from ldm.utils.checkpoint import CONFIG_KEY


class StoreConfig(L.Callback):
    def __init__(self, config: dict[str, Any]):
        self.config = config

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint[CONFIG_KEY] = self.config
