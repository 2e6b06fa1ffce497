"""Stage one: the conditional latent-diffusion prior (VQGAN latent, diffusers components),
its fine-tuning step, prior sampling, and the on-disk prior cache."""
