"""Stage one as a :class:`swintormer.core.priors.PriorSource`: priors sampled now.

Stage two asks for priors through that protocol only; this adapter answers with a
:class:`ldm_prior.sampling.PriorSampler`, seeding each image from the run's seed and the image's
file name (:func:`ldm_prior.sampling.image_seed`), the same rule the prior-cache job uses, so a
prior sampled here equals the cached one made with the same model and settings.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ldm_prior.model import PriorModel
from ldm_prior.sampling import PriorSampler, SamplingSettings, image_seed
from swintormer.core.image_io import read_image


class SampledPriors:
    """Samples each image's prior with a stage-one model when asked."""

    def __init__(self, model: PriorModel, settings: SamplingSettings, seed: int = 0) -> None:
        self.sampler = PriorSampler(model, settings)
        self.seed = int(seed)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str], settings: SamplingSettings, seed: int = 0,
                        device: str | None = None) -> "SampledPriors":
        model = PriorModel.from_pretrained(directory)
        return cls(model.to(device) if device is not None else model, settings, seed)

    def prior_for(self, blurry_path: Path, blurry: np.ndarray | None = None) -> np.ndarray:
        """The prior of ``blurry_path`` (decoded from the file unless ``blurry`` is given)."""
        blurry_path = Path(blurry_path)
        pixels = read_image(blurry_path).pixels if blurry is None else blurry
        return self.sampler.sample(pixels, seed=image_seed(self.seed, blurry_path.name))
