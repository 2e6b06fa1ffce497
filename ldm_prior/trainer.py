"""Stage-one training: the step's loss by objective (:class:`PriorTrainer`), the validation that
scores the prior, and the :class:`~swintormer.core.training.TrainingTask` handed to the shared
engine (which does the loop, EMA, checkpoints, resume and distribution).

The objectives and what each trains are described in :mod:`ldm_prior.finetune`. The training
step logs the terms of its loss by what they measure: ``diffusion_loss`` (the MSE of the UNet's
noise or velocity prediction, ``noise``), ``decoder_l1`` (the L1 distance of the decoded one-step
estimate to the sharp image, ``vq_decoder``), ``reconstruction_l1`` and ``codebook_loss`` (the
autoencoder's, ``vq_autoencoder``), ``lpips``, ``gan_generator`` and ``gan_discriminator``.

Validation reports, on centre crops of the validation pairs, with fixed timesteps and noise so
that the numbers are comparable across steps and runs:

* the loss the objective trains: ``diffusion_loss`` (also for the other objectives while UNet
  parameters train), ``decoder_l1`` or ``reconstruction_l1``;
* ``vq_psnr``: the PSNR of the VQ autoencoder's reconstruction of the sharp crop through the
  mode's path; for a ``pixel_residual`` prior, of what a perfect residual gives,
  B + dec(z_S) − dec(z_B), since such a decoder learns to make a change, not an image;
* ``prior_psnr`` and ``input_psnr``: the PSNR of priors sampled with DDIM (Song et al., 2021;
  ``validation.prior_steps`` steps) and of the blurry inputs against the sharp crops;

and writes the first ``validation.images`` crops as images: blurry | sampled prior | sharp, the
prior's PSNR in the file name (:mod:`swintormer.core.validation_images`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from ldm_prior.codec import LatentCodec
from ldm_prior.finetune import (
    TrainableSelection,
    estimate_latent_scale,
    frozen_copy_logits,
    hinge_discriminator_loss,
    noise_prediction_loss,
    vq_decoder_reconstruction,
)
from ldm_prior.model import PriorModel
from swintormer.core.config import StrictModel
from swintormer.core.training import TrainingTask
from swintormer.core.validation_images import ValidationImage, ValidationReport


class PriorLossSettings(StrictModel):
    """Weights of the ``vq_decoder`` / ``vq_autoencoder`` objectives' terms (``noise`` is a plain
    MSE)."""

    l1: float = Field(1.0, ge=0)
    lpips: float = Field(0.0, ge=0)
    lpips_alexnet_weights: Path | None = None  # torchvision AlexNet file; None: the torch hub cache
    gan: float = Field(0.0, ge=0)  # PatchGAN hinge term (taming-transformers NLayerDiscriminator)
    discriminator_layers: int = Field(3, ge=1)
    # The UNet's one-step estimate is taken at a timestep in [min_timestep, max_timestep)
    # (ldm_prior.finetune.vq_decoder_reconstruction); 999..1000 matches a T=1 trailing sampler.
    max_timestep: int = Field(200, ge=1)
    min_timestep: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _timestep_range(self) -> "PriorLossSettings":
        if self.min_timestep >= self.max_timestep:
            raise ValueError(f"loss.min_timestep ({self.min_timestep}) must be below loss.max_timestep ({self.max_timestep})")
        return self


class PriorValidationSettings(StrictModel):
    """What validation scores and on how much.

    Every validation samples one prior per validation crop, with ``prior_steps`` DDIM steps and
    ``prior_timestep_spacing`` (:class:`ldm_prior.sampling.SamplingSettings`): set them to the
    settings the priors will be cached with to score those priors. The default, 10 steps with the
    authors' spacing, keeps validation cheap and shows the trend.
    """

    max_images: int | None = Field(None, gt=0)
    crop: int = Field(64, gt=0)  # centre crop of each validation image (a multiple of the UNet unit)
    noise_draws: int = Field(8, gt=0)  # fixed (timestep, noise) draws per image for the losses
    seed: int = 1234
    prior_steps: int = Field(10, gt=0)
    prior_timestep_spacing: Literal["leading", "trailing"] = "leading"
    images: int = Field(4, ge=0)  # the first crops written as blurry | prior | sharp images (0: none)


class PriorTrainer(nn.Module):
    """The prior (and, for the GAN term, a discriminator) behind one ``forward`` that returns the
    loss of an objective, so that accelerate's DDP wrapper sees every trainable parameter's use.

    Which of the prior's parameters train is set beforehand (:func:`ldm_prior.finetune.select_for_objective`);
    the discriminator, when there is one, trains whole. The LPIPS network (Zhang et al., 2018) of
    a positive ``loss.lpips`` weight is a fixed loss network: neither a submodule, nor trained,
    averaged or checkpointed.
    """

    def __init__(
        self, prior: PriorModel, objective: str = "noise", mode: str = "full", loss: PriorLossSettings | None = None
    ) -> None:
        super().__init__()
        loss = loss if loss is not None else PriorLossSettings()
        self.prior = prior
        self.objective = objective
        self.mode = mode
        self.loss_config = loss
        self.codec = LatentCodec.for_model(prior, mode)
        self.scheduler = prior.ddpm_scheduler()
        self.discriminator: nn.Module | None = None
        if objective != "noise" and loss.gan > 0:
            from taming.modules.discriminator.model import NLayerDiscriminator, weights_init

            self.discriminator = NLayerDiscriminator(input_nc=prior.config.image_channels, n_layers=loss.discriminator_layers)
            self.discriminator.apply(weights_init)
        lpips = None
        if objective != "noise" and loss.lpips > 0:
            from swintormer.core.metrics import LPIPSMetric

            lpips = LPIPSMetric(loss.lpips_alexnet_weights).model.requires_grad_(False)
        object.__setattr__(self, "lpips", lpips)

    def forward(self, blurry: torch.Tensor, sharp: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """The loss of one batch (N x 3 x H x W images in [0, 1]) and its terms to log."""
        unet = self.prior.unet
        if self.objective == "noise":
            loss = noise_prediction_loss(unet, self.codec, blurry, sharp, self.scheduler)
            return loss, {"diffusion_loss": loss.detach()}
        config = self.loss_config
        if self.objective == "vq_autoencoder":
            restored, codebook_loss = self.codec.reconstruct(sharp)
        else:
            restored = vq_decoder_reconstruction(unet, self.codec, blurry, sharp, self.scheduler, config.max_timestep,
                                                 min_timestep=config.min_timestep)
            codebook_loss = None
        target = sharp * 2 - 1
        logs: dict[str, Any] = {}
        l1 = F.l1_loss(restored, target)
        loss = config.l1 * l1
        logs[self.pixel_loss_name] = l1.detach()  # unweighted: the distance itself
        if codebook_loss is not None:
            loss = loss + codebook_loss.mean()
            logs["codebook_loss"] = codebook_loss.detach().mean()
        if config.lpips > 0 and self.lpips is not None:
            perceptual = self.lpips(restored, target).mean()
            loss = loss + config.lpips * perceptual
            logs["lpips"] = perceptual.detach()
        if self.discriminator is not None:
            generator_term = -frozen_copy_logits(self.discriminator, restored).mean()
            discriminator_term = hinge_discriminator_loss(self.discriminator(target), self.discriminator(restored.detach()))
            loss = loss + config.gan * generator_term + discriminator_term
            logs.update({"gan_generator": generator_term.detach(), "gan_discriminator": discriminator_term.detach()})
        return loss, logs

    @property
    def pixel_loss_name(self) -> str:
        """The name of the objective's L1 term: the decoded estimate's (``vq_decoder``) or the
        autoencoder's reconstruction's (``vq_autoencoder``) distance to the sharp image."""
        return "reconstruction_l1" if self.objective == "vq_autoencoder" else "decoder_l1"

    def describe(self, selection: TrainableSelection) -> str:
        """The prior's trainable/frozen counts and, when there is one, the discriminator's."""
        count = sum(p.numel() for p in self.discriminator.parameters()) if self.discriminator is not None else 0
        return selection.describe() + (f"; discriminator: {count:,}" if count else "")

    def training_task(
        self, train_dataset, validate: Callable[[nn.Module, int], ValidationReport] | None = None
    ) -> TrainingTask:
        """The engine's task: batches of ``{"input", "target"}`` (the first three input channels
        are the blurry image), the parameters that require grad, and the prior saved with
        ``PriorModel.save_pretrained`` at the end."""
        return TrainingTask(
            model=self, loss_step=_loss_step, train_dataset=train_dataset,
            parameters=[p for p in self.parameters() if p.requires_grad],
            aux_modules=[self.lpips] if self.lpips is not None else (),
            validate=validate, save_final=_save_prior,
        )


def _loss_step(net: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    return net(batch["input"][:, :3], batch["target"])


def _save_prior(net: nn.Module, folder: Path) -> None:
    net.prior.save_pretrained(folder)


def latent_scale_of_patches(codec: LatentCodec, dataset, max_patches: int = 64, batch_size: int = 8) -> tuple[float, int]:
    """:func:`ldm_prior.finetune.estimate_latent_scale` on the first ``max_patches`` training
    patches of ``dataset`` (items ``{"input", "target"}``), in batches; returns (scale, patches
    used)."""
    count = min(len(dataset), max_patches)
    samples = [dataset[index] for index in range(count)]
    batches = [(torch.stack([s["input"][:3] for s in samples[start : start + batch_size]]),
                torch.stack([s["target"] for s in samples[start : start + batch_size]]))
               for start in range(0, count, batch_size)]
    return estimate_latent_scale(codec, batches), count


def centre_crop_tensor(image: torch.Tensor, size: int, unit: int) -> torch.Tensor:
    """Centre crop of a C x H x W tensor to at most ``size``, both sides multiples of ``unit``."""
    height = min(size, image.shape[-2]) // unit * unit
    width = min(size, image.shape[-1]) // unit * unit
    if height == 0 or width == 0:
        raise ValueError(f"validation image of {image.shape[-2]}x{image.shape[-1]} is smaller than the unit {unit}")
    top, left = (image.shape[-2] - height) // 2, (image.shape[-1] - width) // 2
    return image[..., top : top + height, left : left + width]


def make_validation(
    dataset: Sequence[dict], mode: str, settings: PriorValidationSettings | None = None
) -> Callable[[nn.Module, int], ValidationReport]:
    """The engine's validation hook for a :class:`PriorTrainer`: the metrics and images of the
    module docstring on the first ``settings.max_images`` items ``{"input", "target", "name"}``
    of ``dataset``."""
    from ldm_prior.sampling import PriorSampler, SamplingSettings, image_seed
    from swintormer.core.metrics import psnr

    settings = settings if settings is not None else PriorValidationSettings()
    count = len(dataset) if settings.max_images is None else min(settings.max_images, len(dataset))

    def as_image(tensor: torch.Tensor) -> np.ndarray:  # 1 x 3 x H x W in [0, 1] -> H x W x 3
        return tensor[0].permute(1, 2, 0).cpu().numpy()

    def validate(trainer: nn.Module, step: int) -> ValidationReport:
        prior, objective, loss = trainer.prior, trainer.objective, trainer.loss_config
        codec = LatentCodec.for_model(prior, mode)
        device = next(prior.parameters()).device
        unit = prior.config.unet_multiple * (prior.config.vq_factor if mode == "quarter" else 1)
        scheduler = prior.ddpm_scheduler()
        sampler = PriorSampler(prior, SamplingSettings(steps=settings.prior_steps, mode=mode,
                                                       timestep_spacing=settings.prior_timestep_spacing))
        # The diffusion loss changes only while UNet parameters train (all of them are frozen
        # when the VQ decoder or the autoencoder trains alone).
        diffusion = objective == "noise" or any(p.requires_grad for p in prior.unet.parameters())
        scores: dict[str, list[float]] = {name: [] for name in ("diffusion_loss", "decoder_l1", "reconstruction_l1",
                                                                "vq_psnr", "prior_psnr", "input_psnr")}
        images = []
        for index in range(count):
            item = dataset[index]
            blurry = centre_crop_tensor(item["input"][:3], settings.crop, unit)[None].to(device)
            sharp = centre_crop_tensor(item["target"], settings.crop, unit)[None].to(device)
            generator = torch.Generator().manual_seed(settings.seed + index)
            for _ in range(settings.noise_draws):
                if diffusion:
                    scores["diffusion_loss"].append(float(noise_prediction_loss(prior.unet, codec, blurry, sharp, scheduler,
                                                                                generator=generator)))
                if objective == "vq_decoder":
                    decoded = vq_decoder_reconstruction(prior.unet, codec, blurry, sharp, scheduler, loss.max_timestep,
                                                        generator=generator, min_timestep=loss.min_timestep)
                    scores["decoder_l1"].append(float(F.l1_loss(decoded, sharp * 2 - 1)))
            reconstructed = codec.reconstruct(sharp)[0]
            if objective == "vq_autoencoder":
                scores["reconstruction_l1"].append(float(F.l1_loss(reconstructed, sharp * 2 - 1)))
            if codec.pixel_residual:  # what a perfect residual gives such a prior
                reconstructed = codec.pixel_residual_image(blurry, reconstructed, codec.encode(blurry))
            sharp_image, blurry_image = as_image(sharp), as_image(blurry)
            scores["vq_psnr"].append(psnr(as_image(((reconstructed + 1) / 2).clamp(0, 1)), sharp_image))
            sampled = sampler.sample(blurry_image, image_seed(settings.seed, item["name"]))
            scores["prior_psnr"].append(psnr(sampled, sharp_image))
            scores["input_psnr"].append(psnr(blurry_image, sharp_image))
            if index < settings.images:
                images.append(ValidationImage(f"{index:02d}_{Path(item['name']).stem}", [blurry_image, sampled, sharp_image],
                                              note=f"prior_{scores['prior_psnr'][-1]:.2f}dB"))
        metrics = {name: float(np.mean(values)) for name, values in scores.items() if values}
        return ValidationReport(metrics, images)

    return validate
