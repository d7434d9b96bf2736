"""A LightningModule that records which samples each training batch held (data-order tests)."""
import lightning as L
import torch


class KeyRecorder(L.LightningModule):
    """Records each training batch's keys; one weight, fitted to the mean of `field`, so the optimizer steps."""

    def __init__(self, field: str):
        super().__init__()
        self.field = field
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.keys = []

    def training_step(self, batch, batch_idx):
        self.keys.append(list(batch["key"]))
        return (self.w - batch[self.field].mean()).square()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)
