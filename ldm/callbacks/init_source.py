"""Keeps where a fine-tuned run started (`init_from`: path, sha256, weights read) in every checkpoint, resumes too."""
from typing import Any

import lightning as L

from ldm.interop.init_from import INIT_KEY


class InitSource(L.Callback):
    def __init__(self, record: dict[str, str] | None):
        self.record = record  # None on a resume: the resumed checkpoint's record is kept

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        self.record = checkpoint.get(INIT_KEY, self.record)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if self.record is not None:
            checkpoint[INIT_KEY] = self.record
