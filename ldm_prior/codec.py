"""The latent codec of stage one: how images become the latents the diffusion works on, and back.

Latent diffusion (Rombach et al., 2022, "High-resolution image synthesis with latent diffusion
models") runs the diffusion on the latent of a VQGAN first stage (Esser et al., 2021,
taming-transformers): an image in [-1, 1] is encoded *before* quantisation (LDM's
``encode_first_stage``), multiplied by the latent scale (LDM's ``scale_factor``) for the
diffusion, and quantised and decoded at the end (diffusers' ``VQModel.decode`` quantises first).
The UNet sees the condition as extra input channels beside the noisy latent (LDM's
``concat`` conditioning of its super-resolution model).

The conditioning mode decides the sizes:

* ``full`` (the authors' code): the condition is the blurry image itself, so the latent has the
  blurry image's size. An image is upsampled 4x (bicubic) before it is encoded, and a decoding,
  4x the latent's size, is area-downsampled back to the blurry image's size.
* ``quarter`` (the LDM 4x super-resolution model's native task): the condition is the blurry
  image area-downsampled by the VQ factor; images are encoded as they are and decodings have
  the blurry image's size.

What the diffusion generates (``PriorConfig.latent_target``): ``sharp`` (LDM, the authors), the
sharp image's latent; or ``residual``, that latent minus the blurry image's, which decoding adds
back. A ``pixel_residual`` prior is the blurry image plus the change the sampled latent makes to
the decoding, B + dec(z) − dec(z_B).

A :class:`LatentCodec` is built once for a model and a mode (:meth:`LatentCodec.for_model`) and
used by the training losses (``ldm_prior.finetune``), validation (``ldm_prior.trainer``) and the
sampler (``ldm_prior.sampling``), so all three encode and decode the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from diffusers import VQModel

if TYPE_CHECKING:
    from ldm_prior.model import PriorModel

ConditioningMode = Literal["full", "quarter"]
CONDITIONING_MODES: tuple[str, ...] = ("full", "quarter")


@dataclass(frozen=True, eq=False)
class LatentCodec:
    """A model's VQ autoencoder and latent settings, seen through one conditioning mode.

    Images are N x 3 x H x W tensors in [0, 1] unless a method says otherwise; decodings are in
    [-1, 1] give or take the decoder's overshoot (they are not clamped here).
    """

    vqvae: VQModel
    mode: ConditioningMode
    vq_factor: int
    latent_scale: float = 1.0
    latent_target: Literal["sharp", "residual"] = "sharp"
    pixel_residual: bool = False

    def __post_init__(self) -> None:
        if self.mode not in CONDITIONING_MODES:
            raise ValueError(f"unknown conditioning mode {self.mode!r}; choose one of {CONDITIONING_MODES}")

    @classmethod
    def for_model(cls, model: PriorModel, mode: str) -> LatentCodec:
        """The codec of ``model`` (its VQ autoencoder and the latent settings of its config, as
        they are now) in conditioning ``mode``."""
        config = model.config
        return cls(model.vqvae, mode, config.vq_factor, config.latent_scale, config.latent_target, config.pixel_residual)

    @property
    def residual(self) -> bool:
        """Whether the diffusion generates the residual over the blurry image's latent."""
        return self.latent_target == "residual"

    # ------------------------------------------------------------------ images to latents

    def encoder_input(self, image: torch.Tensor) -> torch.Tensor:
        """The image (in [0, 1]) whose VQ encoding is ``image``'s latent: the image itself in
        ``quarter`` mode, its 4x bicubic upsampling in ``full`` mode (so that the latent has the
        blurry image's size)."""
        if self.mode == "full":
            return F.interpolate(image, scale_factor=self.vq_factor, mode="bicubic", align_corners=False).clamp(0, 1)
        return image

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """The VQ latent of ``image``: its encoding before quantisation (as LDM trains) and
        before the latent scale."""
        return self.vqvae.encode(self.encoder_input(image) * 2 - 1).latents

    def blurry_latent(self, blurry: torch.Tensor) -> torch.Tensor | None:
        """The blurry image's latent that a ``residual`` prior's sample is added to; None for a
        ``sharp`` prior, which needs none."""
        return self.encode(blurry) if self.residual else None

    def condition(self, blurry: torch.Tensor) -> torch.Tensor:
        """The UNet's condition in [-1, 1]: the blurry image (``full``) or its area
        downsampling by the VQ factor (``quarter``)."""
        condition = blurry if self.mode == "full" else F.avg_pool2d(blurry, self.vq_factor)
        return condition * 2 - 1

    @torch.no_grad()
    def target_and_condition(self, blurry: torch.Tensor, sharp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the diffusion generates (the scaled latent of the sharp image, or for a
        ``residual`` prior its difference from the blurry image's) and the condition."""
        latents = self.encode(sharp)
        if self.residual:
            latents = latents - self.encode(blurry)
        return latents * self.latent_scale, self.condition(blurry)

    # ------------------------------------------------------------------ latents to images

    def to_vq_latent(self, latents: torch.Tensor, blurry_latent: torch.Tensor | None) -> torch.Tensor:
        """The VQ latent to decode from what the diffusion generated: the scale undone and, for a
        ``residual`` prior, the blurry image's latent (:meth:`blurry_latent`) added back."""
        latents = latents / self.latent_scale
        if self.residual:
            if blurry_latent is None:
                raise ValueError("a residual prior needs the blurry image's latent to decode")
            latents = latents + blurry_latent
        return latents

    def vq_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The VQ decoder's image of ``latents`` (quantised first), at the decoder's size: the
        factor times the latent's side."""
        return self.vqvae.decode(latents).sample

    def to_blurry_size(self, decoded: torch.Tensor) -> torch.Tensor:
        """A VQ decoding brought to the blurry image's size: area-downsampled by the VQ factor in
        ``full`` mode (whose latent has the blurry image's size), unchanged in ``quarter`` mode."""
        return F.avg_pool2d(decoded, self.vq_factor) if self.mode == "full" else decoded

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The decoding of a VQ latent at the blurry image's size (:meth:`vq_decode`, then
        :meth:`to_blurry_size`)."""
        return self.to_blurry_size(self.vq_decode(latents))

    def pixel_residual_image(
        self, blurry: torch.Tensor, decoded: torch.Tensor, blurry_latent: torch.Tensor
    ) -> torch.Tensor:
        """A ``pixel_residual`` prior's image in [-1, 1] (before clamping): the blurry image plus
        ``decoded`` (a :meth:`decode`) minus the decoding of the blurry image's own latent,
        B + dec(z) − dec(z_B). The sampler computes the same per decoding tile."""
        return blurry * 2 - 1 + decoded - self.decode(blurry_latent)

    def prior_image(
        self, latents: torch.Tensor, blurry: torch.Tensor, blurry_latent: torch.Tensor | None
    ) -> torch.Tensor:
        """The prior (in [-1, 1], before clamping) that the VQ latent ``latents`` gives: its
        decoding, or for a ``pixel_residual`` prior :meth:`pixel_residual_image` of it."""
        if self.pixel_residual:
            return self.pixel_residual_image(blurry, self.decode(latents), blurry_latent)
        return self.decode(latents)

    def reconstruct(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VQ autoencoder's reconstruction of ``image`` (in [-1, 1], ``image``'s size) and its
        codebook/commitment loss (what moves the codebook); gradients reach encoder, codebook and
        decoder. In ``full`` mode the 4x upsampled image is encoded and the decoding
        area-downsampled back, exactly as a sampled prior is."""
        decoded = self.vqvae.decode(self.encode(image))
        return self.to_blurry_size(decoded.sample), decoded.commit_loss
