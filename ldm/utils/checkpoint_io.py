"""Lightning's checkpoint file I/O, made safe: atomic writes (a kill at any moment leaves the previous good
checkpoint in place) and tensor-only reads (a resumed checkpoint cannot run code)."""
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from ldm.utils.atomic import atomic_torch_save


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves are temp-file + rename (Lightning's own write in place); loads use `weights_only=True` whatever the
    caller asks (Lightning 2.6 defaults a resume to `weights_only=False`, i.e. full unpickling)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only: bool | None = None):
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)
