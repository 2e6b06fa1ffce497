"""Stage one as a :class:`swintormer.core.priors.PriorSource`: priors sampled now.

Stage two asks for priors through that protocol only; this adapter answers with a
:class:`ldm_prior.sampling.PriorSampler`, seeding each image by the prior cache's rule
(:func:`ldm_prior.cache.seed_name`: from the run seed and the image file's SHA-256) and rounding
the prior as a cache entry stores it, so that with a cache's settings
(:meth:`SampledPriors.from_contract`) a prior sampled here equals the cached one bit for bit on
the same device and thread count.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ldm_prior.cache import seed_name, storage_precision
from ldm_prior.model import PriorModel
from ldm_prior.sampling import PriorSampler, SamplingSettings, image_seed
from swintormer.core.image_io import read_image
from swintormer.core.priors import PriorContract


class SampledPriors:
    """Samples each image's prior with a stage-one model when asked.

    ``seed_rule`` and ``data_root`` are those of :func:`ldm_prior.cache.seed_name`; the
    ``path`` rule (older caches) names an image by its path relative to ``data_root``.
    """

    def __init__(self, model: PriorModel, settings: SamplingSettings, seed: int = 0, seed_rule: str = "content",
                 data_root: str | os.PathLike[str] | None = None) -> None:
        self.model = model
        self.settings = settings
        self.sampler = PriorSampler(model, settings)
        self.seed = int(seed)
        self.seed_rule = seed_rule
        self.data_root = Path(data_root) if data_root is not None else None

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str], settings: SamplingSettings, seed: int = 0,
                        device: str | None = None, seed_rule: str = "content",
                        data_root: str | os.PathLike[str] | None = None) -> "SampledPriors":
        model = PriorModel.from_pretrained(directory)
        return cls(model.to(device) if device is not None else model, settings, seed, seed_rule, data_root)

    @classmethod
    def from_contract(cls, model: PriorModel, contract: PriorContract, tile_batch: int = 4,
                      data_root: str | os.PathLike[str] | None = None) -> "SampledPriors":
        """Priors sampled with the settings a model was trained with (the caller checks that
        ``model`` is the contract's stage-one model, e.g. by its fingerprint)."""
        settings = SamplingSettings(steps=contract.steps, eta=contract.eta, mode=contract.mode,
                                    timestep_spacing=contract.timestep_spacing, tile=contract.tile,
                                    tile_stride=contract.tile_stride, decode_tile=contract.decode_tile,
                                    decode_stride=contract.decode_stride, tile_batch=tile_batch)
        return cls(model, settings, contract.seed, contract.seed_rule, data_root)

    def contract(self) -> PriorContract:
        """The settings these priors are made with, as a model or cache records them."""
        return PriorContract.from_metadata({**self.settings.as_metadata(), "seed": str(self.seed),
                                            "seed_rule": self.seed_rule,
                                            "prior_fingerprint": self.model.fingerprint()})

    def prior_for(self, blurry_path: Path, blurry: np.ndarray | None = None) -> np.ndarray:
        """The prior of ``blurry_path`` (decoded from the file unless ``blurry`` is given)."""
        blurry_path = Path(blurry_path)
        pixels = read_image(blurry_path).pixels if blurry is None else blurry
        name = seed_name(blurry_path, self.seed_rule, self.data_root)
        return storage_precision(self.sampler.sample(pixels, seed=image_seed(self.seed, name)))
