"""The interface through which stage two sees the diffusion prior, and a file-based source.

Stage two (training, validation, inference) never calls the diffusion model: it asks a
:class:`PriorSource` for the prior of a blurry image. Three implementations exist:

* ``ldm_prior.cache.PriorCache``: the prior cache written by ``pipelines.cache_priors``
  (fingerprinted entries, refuses stale ones);
* ``ldm_prior.prior_source.SampledPriors``: priors sampled now by a stage-one model;
* :class:`PriorFolder` (here): priors saved as ordinary files, for the "prior-from-file" variant
  (priors produced by another tool, or hand-made for tests and demos).

A prior is a float32 H×W×3 RGB array in [0, 1] with exactly the blurry image's height and width.

:class:`PriorContract` is what a stage-two model was trained with: the stage-one weights'
fingerprint and every sampler setting that changes a prior's values. Stage two records it in
the saved model folder (``pipeline.json``); ``swintormer deblur`` samples with it and refuses a
cache or stage-one model made otherwise. :class:`PriorExpectation` is the partial form a
training config uses (``data.prior.expected``) to insist on some of those settings.

``PriorFolder`` file naming: the prior of ``<dataset_root>/<relative>/<stem>.<ext>`` is
``<folder>/<relative>/<stem>.<prior ext>`` when ``dataset_root`` is given (so GoPro scenes, whose
frame names repeat, stay apart), else ``<folder>/<stem>.<prior ext>``. Accepted prior files, in
the order looked for: ``.safetensors`` (one tensor named ``"prior"``, float H×W×3 in [0, 1]),
``.png``, ``.tif``, ``.tiff`` (8 or 16 bit, read with :func:`swintormer.core.image_io.read_image`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
from pydantic import Field

from swintormer.core.config import StrictModel
from swintormer.core.files import atomic_write_bytes
from swintormer.core.image_io import read_image

PRIOR_FILE_EXTENSIONS = (".safetensors", ".png", ".tif", ".tiff")
SAFETENSORS_PRIOR_KEY = "prior"


@runtime_checkable
class PriorSource(Protocol):
    """Anything that gives the prior of a blurry image file."""

    def prior_for(self, blurry_path: Path, blurry: np.ndarray | None = None) -> np.ndarray:
        """The prior of ``blurry_path``: float32 H×W×3 in [0, 1], the image's size.

        ``blurry`` is the decoded image when the caller has it: sources that compute the prior
        (a diffusion model sampling it now) use it; sources that look it up (a cache, files)
        ignore it.
        """
        ...


def _as_setting_text(value: Any) -> str:
    """A setting in the str -> str form cache entries store (floats by ``repr``: ``0.0``)."""
    if isinstance(value, bool):
        raise TypeError("prior settings hold no booleans")
    if isinstance(value, float):
        return repr(value)
    return str(value)


class PriorExpectation(StrictModel):
    """Prior settings a stage-two run insists on; unset fields are not checked.

    Field names and meanings are those of the prior cache's settings (``ldm_prior.cache``):
    the stage-one weights' fingerprint, the DDIM sampler's settings, the run seed and the rule
    that turns it into each image's seed ("content": from the image file's SHA-256, so a prior
    is the same wherever the file lies; "path": from its path relative to the dataset root,
    the rule of caches made before the content rule).
    """

    prior_fingerprint: str | None = None
    sampler: Literal["ddim"] | None = None
    steps: int | None = Field(None, ge=1)
    eta: float | None = Field(None, ge=0.0, le=1.0)
    mode: Literal["full", "quarter"] | None = None
    timestep_spacing: Literal["leading", "trailing"] | None = None
    tile: int | None = Field(None, ge=1)
    tile_stride: int | None = Field(None, ge=1)
    decode_tile: int | None = Field(None, ge=1)
    decode_stride: int | None = Field(None, ge=1)
    seed: int | None = None
    seed_rule: Literal["content", "path"] | None = None

    def as_metadata(self) -> dict[str, str]:
        """The set fields as the cache stores them (str -> str)."""
        return {key: _as_setting_text(value) for key, value in self.model_dump().items() if value is not None}

    def difference(self, found: dict[str, str]) -> str | None:
        """The first setting ``found`` (cache-style strings) disagrees on, as
        ``"steps is '5', expected '50'"``; None when all set fields agree."""
        for key, wanted in self.as_metadata().items():
            if found.get(key) != wanted:
                return f"{key} is {found.get(key)!r}, expected {wanted!r}"
        return None


class PriorContract(PriorExpectation):
    """Every setting that made a model's training priors (all fields set)."""

    prior_fingerprint: str
    sampler: Literal["ddim"] = "ddim"
    steps: int = Field(ge=1)
    eta: float = Field(ge=0.0, le=1.0)
    mode: Literal["full", "quarter"]
    timestep_spacing: Literal["leading", "trailing"]
    tile: int = Field(ge=1)
    tile_stride: int = Field(ge=1)
    decode_tile: int = Field(ge=1)
    decode_stride: int = Field(ge=1)
    seed: int
    seed_rule: Literal["content", "path"] = "content"

    @classmethod
    def from_metadata(cls, settings: dict[str, str]) -> "PriorContract":
        """The contract of a cache's recorded settings (``PriorCache.settings``)."""
        return cls.model_validate({key: settings[key] for key in cls.model_fields if key in settings})


