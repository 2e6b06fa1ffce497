"""Swintormer: diffusion-prior image deblurring.

- ``swintormer.core``: what both stages stand on (configuration, training engine, image I/O,
  data and degradations, metrics, tiling, atomic files, process set-up, the prior protocol);
- ``swintormer.models``: the stage-two network (the paper's U-Net, its block families and the
  CPU inference engine);
- ``swintormer.losses``, ``swintormer.inference``: stage two's losses and tiled inferencers.

Stage one, the latent-diffusion prior, is the sibling package ``ldm_prior``.
"""

__version__ = "0.1.0"
