"""Stage-one fine-tuning: which parameters train (name patterns) and the loss of one step.

SPEC 4: the VQ encoder and the UNet backbone (``conv_in``, time embedding, down blocks, mid
block) stay frozen; the decoder side trains. Two objectives:

* ``noise`` (default): the UNet decoder side learns the usual noise prediction (or velocity
  prediction, for a schedule with ``prediction_type: v_prediction``). The clean
  latent is the VQ encoding of the sharp image (upsampled 4x first in ``full`` mode, so the
  latent has the blurry image's size); the condition is the blurry image (``full``) or its 4x
  area-downsampled copy (``quarter``). A ``residual`` model (``PriorConfig.latent_target``)
  generates the sharp latent minus the blurry image's latent instead.
* ``vq_decoder``: the VQ decoder learns to turn the UNet's one-step estimate of the clean
  latent into the sharp image: L1, plus LPIPS and the PatchGAN hinge term (taming-transformers'
  ``NLayerDiscriminator``) when their weights are positive. The UNet is frozen unless patterns
  select parts of it, which then learn from the same pixel loss.

A third objective, ``vq_autoencoder``, is not part of the authors' method: it trains a VQGAN
built from random weights (encoder included) as an autoencoder of sharp images (L1; in ``full``
mode of their 4x upsampled copies, decoded and area-downsampled as a prior is), the step a
from-scratch CPU model needs before any prior it samples can resemble an image.

Parameter names carry the component prefix: ``unet.up_blocks.0.resnets.0.conv1.weight``,
``vqvae.decoder.conv_out.bias``; patterns are shell-style (``fnmatch``).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ldm_prior.model import PriorModel

Objective = Literal["noise", "vq_decoder", "vq_autoencoder"]

#: The UNet's decoder side: what the authors fine-tune by default.
UNET_DECODER_PATTERNS: tuple[str, ...] = ("unet.up_blocks.*", "unet.conv_norm_out.*", "unet.conv_out.*")
#: The VQ decoder (after quantisation).
VQ_DECODER_PATTERNS: tuple[str, ...] = ("vqvae.post_quant_conv.*", "vqvae.decoder.*")
#: Never trained, whatever the patterns say: the frozen encoder and backbone of SPEC 4.
FROZEN_PATTERNS: tuple[str, ...] = (
    "vqvae.encoder.*", "vqvae.quant_conv.*", "vqvae.quantize.*",
    "unet.conv_in.*", "unet.time_embedding.*", "unet.down_blocks.*", "unet.mid_block.*",
)


@dataclass(frozen=True)
class TrainableSelection:
    """The outcome of :func:`select_trainable`."""

    trainable_names: tuple[str, ...]
    trainable_count: int
    frozen_count: int

    def describe(self) -> str:
        return (f"trainable parameters: {self.trainable_count:,} in {len(self.trainable_names)} tensors; "
                f"frozen: {self.frozen_count:,}")


def select_trainable(
    model: PriorModel, patterns: tuple[str, ...] | list[str], allow_frozen: bool = False
) -> TrainableSelection:
    """Set ``requires_grad`` on the parameters whose names match ``patterns`` and clear it on all
    others. A pattern that matches nothing, or one that would train a frozen part (unless
    ``allow_frozen``, for the from-scratch ``vq_autoencoder`` objective), is an error naming it."""
    names = [name for name, _ in model.named_parameters()]
    for pattern in patterns:
        matched = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            raise ValueError(f"trainable pattern {pattern!r} matches no parameter (names look like {names[0]!r})")
        forbidden = [name for name in matched if any(fnmatch.fnmatchcase(name, frozen) for frozen in FROZEN_PATTERNS)]
        if forbidden and not allow_frozen:
            raise ValueError(f"trainable pattern {pattern!r} selects {forbidden[0]!r}, part of the frozen "
                             "VQ encoder / UNet backbone")
    trainable, trainable_count, frozen_count = [], 0, 0
    for name, parameter in model.named_parameters():
        wanted = any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
        parameter.requires_grad_(wanted)
        if wanted:
            trainable.append(name)
            trainable_count += parameter.numel()
        else:
            frozen_count += parameter.numel()
    return TrainableSelection(tuple(trainable), trainable_count, frozen_count)


def check_patch_size(model: PriorModel, height: int, width: int, mode: str) -> None:
    """Training patches must fit the UNet's down/up path without padding."""
    unit = model.config.unet_multiple * (model.config.vq_factor if mode == "quarter" else 1)
    if height % unit or width % unit:
        raise ValueError(f"training patches of {height}x{width} do not fit mode {mode!r}: both sides must be "
                         f"multiples of {unit}")