class PriorMissingError(FileNotFoundError):
    """No prior file exists for an image; the message names the image and the paths tried."""


def _validate_prior(array: np.ndarray, origin: Path) -> np.ndarray:
    array = np.asarray(array, dtype=np.float32)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"{origin}: a prior must be H×W×3, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{origin}: prior holds NaN or infinity")
    return np.clip(array, 0.0, 1.0)


def save_prior_safetensors(path: str | os.PathLike[str], prior: np.ndarray) -> Path:
    """Write a prior (float H×W×3 in [0, 1]) as a ``.safetensors`` file, atomically."""
    from safetensors.numpy import save

    path = Path(path)
    array = _validate_prior(prior, path)
    atomic_write_bytes(path, save({SAFETENSORS_PRIOR_KEY: np.ascontiguousarray(array)}))
    return path


def load_prior_safetensors(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a prior written by :func:`save_prior_safetensors`."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="np") as handle:
            if SAFETENSORS_PRIOR_KEY not in handle.keys():
                raise ValueError(f"{path}: no tensor named {SAFETENSORS_PRIOR_KEY!r} (found {list(handle.keys())})")
            array = handle.get_tensor(SAFETENSORS_PRIOR_KEY)
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(f"{path}: cannot read safetensors prior ({exc})") from None
    return _validate_prior(array, path)


class PriorFolder:
    """Priors stored as files in ``folder`` (naming rule in the module docstring)."""

    def __init__(self, folder: str | os.PathLike[str], dataset_root: str | os.PathLike[str] | None = None):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"{self.folder}: prior folder not found")
        self.dataset_root = Path(dataset_root).resolve() if dataset_root is not None else None

    def candidates(self, blurry_path: Path) -> list[Path]:
        """The prior files looked for, in order, for ``blurry_path``."""
        blurry_path = Path(blurry_path)
        if self.dataset_root is not None:
            try:
                relative = blurry_path.resolve().relative_to(self.dataset_root).with_suffix("")
            except ValueError:
                raise PriorMissingError(
                    f"{blurry_path}: not inside the dataset folder {self.dataset_root}, so its prior "
                    f"cannot be found in {self.folder}"
                ) from None
        else:
            relative = Path(blurry_path.stem)
        return [self.folder / relative.parent / f"{relative.name}{extension}" for extension in PRIOR_FILE_EXTENSIONS]

    def prior_for(self, blurry_path: Path, blurry: np.ndarray | None = None) -> np.ndarray:
        tried = self.candidates(blurry_path)
        for candidate in tried:
            if candidate.is_file():
                if candidate.suffix == ".safetensors":
                    return load_prior_safetensors(candidate)
                return _validate_prior(read_image(candidate).pixels, candidate)
        raise PriorMissingError(
            f"{blurry_path}: no prior file (tried {', '.join(str(path) for path in tried)})"
        )
