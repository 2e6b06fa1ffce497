"""``DeblurPipeline``: the whole deblurring algorithm behind one call, as diffusers' pipelines are.

    from swintormer.pipeline import DeblurPipeline

    pipe = DeblurPipeline.from_pretrained()            # the shipped default model, on the CPU
    restored = pipe("photo.jpg")                       # float32 H×W×3 in [0, 1]

Components:

* ``model``: a :class:`swintormer.models.Swintormer` (3 input channels: blurry RGB; 6: blurry RGB
  then the prior's RGB);
* ``prior``: for a 6-channel model, a :class:`swintormer.core.priors.PriorSource` (stage one's
  prior cache, priors sampled now by a stage-one model, or prior files); stage two never calls
  the diffusion model itself;
* ``settings``: :class:`InferenceSettings`, how the network is run over the image: overlapping
  windows of the training size whose overlaps are averaged (the Swintormer paper's inference),
  or the whole image at once;
* ``prior_contract``: for a 6-channel model trained on cached priors, the
  :class:`swintormer.core.priors.PriorContract` they were made with (stage-one weights
  fingerprint, sampler settings, seed). The pipeline does not enforce it (a prior source is
  any object with ``prior_for``); ``swintormer deblur`` samples with it and refuses a cache or
  stage-one model made otherwise.

``save_pretrained(dir)`` writes the model (``config.json``, ``model.safetensors``) and the
settings and prior contract (``pipeline.json``); ``from_pretrained(dir)`` reads them back. A training run saves the
patch size it trained at as the default window size, since the network is run best at the size
it learnt.

Devices: the CPU inference engine (``swintormer.models.cpu_inference``) is applied on the CPU
only; a pipeline on another device puts a converted model's reference modules back. On CUDA, an
image that runs out of device memory is tried again with half the window batch (down to one
window), and the smaller batch is kept for the following images.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, ValidationError, model_validator

from swintormer.core.config import StrictModel
from swintormer.core.files import atomic_write_text
from swintormer.core.image_io import read_image
from swintormer.core.priors import PriorContract, PriorSource
from swintormer.inference import SlidingWindowInferencer, WholeImageInferencer
from swintormer.models import Swintormer

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "weights" / "default"
PIPELINE_CONFIG_NAME = "pipeline.json"
PRIOR_CONTRACT_KEY = "prior_contract"  # in pipeline.json, beside the inference settings


class InferenceSettings(StrictModel):
    """How the network is run over an image (see ``swintormer.inference``)."""

    tile: int = Field(256, gt=0)  # window side; best at the training patch size
    stride: int | None = Field(None, gt=0)  # distance between window starts; None: 3/4 of the tile
    batch_size: int = Field(4, gt=0)  # windows per forward pass: memory grows with it
    blend: Literal["average", "feather"] = "average"
    precision: Literal["fp32", "bf16"] = "fp32"
    whole: bool = False  # one forward pass over the whole image instead of windows

    @model_validator(mode="after")
    def _stride_within_tile(self) -> "InferenceSettings":
        if self.stride is not None and self.stride > self.tile:
            raise ValueError(f"stride {self.stride} is larger than the tile {self.tile}; windows would leave gaps")
        return self


class PriorRequiredError(ValueError):
    """A 6-channel model was called without a way to get the image's prior."""


