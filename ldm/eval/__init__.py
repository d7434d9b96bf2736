"""Metrics: FID/KID (frechet, inception), CLIP score, shapes attribute accuracy, digits class accuracy, reconstruction."""
