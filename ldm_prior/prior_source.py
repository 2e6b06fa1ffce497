"""Stage one as a :class:`swintormer.core.priors.PriorSource`: priors sampled now.

Stage two asks for priors through that protocol only; this adapter answers with a
:class:`ldm_prior.sampling.PriorSampler`, seeding each image from the run's seed and the image's
name (:func:`ldm_prior.sampling.image_seed`). The prior-cache job names an image by its path
relative to the dataset root; given the same ``data_root``, a prior sampled here is seeded as the
cached one made with the same model and settings (without it, the file name is the name, which
is the cache's name for images directly in the root).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ldm_prior.cache import relative_name
from ldm_prior.model import PriorModel
from ldm_prior.sampling import PriorSampler, SamplingSettings, image_seed
from swintormer.core.image_io import read_image


class SampledPriors:
    """Samples each image's prior with a stage-one model when asked."""

    def __init__(self, model: PriorModel, settings: SamplingSettings, seed: int = 0,
                 data_root: str | os.PathLike[str] | None = None) -> None:
        self.sampler = PriorSampler(model, settings)
        self.seed = int(seed)
        self.data_root = Path(data_root) if data_root is not None else None

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str], settings: SamplingSettings, seed: int = 0,
                        device: str | None = None, data_root: str | os.PathLike[str] | None = None) -> "SampledPriors":
        model = PriorModel.from_pretrained(directory)
        return cls(model.to(device) if device is not None else model, settings, seed, data_root)

    def image_name(self, blurry_path: Path) -> str:
        """The name the image's noise is seeded from."""
        return relative_name(blurry_path, self.data_root) if self.data_root is not None else blurry_path.name

    def prior_for(self, blurry_path: Path, blurry: np.ndarray | None = None) -> np.ndarray:
        """The prior of ``blurry_path`` (decoded from the file unless ``blurry`` is given)."""
        blurry_path = Path(blurry_path)
        pixels = read_image(blurry_path).pixels if blurry is None else blurry
        return self.sampler.sample(pixels, seed=image_seed(self.seed, self.image_name(blurry_path)))
