"""Diffusion: the noise schedule and guided sampler, the U-Net denoiser, its training, and its samples on disk."""
