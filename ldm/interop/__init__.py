"""Interop with Stable Diffusion and diffusers formats: key-mapping tables between their tensors and ours."""
