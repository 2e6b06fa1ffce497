"""Datasets of sharp photos degraded on the fly (:mod:`swintormer.core.data.degradations`).

:class:`DegradedPatchDataset` serves training patches: item ``index`` of epoch ``epoch`` reads
photo ``index % len(photos)``, crops it at a random position and scale, applies one of the 8
symmetries of the square, and draws a fresh degradation, every random choice from
``numpy.random.default_rng([seed, epoch, index])``, as :class:`swintormer.core.data.paired.PairedPatchDataset`
does for fixed pairs: the data depend on (seed, epoch, index) only, so a resumed run sees exactly
what it would have seen, and processes of a distributed run see different samples.

:class:`DegradedImageDataset` serves a fixed validation set: photo ``i``'s centre crop with a
degradation drawn once from ``default_rng([seed, VALIDATION_STREAM, i])`` (optionally cycling
through given blur kinds), so that validation scores compare across steps and runs.

Items are ``{"input": 3×p×p float32, "target": 3×p×p float32, "name": str}``, the shape the
fixed-pair datasets give, so the training loop does not know which kind it is fed.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from swintormer.core.data.paired import DecodedImages, RandomPatchDataset, apply_symmetry, from_samples
from swintormer.core.data.degradations import DegradationConfig, degrade_crop
from swintormer.core.image_io import list_images

VALIDATION_STREAM = 1_000_003  # a seed-sequence word no epoch reaches in practice


def discover_photos(folder: str | os.PathLike[str]) -> list[Path]:
    """The sharp photos of a folder (sorted, so that item indices are stable); an empty folder is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: folder not found")
    photos = list_images(folder)
    if not photos:
        raise ValueError(f"{folder}: no images found (expected sharp photos for on-the-fly degradation)")
    return photos


def _to_chw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32))


def _padded(samples: np.ndarray, side: int) -> np.ndarray:
    """Reflect-pad a photo smaller than ``side`` in either dimension."""
    pad_h, pad_w = max(0, side - samples.shape[0]), max(0, side - samples.shape[1])
    if not (pad_h or pad_w):
        return samples
    mode = "reflect" if min(samples.shape[:2]) > 1 else "edge"
    return np.pad(samples, ((0, pad_h), (0, pad_w), (0, 0)), mode=mode)


class DegradedPatchDataset(RandomPatchDataset):
    """Random training patches of sharp photos, each with a freshly drawn degradation."""

    def __init__(
        self,
        photos: list[Path],
        patch_size: int,
        degradation: DegradationConfig,
        augment: bool = True,
        seed: int = 0,
        repeat: int = 1,
        cache_images: bool = False,
    ):
        if not photos:
            raise ValueError("the dataset has no photos")
        self.photos = list(photos)
        self._images = DecodedImages(cache_images)
        self.degradation = degradation
        super().__init__(len(self.photos), patch_size, augment, seed, repeat)

    def __getitem__(self, index: int) -> dict:
        rng = self.item_rng(index)
        photo_index = index % len(self.photos)
        samples = self._images.samples(self.photos[photo_index])
        side = self.patch_size + 2 * self.degradation.margin()
        scale = float(rng.uniform(*self.degradation.scale))
        # The region that, downscaled by `scale`, gives the crop; never larger than the photo.
        region = min(int(math.ceil(side / scale)), max(side, min(samples.shape[:2])))
        samples = _padded(samples, region)
        top = int(rng.integers(0, samples.shape[0] - region + 1))
        left = int(rng.integers(0, samples.shape[1] - region + 1))
        crop = from_samples(samples[top: top + region, left: left + region])
        if region != side:
            crop = cv2.resize(crop, (side, side), interpolation=cv2.INTER_AREA)
        if self.augment:
            crop = apply_symmetry(crop, bool(rng.integers(0, 2)), int(rng.integers(0, 4)))
        blurry, sharp, _ = degrade_crop(rng, np.ascontiguousarray(crop), self.degradation)
        return {"input": _to_chw(blurry), "target": _to_chw(sharp), "name": self.photos[photo_index].stem}


class DegradedImageDataset(Dataset):
    """A fixed set of degraded centre crops of sharp photos (validation and evaluation).

    Item ``i`` is photo ``i``'s centre crop of side ``crop`` (the whole photo when it is smaller)
    with one degradation drawn from ``default_rng([seed, VALIDATION_STREAM, i])``; ``kinds``
    cycles the blur kind through the given list instead of drawing it.
    """

    def __init__(
        self,
        photos: list[Path],
        crop: int,
        degradation: DegradationConfig,
        seed: int = 0,
        kinds: list[str] | None = None,
        cache_images: bool = True,
    ):
        if not photos:
            raise ValueError("the dataset has no photos")
        self.photos = list(photos)
        self._images = DecodedImages(cache_images)
        self.crop = int(crop)
        self.degradation = degradation
        self.seed = int(seed)
        self.kinds = list(kinds) if kinds else None
        self._items: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.photos)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        if index not in self._items:
            self._items[index] = self._make(index)
        item = self._items[index]
        return {"input": item["input"].clone(), "target": item["target"].clone(), "name": item["name"]}

    def _make(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, VALIDATION_STREAM, index])
        margin = self.degradation.margin()
        samples = self._images.samples(self.photos[index])
        height, width = samples.shape[:2]
        crop_h, crop_w = min(self.crop, height), min(self.crop, width)
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        # Context around the crop: the photo itself where it has some, reflections beyond its edges.
        samples = np.pad(samples, ((margin, margin), (margin, margin), (0, 0)), mode="symmetric")
        region = from_samples(samples[top: top + crop_h + 2 * margin, left: left + crop_w + 2 * margin])
        kind = self.kinds[index % len(self.kinds)] if self.kinds else None
        blurry, sharp, degradation = degrade_crop(rng, region, self.degradation, kind)
        name = f"{self.photos[index].stem}_{degradation.kind}"
        return {"input": _to_chw(blurry), "target": _to_chw(sharp), "name": name}