def image_to_encode(model: PriorModel, image: torch.Tensor, mode: str) -> torch.Tensor:
    """The image (in [0, 1]) whose VQ encoding is ``image``'s latent in ``mode``: the image itself
    in ``quarter`` mode, its 4x bicubic upsampling in ``full`` mode (so that the latent has the
    blurry image's size)."""
    if mode == "full":
        return F.interpolate(image, scale_factor=model.config.vq_factor, mode="bicubic", align_corners=False).clamp(0, 1)
    if mode == "quarter":
        return image
    raise ValueError(f"unknown conditioning mode {mode!r}")


def vq_latent(model: PriorModel, image: torch.Tensor, mode: str) -> torch.Tensor:
    """The VQ encoding of an N x 3 x H x W image in [0, 1] as ``mode`` sees it: before
    quantisation (as LDM trains) and before the latent scale."""
    return model.vqvae.encode(image_to_encode(model, image, mode) * 2 - 1).latents


@torch.no_grad()
def latent_target_and_condition(
    model: PriorModel, blurry: torch.Tensor, sharp: torch.Tensor, mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the diffusion generates (the scaled VQ latent of the sharp image, or for a
    ``residual`` model its difference from the blurry image's) and the condition, from
    N x 3 x H x W images in [0, 1]."""
    latents = vq_latent(model, sharp, mode)
    if model.config.latent_target == "residual":
        latents = latents - vq_latent(model, blurry, mode)
    condition = blurry if mode == "full" else F.avg_pool2d(blurry, model.config.vq_factor)
    return latents * model.config.latent_scale, condition * 2 - 1


def to_vq_latent(model: PriorModel, latents: torch.Tensor, blurry_latent: torch.Tensor | None) -> torch.Tensor:
    """The VQ latent to decode from what the diffusion generated: the scale undone and, for a
    ``residual`` model, the blurry image's own latent (:func:`vq_latent`) added back."""
    latents = latents / model.config.latent_scale
    if model.config.latent_target == "residual":
        if blurry_latent is None:
            raise ValueError("a residual prior needs the blurry image's latent to decode")
        latents = latents + blurry_latent
    return latents


def _noisy(
    scheduler, latents: torch.Tensor, generator: torch.Generator | None,
    max_timestep: int | None = None, min_timestep: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``latents`` noised at a random timestep in [``min_timestep``, ``max_timestep``) (default:
    all of them); returns (noisy latents, noise, timesteps). A CPU ``generator`` makes the draw
    reproducible."""
    count = scheduler.config.num_train_timesteps
    if max_timestep is not None:
        count = min(max_timestep, count)
    if not 0 <= min_timestep < count:
        raise ValueError(f"min_timestep {min_timestep} must lie in [0, {count})")
    if generator is None:
        timesteps = torch.randint(min_timestep, count, (latents.shape[0],), device=latents.device)
        noise = torch.randn_like(latents)
    else:
        timesteps = torch.randint(min_timestep, count, (latents.shape[0],), generator=generator).to(latents.device)
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
    return scheduler.add_noise(latents, noise, timesteps), noise, timesteps


def prediction_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict: the noise, or the velocity (``prediction_type``)."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def clean_latent_estimate(scheduler, noisy: torch.Tensor, prediction: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The one-step estimate of the clean latent from the UNet's prediction at ``timesteps``."""
    alpha_bar = scheduler.alphas_cumprod.to(noisy.device)[timesteps].view(-1, 1, 1, 1)
    if scheduler.config.prediction_type == "v_prediction":
        return alpha_bar.sqrt() * noisy - (1 - alpha_bar).sqrt() * prediction
    return (noisy - (1 - alpha_bar).sqrt() * prediction) / alpha_bar.sqrt()


def noise_prediction_loss(
    model: PriorModel, blurry: torch.Tensor, sharp: torch.Tensor, mode: str, scheduler,
    generator: torch.Generator | None = None, unet: nn.Module | None = None,
) -> torch.Tensor:
    """DDPM training: MSE between the UNet's prediction at a random timestep and its target (the
    noise, or the velocity for a ``v_prediction`` schedule).
    ``generator`` (CPU) fixes timesteps and noise, for a deterministic validation loss;
    ``unet`` overrides ``model.unet`` (e.g. a DDP-wrapped one)."""
    latents, condition = latent_target_and_condition(model, blurry, sharp, mode)
    noisy, noise, timesteps = _noisy(scheduler, latents, generator)
    prediction = (unet or model.unet)(torch.cat([noisy, condition], dim=1), timesteps).sample
    return F.mse_loss(prediction.float(), prediction_target(scheduler, latents, noise, timesteps).float())


def vq_decoder_reconstruction(
    model: PriorModel, blurry: torch.Tensor, sharp: torch.Tensor, mode: str, scheduler,
    max_timestep: int = 200, generator: torch.Generator | None = None, min_timestep: int = 0,
) -> torch.Tensor:
    """The sharp-size image (in [-1, 1]) the VQ decoder makes from the UNet's one-step estimate
    of the clean latent at a random timestep in [``min_timestep``, ``max_timestep``): its
    decoding, or for a ``pixel_residual`` prior the blurry image plus the change the estimate
    makes to the decoding. Gradients reach the VQ decoder side.

    The range says which estimates the decoder learns to decode: small timesteps give nearly
    clean latents (the last steps of a long sampler); ``min_timestep=999, max_timestep=1000``
    gives exactly what a one-step sampler (T=1, trailing spacing) decodes.

    When UNet parameters are trainable too (its decoder side, or more with
    ``unfreeze_backbone``), the pixel loss reaches them through the estimate: UNet and VQ
    decoder then learn together what the sampler will decode."""
    with torch.no_grad():
        latents, condition = latent_target_and_condition(model, blurry, sharp, mode)
        noisy, noise, timesteps = _noisy(scheduler, latents, generator, max_timestep, min_timestep)
        blurry_latent = vq_latent(model, blurry, mode) if model.config.latent_target == "residual" else None
    unet_trains = torch.is_grad_enabled() and any(p.requires_grad for p in model.unet.parameters())
    with torch.set_grad_enabled(unet_trains):
        prediction = model.unet(torch.cat([noisy, condition], dim=1), timesteps).sample
        estimate = to_vq_latent(model, clean_latent_estimate(scheduler, noisy, prediction, timesteps), blurry_latent)
    if model.config.pixel_residual:
        return pixel_residual_image(model, blurry, decoded_image(model, estimate, mode), blurry_latent, mode)
    return decoded_image(model, estimate, mode)


def decoded_image(model: PriorModel, latents: torch.Tensor, mode: str) -> torch.Tensor:
    """The VQ decoding of ``latents`` (quantised) at the blurry image's size, in [-1, 1] give or
    take the decoder's overshoot: area-downsampled by the VQ factor in ``full`` mode.

    A prior is this image, or for a ``pixel_residual`` prior the blurry image plus this image
    minus the decoding of the blurry image's own latent."""
    return to_blurry_size(model, model.vqvae.decode(latents).sample, mode)


def pixel_residual_image(
    model: PriorModel, blurry: torch.Tensor, decoded: torch.Tensor, blurry_latent: torch.Tensor, mode: str
) -> torch.Tensor:
    """A ``pixel_residual`` prior's image in [-1, 1] (before clamping): the blurry image (in
    [0, 1]) plus ``decoded`` (a :func:`decoded_image`) minus the decoding of the blurry image's
    own latent, B + dec(z) − dec(z_B). The sampler computes the same per decoding tile."""
    return blurry * 2 - 1 + decoded - decoded_image(model, blurry_latent, mode)


def to_blurry_size(model: PriorModel, decoded: torch.Tensor, mode: str) -> torch.Tensor:
    """A VQ decoding brought to the blurry image's size: area-downsampled by the VQ factor in
    ``full`` mode (whose latent has the blurry image's size), unchanged in ``quarter`` mode."""
    return F.avg_pool2d(decoded, model.config.vq_factor) if mode == "full" else decoded


def vq_autoencoder_reconstruction(
    model: PriorModel, sharp: torch.Tensor, mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The VQGAN's reconstruction (in [-1, 1], the sharp image's size) of the sharp image and its
    codebook/commitment loss (which is what moves the codebook); gradients reach encoder,
    codebook and decoder.

    The autoencoder learns the images it will decode in ``mode``: in ``quarter`` mode the sharp
    image itself; in ``full`` mode its 4x upsampled copy, whose decoding is area-downsampled
    back exactly as a sampled prior is (:func:`vq_decoder_reconstruction`, the sampler)."""
    decoded = model.vqvae.decode(vq_latent(model, sharp, mode))
    return to_blurry_size(model, decoded.sample, mode), decoded.commit_loss


@torch.no_grad()
def estimate_latent_scale(model: PriorModel, batches: list[tuple[torch.Tensor, torch.Tensor]], mode: str) -> float:
    """LDM's ``scale_by_std``: 1 / standard deviation of the unscaled diffusion targets (the
    sharp latents, or their residuals over the blurry latents) of (blurry, sharp) batches."""
    unscaled = model.config.latent_scale
    latents = [latent_target_and_condition(model, blurry, sharp, mode)[0] / unscaled for blurry, sharp in batches]
    return float(1.0 / torch.cat([latent.flatten() for latent in latents]).std().clamp_min(1e-8))


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """taming-transformers' hinge loss for the discriminator."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def frozen_copy_logits(discriminator: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The discriminator's logits with its weights treated as constants, so the generator term
    (-logits) sends gradients to the generator only; one optimizer can then step both."""
    detached = {name: parameter.detach() for name, parameter in discriminator.named_parameters()}
    detached.update(dict(discriminator.named_buffers()))
    return torch.func.functional_call(discriminator, detached, (images,))
