"""Diffusion maths: schedules, preconditioning, noise levels, loss weighting, samplers and guidance (no Lightning)."""
