"""Prior sampling: DDIM (Song et al., 2021, "Denoising diffusion implicit models") with T steps
and eta, one seed per image, in the two conditioning modes, over overlapping latent tiles with
blended seams so that memory is bounded by the tile batch.

``full`` (the authors' code): the blurry image is the condition, the latent has its size, the
VQ decoder returns ``f`` times the size, and the result is area-downsampled back.
``quarter``: the blurry image area-downsampled ``f`` times is the condition (the LDM SR model's
native task); the decoder returns the original size directly. Encoding and decoding are the
model's :class:`~ldm_prior.codec.LatentCodec`, the same as in training.

Tiles: at every DDIM step the UNet runs on overlapping latent tiles (``tile``/``tile_stride``,
``tile_batch`` tiles per forward pass) and the noise predictions are blended with triangular
weights before the scheduler step on the whole latent; the VQ decoder then runs on overlapping
latent tiles (``decode_tile``/``decode_stride``) blended the same way in pixel space. Memory is
bounded by the tile batch (plus the latent and the output image themselves). The denoising
tiles agree closely with untiled sampling (the UNet's receptive field is local). The decoder's
group norms and mid-block attention see only their tile, so decoded tiles differ from a whole
decode by more than the seam blend alone; keep ``decode_tile`` large (the default 64 latent
pixels = 256 output pixels in ``quarter`` mode) and the seams overlapping.

A ``residual`` prior (``PriorConfig.latent_target``) generates the difference from the blurry
image's own VQ latent: the sampler encodes the blurry image, in the decoder's tiles, and adds
that latent back before decoding. A ``pixel_residual`` prior decodes, per tile, the sampled
latent and the blurry image's latent, blends their difference and adds it to the blurry image.

Determinism: the initial noise and DDIM's eta noise come from a CPU generator seeded for that
image alone (:func:`image_seed`), drawn for the whole latent, so a prior does not depend on the
tiling, the device, the batch or which process sampled it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ldm_prior.codec import CONDITIONING_MODES, ConditioningMode, LatentCodec
from ldm_prior.model import PriorModel
from swintormer.core.padding import pad_to_multiple
from swintormer.core.tiling import OverlapAccumulator, triangle_weights, window_starts

TimestepSpacing = Literal["leading", "trailing"]
TIMESTEP_SPACINGS: tuple[str, ...] = ("leading", "trailing")


@dataclass(frozen=True)
class SamplingSettings:
    """How a prior is sampled. The tile sizes are in latent pixels (the authors: 128 / 64).

    ``timestep_spacing`` places the T DDIM timesteps among the 1000 training ones. ``leading``
    (the authors' and LDM's sampler; diffusers' default) takes 0, 1000/T, …, so the first step
    treats pure noise as the latent at t = 1000 − 1000/T: 980 for T = 50, but 800 for T = 5 and 0
    for T = 1, where the model expects a latent with signal left in it. ``trailing`` (Lin et al.,
    2024, "Common diffusion noise schedules and sample steps are flawed") ends the list at t = 999,
    so sampling always starts from the noise level it is drawn at; it matters for small T.
    """

    steps: int = 50
    eta: float = 0.0
    mode: ConditioningMode = "full"
    timestep_spacing: TimestepSpacing = "leading"
    tile: int = 128
    tile_stride: int = 64
    decode_tile: int = 64
    decode_stride: int = 48
    tile_batch: int = 4

    def __post_init__(self) -> None:
        if self.mode not in CONDITIONING_MODES:
            raise ValueError(f"unknown conditioning mode {self.mode!r}; choose one of {CONDITIONING_MODES}")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must lie in [0, 1], got {self.eta}")
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"unknown timestep spacing {self.timestep_spacing!r}; choose one of {TIMESTEP_SPACINGS}")
        for name in ("tile", "tile_stride", "decode_tile", "decode_stride", "tile_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.tile_stride > self.tile or self.decode_stride > self.decode_tile:
            raise ValueError("a tile stride larger than the tile would leave gaps between tiles")

    def as_metadata(self) -> dict[str, str]:
        """The settings as the str -> str dict a cache entry stores."""
        return {
            "sampler": "ddim",
            "steps": str(self.steps),
            "eta": repr(float(self.eta)),
            "mode": self.mode,
            "timestep_spacing": self.timestep_spacing,
            "tile": str(self.tile),
            "tile_stride": str(self.tile_stride),
            "decode_tile": str(self.decode_tile),
            "decode_stride": str(self.decode_stride),
        }


def image_seed(global_seed: int, image_name: str) -> int:
    """The seed of one image, from the run's seed and the image's name only (never from a shared
    generator stream), so that any sharding over processes gives the same noise."""
    digest = hashlib.sha256(f"{int(global_seed)}:{image_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _round_up(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


def _tiled_apply(
    source: torch.Tensor,
    tile: int,
    stride: int,
    batch: int,
    multiple: int,
    scale: int,
    out_channels: int,
    apply: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Run ``apply`` on overlapping tiles of ``source`` (1 x C x h x w) and blend the outputs,
    whose side is ``scale`` times the tile's, with triangular weights."""
    _, _, height, width = source.shape
    tile_h = min(_round_up(tile, multiple), height)
    tile_w = min(_round_up(tile, multiple), width)
    rows, cols = window_starts(height, tile_h, stride), window_starts(width, tile_w, stride)
    if len(rows) * len(cols) == 1:
        return apply(source)
    blended = OverlapAccumulator(height, width, rows, cols, triangle_weights(tile_h * scale),
                                 triangle_weights(tile_w * scale), scale=scale, dtype=torch.float32,
                                 device=source.device)
    boxes = [(y, x) for y in rows for x in cols]
    for first in range(0, len(boxes), batch):
        group = boxes[first : first + batch]
        crops = torch.cat([source[:, :, y : y + tile_h, x : x + tile_w] for y, x in group])
        for (y, x), result in zip(group, apply(crops).float()):
            blended.add(y, x, result)
    return blended.result()[None]


class PriorSampler:
    """Samples priors from a :class:`PriorModel` with fixed :class:`SamplingSettings`."""

    def __init__(self, model: PriorModel, settings: SamplingSettings) -> None:
        self.model = model.eval()
        self.settings = settings

    @property
    def device(self) -> torch.device:
        return next(self.model.unet.parameters()).device

    @property
    def codec(self) -> LatentCodec:
        """The model's latent codec in the sampling mode."""
        return LatentCodec.for_model(self.model, self.settings.mode)

    @torch.inference_mode()
    def sample(self, blurry: np.ndarray | torch.Tensor, seed: int, progress: bool = False) -> np.ndarray:
        """The prior of one blurry image (H x W x 3 float in [0, 1]) as float32 H x W x 3 in [0, 1]."""
        height, width = np.shape(blurry)[:2]
        config, settings, codec = self.model.config, self.settings, self.codec
        dtype = next(self.model.vqvae.parameters()).dtype
        latents, blurry_latent, padded = self._sample(blurry, seed, progress)
        channels = config.vqvae.latent_channels

        # Each tile is decoded (and in full mode area-downsampled) at once, so only
        # base-resolution pixels are ever held for the whole image.
        def decode(tiles: torch.Tensor) -> torch.Tensor:
            if config.pixel_residual:
                # The change the residual makes to the decoding; the blurry image is added after
                # blending (blending is linear, so that is the same as adding it per tile).
                decoded, base = (codec.decode(part.to(dtype)).float() for part in tiles.split(channels, dim=1))
                return decoded - base
            # Clamped at the decoder's size, before the area downsampling of full mode.
            return codec.to_blurry_size(codec.vq_decode(tiles.to(dtype)).float().clamp(-1, 1))

        source = torch.cat([latents, blurry_latent], dim=1) if config.pixel_residual else latents
        out_scale = 1 if settings.mode == "full" else config.vq_factor
        decoded = _tiled_apply(source, settings.decode_tile, settings.decode_stride, settings.tile_batch, 1, out_scale,
                               config.image_channels, decode)
        if config.pixel_residual:
            decoded = decoded + padded * 2 - 1
        prior = (decoded[0, :, :height, :width] + 1) / 2
        return prior.clamp(0, 1).permute(1, 2, 0).contiguous().cpu().numpy().astype(np.float32)

    @torch.inference_mode()
    def sample_latent(self, blurry: np.ndarray | torch.Tensor, seed: int, progress: bool = False) -> torch.Tensor:
        """The VQ latent that :meth:`sample` decodes (1 x C x h x w, float32, of the image padded
        to the UNet's multiple): DDIM's result with the latent scale undone and, for a
        ``residual`` prior, the blurry image's latent added."""
        return self._sample(blurry, seed, progress)[0]

    def _sample(
        self, blurry: np.ndarray | torch.Tensor, seed: int, progress: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(:meth:`sample_latent`'s latent, the blurry image's VQ latent for a ``residual`` prior
        or None, the blurry image padded as the sampler saw it: 1 x 3 x H' x W' in [0, 1])."""
        pixels = torch.as_tensor(np.asarray(blurry, dtype=np.float32))
        if pixels.ndim != 3 or pixels.shape[2] != self.model.config.image_channels:
            raise ValueError(f"expected an H x W x {self.model.config.image_channels} image, got shape {tuple(pixels.shape)}")
        config, settings, device, codec = self.model.config, self.settings, self.device, self.codec
        dtype = next(self.model.unet.parameters()).dtype
        image = pixels.permute(2, 0, 1)[None].to(device=device, dtype=torch.float32)
        multiple = config.unet_multiple
        # The latent (the condition's size) must fit the UNet's down/up path: in quarter mode the
        # image is downsampled by the VQ factor first. Mirror padding keeps the border statistics
        # natural; the prior is cropped back to the image's size.
        padded = pad_to_multiple(image, multiple if settings.mode == "full" else config.vq_factor * multiple)
        condition = codec.condition(padded).to(dtype)
        blurry_latent = self._blurry_latent(padded) if codec.residual else None

        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        latent_shape = (1, config.vqvae.latent_channels, condition.shape[-2], condition.shape[-1])
        scheduler = self.model.ddim_scheduler(settings.timestep_spacing)
        scheduler.set_timesteps(settings.steps)
        latents = torch.randn(latent_shape, generator=generator, dtype=torch.float32).to(device)
        latents = latents * scheduler.init_noise_sigma

        for timestep in tqdm(scheduler.timesteps, desc="DDIM", leave=False, disable=not progress):
            noise_prediction = _tiled_apply(
                torch.cat([latents.to(dtype), condition], dim=1),
                settings.tile,
                settings.tile_stride,
                settings.tile_batch,
                multiple,
                1,
                config.vqvae.latent_channels,
                lambda tiles: self.model.unet(tiles, timestep).sample,
            )
            variance_noise = None
            if settings.eta > 0:
                variance_noise = torch.randn(latent_shape, generator=generator, dtype=torch.float32).to(device)
            latents = scheduler.step(noise_prediction, timestep, latents, eta=settings.eta, variance_noise=variance_noise).prev_sample

        return codec.to_vq_latent(latents, blurry_latent), blurry_latent, padded

    def _blurry_latent(self, padded: torch.Tensor) -> torch.Tensor:
        """The VQ latent of the (padded) blurry image, which a ``residual`` prior's sample is added
        to; encoded in the decoder's overlapping tiles, so that memory stays bounded by the tile
        batch as for decoding."""
        settings, factor, codec = self.settings, self.model.config.vq_factor, self.codec
        dtype = next(self.model.vqvae.parameters()).dtype
        # Tiles are cut on the latent grid: in quarter mode each latent pixel holds its f x f
        # block of image pixels as channels.
        grid = padded if settings.mode == "full" else F.pixel_unshuffle(padded, factor)

        def encode(tiles: torch.Tensor) -> torch.Tensor:
            pixels = tiles if settings.mode == "full" else F.pixel_shuffle(tiles, factor)
            return codec.encode(pixels.to(dtype)).float()

        return _tiled_apply(grid, settings.decode_tile, settings.decode_stride, settings.tile_batch, 1, 1,
                            self.model.config.vqvae.latent_channels, encode)


def sample_prior(
    model: PriorModel, blurry: np.ndarray, seed: int, settings: SamplingSettings | None = None, progress: bool = False
) -> np.ndarray:
    """Convenience wrapper: one prior with ``settings`` (defaults: T = 50, eta 0, ``full``)."""
    return PriorSampler(model, settings or SamplingSettings()).sample(blurry, seed, progress=progress)
