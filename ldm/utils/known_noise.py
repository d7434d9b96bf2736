"""Start-up noise we understand, silenced so that the messages that matter stand out (each with its reason)."""
import logging
import warnings

# (message prefix, why it does not apply to ldm)
WARNINGS = (
    ("Found .* module\\(s\\) in eval mode", "frozen parts (first stage, EMA copy, LPIPS) stay in eval mode on purpose"),
    ("The number of training batches .* is smaller than the logging interval", "step-based runs log by step"),
    ("`isinstance\\(treespec, LeafSpec\\)` is deprecated", "inside Lightning, not ours to fix"),
    ("Importing from timm.models.layers is deprecated", "open_clip < 2.27 imports it so; not ours to fix"),
    ("Using `torch.compile\\(module\\)` when there are global hooks",
     "FlopCounterMode's module hooks while Throughput counts the first batch's FLOPs: it counts operators, not hooks"),
)
LOG_RECORDS = (
    ("`weights_only` was not set", "Lightning's note when it writes a full checkpoint (ours always are)"),
    ("💡 Tip:", "an advertisement"),
)


class _DropRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(message.startswith(prefix) or prefix in message for prefix, _ in LOG_RECORDS)


def silence_known_noise() -> None:
    """Filter the warnings and log records listed above (idempotent)."""
    for pattern, _ in WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero",
                 "lightning.pytorch.trainer.connectors.checkpoint_connector"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropRecords) for f in logger.filters):
            logger.addFilter(_DropRecords())