class DeblurPipeline:
    """A Swintormer, an optional prior source and the inference settings (module docstring)."""

    def __init__(self, model: Swintormer, prior: PriorSource | None = None,
                 settings: InferenceSettings | None = None, device: torch.device | str | None = None,
                 progress: bool = False, prior_contract: PriorContract | None = None) -> None:
        self.model = model
        self.prior = prior
        self.settings = settings or InferenceSettings()
        self.prior_contract = prior_contract
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.progress = progress
        if self.device.type != "cpu":
            from swintormer.models.cpu_inference import is_prepared, restore_reference

            if is_prepared(model):  # the CPU engine's paths are for CPU inference only
                restore_reference(model)
        # Windows per forward pass actually used: settings.batch_size, halved after an
        # out-of-memory error on the device.
        self.window_batch = self.settings.batch_size
        in_channels = model.config.in_channels
        if in_channels == 3 and prior is not None:
            raise ValueError("the model takes no prior (3 input channels); build the pipeline without one")
        if in_channels not in (3, 6):
            raise ValueError(f"the model has {in_channels} input channels; a pipeline runs 3 (no prior) or 6")

    @property
    def needs_prior(self) -> bool:
        return self.model.config.in_channels == 6

    # ---- loading and saving

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str] | None = None, prior: PriorSource | None = None,
                        device: torch.device | str = "cpu", fast_cpu: bool = True,
                        **settings) -> "DeblurPipeline":
        """Load a pipeline folder (or a bare model folder; default: the shipped model).

        ``settings`` override the saved :class:`InferenceSettings` (e.g. ``tile=512``). On the
        CPU, ``fast_cpu`` converts the network with
        :func:`swintormer.models.cpu_inference.prepare_for_inference` (same outputs, faster;
        the converted model is for inference only).
        """
        directory = Path(directory) if directory is not None else DEFAULT_MODEL_DIR
        if not directory.is_dir():
            hint = " (the shipped default model is not installed)" if directory == DEFAULT_MODEL_DIR else ""
            raise FileNotFoundError(f"model folder not found: {directory}{hint}")
        saved = {}
        config_path = directory / PIPELINE_CONFIG_NAME
        if config_path.is_file():
            try:
                saved = json.loads(config_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as error:
                raise ValueError(f"{config_path}: cannot read pipeline settings ({error})") from None
        contract = saved.pop(PRIOR_CONTRACT_KEY, None)
        if contract is not None:
            try:
                contract = PriorContract.model_validate(contract)
            except ValidationError as error:
                details = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
                raise ValueError(f"{config_path}: invalid {PRIOR_CONTRACT_KEY} ({details})") from None
        try:
            resolved = InferenceSettings(**{**saved, **{k: v for k, v in settings.items() if v is not None}})
        except ValidationError as error:
            details = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in error.errors())
            raise ValueError(f"inference settings: {details}") from None
        device = torch.device(device)
        model = Swintormer.from_pretrained(directory).to(device).eval()
        if fast_cpu and device.type == "cpu":
            from swintormer.models.cpu_inference import prepare_for_inference

            model = prepare_for_inference(model)
        return cls(model, prior=prior, settings=resolved, device=device, prior_contract=contract)

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write the model and ``pipeline.json`` (the inference settings and the prior contract)
        to ``directory``."""
        directory = Path(self.model.save_pretrained(directory))
        saved = self.settings.model_dump(mode="json")
        if self.prior_contract is not None:
            saved[PRIOR_CONTRACT_KEY] = self.prior_contract.model_dump(mode="json")
        atomic_write_text(directory / PIPELINE_CONFIG_NAME, json.dumps(saved, indent=2) + "\n")
        return directory

    # ---- the algorithm

    def inferencer(self) -> SlidingWindowInferencer | WholeImageInferencer:
        """The runner the settings describe (windows, or the whole image)."""
        s = self.settings
        if s.whole:
            return WholeImageInferencer(self.model, precision=s.precision, device=self.device)
        return SlidingWindowInferencer(self.model, tile=s.tile, stride=s.stride,
                                       batch_size=min(self.window_batch, s.batch_size),
                                       blend=s.blend, precision=s.precision, device=self.device,
                                       progress=self.progress)

    def prior_for(self, blurry: np.ndarray, path: Path | None) -> np.ndarray:
        """The prior of one image from the pipeline's source: float32 H×W×3, the image's size."""
        if self.prior is None:
            raise PriorRequiredError("the model needs a prior for every image (6 input channels): give the "
                                     "pipeline a prior source, or pass prior= with the image")
        if path is None:
            raise PriorRequiredError("priors are looked up by the image's file: call the pipeline with a path, "
                                     "or pass prior= with the array")
        prior = np.asarray(self.prior.prior_for(path, blurry), dtype=np.float32)
        if prior.shape != blurry.shape:
            raise ValueError(f"{path}: its prior has shape {prior.shape}, the image {blurry.shape}")
        return prior

    def __call__(self, image: str | os.PathLike[str] | np.ndarray, prior: np.ndarray | None = None, *,
                 source_path: str | os.PathLike[str] | None = None) -> np.ndarray:
        """Deblur one image: a file path (read upright, 8 or 16 bit) or a float H×W×3 array in
        [0, 1]. ``prior`` gives a 6-channel model its prior directly; otherwise the pipeline's
        prior source is asked for the prior of the file (``source_path`` names the file an
        array was decoded from). Returns float32 H×W×3."""
        path = Path(source_path) if source_path is not None else None
        if isinstance(image, (str, os.PathLike)):
            path = Path(image)
            image = read_image(path).pixels
        blurry = np.asarray(image, dtype=np.float32)
        if blurry.ndim != 3 or blurry.shape[2] != 3:
            raise ValueError(f"expected an H×W×3 RGB image, got shape {blurry.shape}")
        if self.needs_prior:
            prior = self.prior_for(blurry, path) if prior is None else np.asarray(prior, dtype=np.float32)
            if prior.shape != blurry.shape:
                raise ValueError(f"the prior has shape {prior.shape}, the image {blurry.shape}")
            network_input = np.concatenate([blurry, prior], axis=2)
        elif prior is not None:
            raise ValueError("the model takes no prior (3 input channels)")
        else:
            network_input = blurry
        return self._run(network_input)

    def _run(self, network_input: np.ndarray) -> np.ndarray:
        """The inferencer on one image; on a device out-of-memory error, again with half the
        window batch, down to one window (then the error stands)."""
        while True:
            try:
                return self.inferencer()(network_input)
            except torch.cuda.OutOfMemoryError:
                if self.settings.whole or self.window_batch <= 1:
                    raise
                failed = min(self.window_batch, self.settings.batch_size)
            # Out of the except block: the failed attempt's tensors are freed with its traceback.
            self.window_batch = max(1, failed // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            warnings.warn(f"out of device memory with {failed} windows per batch; trying the image again "
                          f"with {self.window_batch}", RuntimeWarning, stacklevel=3)
