"""Stage-one fine-tuning maths: which parameters train (name patterns) and the loss of one step.

The authors fine-tune a pretrained latent-diffusion model (Rombach et al., 2022) with its VQ
encoder and UNet backbone (``conv_in``, time embedding, down blocks, mid block) frozen; the
decoder side trains. Two objectives:

* ``noise`` (default): the UNet decoder side learns the DDPM noise prediction (Ho et al., 2020),
  or the velocity v = sqrt(ᾱ)·ε − sqrt(1−ᾱ)·z₀ (Salimans & Ho, 2022, "Progressive distillation
  for fast sampling of diffusion models") for a schedule with ``prediction_type:
  v_prediction``. What is generated and what conditions it come from the
  :class:`~ldm_prior.codec.LatentCodec`.
* ``vq_decoder``: the VQ decoder learns to turn the UNet's one-step estimate of the clean
  latent into the sharp image: L1, plus LPIPS and the PatchGAN hinge term (taming-transformers'
  ``NLayerDiscriminator``, Esser et al., 2021) when their weights are positive. The UNet is
  frozen unless patterns select parts of it, which then learn from the same pixel loss.

A third objective, ``vq_autoencoder``, is not part of the authors' method: it trains a VQGAN
built from random weights (encoder included) as an autoencoder of sharp images
(:meth:`LatentCodec.reconstruct`), the step a from-scratch CPU model needs before any prior it
samples can resemble an image.

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

from ldm_prior.codec import LatentCodec
from ldm_prior.model import PriorModel

Objective = Literal["noise", "vq_decoder", "vq_autoencoder"]

#: The UNet's decoder side: what the authors fine-tune by default.
UNET_DECODER_PATTERNS: tuple[str, ...] = ("unet.up_blocks.*", "unet.conv_norm_out.*", "unet.conv_out.*")
#: The VQ decoder (after quantisation).
VQ_DECODER_PATTERNS: tuple[str, ...] = ("vqvae.post_quant_conv.*", "vqvae.decoder.*")
#: What each objective trains when no patterns are given.
DEFAULT_TRAINABLE: dict[str, tuple[str, ...]] = {
    "noise": UNET_DECODER_PATTERNS,
    "vq_decoder": VQ_DECODER_PATTERNS,
    "vq_autoencoder": ("vqvae.*",),
}
#: Never trained, whatever the patterns say: the frozen VQ encoder and UNet backbone of the
#: authors' fine-tuning.
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


def select_for_objective(
    model: PriorModel, objective: str, patterns: list[str] | tuple[str, ...] | None = None,
    unfreeze_backbone: bool = False,
) -> TrainableSelection:
    """:func:`select_trainable` with ``patterns`` or the objective's defaults
    (:data:`DEFAULT_TRAINABLE`). The frozen parts may train only for ``vq_autoencoder`` (a VQGAN
    from random weights) or with ``unfreeze_backbone`` (a UNet from random weights: nothing
    pretrained to keep)."""
    allow_frozen = objective == "vq_autoencoder" or unfreeze_backbone
    return select_trainable(model, patterns or list(DEFAULT_TRAINABLE[objective]), allow_frozen=allow_frozen)


def check_patch_size(model: PriorModel, height: int, width: int, mode: str) -> None:
    """Training patches must fit the UNet's down/up path without padding."""
    unit = model.config.unet_multiple * (model.config.vq_factor if mode == "quarter" else 1)
    if height % unit or width % unit:
        raise ValueError(f"training patches of {height}x{width} do not fit mode {mode!r}: both sides must be "
                         f"multiples of {unit}")


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
    """The one-step estimate of the clean latent from the UNet's prediction at ``timesteps``:
    (z_t − sqrt(1−ᾱ)·ε̂) / sqrt(ᾱ) for noise prediction, sqrt(ᾱ)·z_t − sqrt(1−ᾱ)·v̂ for velocity
    prediction (Salimans & Ho, 2022)."""
    alpha_bar = scheduler.alphas_cumprod.to(noisy.device)[timesteps].view(-1, 1, 1, 1)
    if scheduler.config.prediction_type == "v_prediction":
        return alpha_bar.sqrt() * noisy - (1 - alpha_bar).sqrt() * prediction
    return (noisy - (1 - alpha_bar).sqrt() * prediction) / alpha_bar.sqrt()


def noise_prediction_loss(
    unet: nn.Module, codec: LatentCodec, blurry: torch.Tensor, sharp: torch.Tensor, scheduler,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DDPM training: MSE between the UNet's prediction at a random timestep and its target (the
    noise, or the velocity for a ``v_prediction`` schedule), from N x 3 x H x W images in
    [0, 1]. ``generator`` (CPU) fixes timesteps and noise, for a deterministic validation loss."""
    latents, condition = codec.target_and_condition(blurry, sharp)
    noisy, noise, timesteps = _noisy(scheduler, latents, generator)
    prediction = unet(torch.cat([noisy, condition], dim=1), timesteps).sample
    return F.mse_loss(prediction.float(), prediction_target(scheduler, latents, noise, timesteps).float())


def vq_decoder_reconstruction(
    unet: nn.Module, codec: LatentCodec, blurry: torch.Tensor, sharp: torch.Tensor, scheduler,
    max_timestep: int = 200, generator: torch.Generator | None = None, min_timestep: int = 0,
) -> torch.Tensor:
    """The sharp-size image (in [-1, 1]) the VQ decoder makes from the UNet's one-step estimate
    of the clean latent at a random timestep in [``min_timestep``, ``max_timestep``): its
    decoding, or for a ``pixel_residual`` prior the blurry image plus the change the estimate
    makes to the decoding (:meth:`LatentCodec.prior_image`). Gradients reach the VQ decoder side.

    The range says which estimates the decoder learns to decode: small timesteps give nearly
    clean latents (the last steps of a long sampler); ``min_timestep=999, max_timestep=1000``
    gives exactly what a one-step sampler (T=1, trailing spacing) decodes.

    When UNet parameters are trainable too (its decoder side, or more with
    ``unfreeze_backbone``), the pixel loss reaches them through the estimate: UNet and VQ
    decoder then learn together what the sampler will decode."""
    with torch.no_grad():
        latents, condition = codec.target_and_condition(blurry, sharp)
        noisy, noise, timesteps = _noisy(scheduler, latents, generator, max_timestep, min_timestep)
        blurry_latent = codec.blurry_latent(blurry)
    unet_trains = torch.is_grad_enabled() and any(p.requires_grad for p in unet.parameters())
    with torch.set_grad_enabled(unet_trains):
        prediction = unet(torch.cat([noisy, condition], dim=1), timesteps).sample
        estimate = codec.to_vq_latent(clean_latent_estimate(scheduler, noisy, prediction, timesteps), blurry_latent)
    return codec.prior_image(estimate, blurry, blurry_latent)


@torch.no_grad()
def estimate_latent_scale(codec: LatentCodec, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """LDM's ``scale_by_std`` (Rombach et al., 2022): 1 / standard deviation of the unscaled
    diffusion targets (the sharp latents, or their residuals over the blurry latents) of
    (blurry, sharp) batches."""
    latents = [codec.target_and_condition(blurry, sharp)[0] / codec.latent_scale for blurry, sharp in batches]
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
