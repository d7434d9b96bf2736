"""Metrics: FID/KID, Inception Score, precision/recall, CLIP score, shapes attribute accuracy, digits class accuracy,
reconstruction quality; cached reference statistics; the suites that task=evaluate and periodic eval run."""
