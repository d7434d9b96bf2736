"""Metrics: FID/KID, CLIP score, shapes attribute accuracy, digits class accuracy, reconstruction quality."""
