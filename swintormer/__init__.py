"""Swintormer: the stage-two deblurring network, its blocks, losses, tiled inference,
image I/O, datasets and metrics."""

__version__ = "0.1.0"
