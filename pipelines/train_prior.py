"""Stage one: fine-tune the conditional latent-diffusion prior on blurry/sharp pairs.

    accelerate launch -m pipelines.train_prior --config configs/prior/cpu_small.yaml \\
        --data DATA_ROOT --output RUN_DIR [--max-steps N] [--resume latest|PATH] [key.sub=value ...]

The VQ encoder and the UNet backbone stay frozen; the parameters matching ``trainable``
(name patterns, default: the UNet decoder side for ``objective: noise``, the VQ decoder for
``objective: vq_decoder``) train. Their counts are printed at the start. The loop (EMA,
atomic checkpoints, exact resume, progress bar, NaN guard, accelerate) is the shared engine
``swintormer.core.training``; the maths is ``ldm_prior.finetune``.

``--data`` is a dataset root in any layout ``swintormer.core.data.paired.discover_pairs`` knows; with
``train/`` and ``test/`` (or ``val/``) sub-folders those are the splits. Validation reports the
noise-prediction loss on fixed timesteps and noise (comparable across steps and runs) and, with
``validation.prior_psnr``, the PSNR of sampled priors and of the blurry inputs against the sharp
images. The run folder receives ``config.yaml``, ``checkpoints/``, ``logs/`` and ``model/``
(``PriorModel.save_pretrained``, EMA weights).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError, model_validator
from torch import nn

from pipelines.training_setup import discover_training_pairs, load_run_config, resolve_splits
from swintormer.core.config import ConfigError, StrictModel, TrainingConfig, add_run_arguments, save_config



# --------------------------------------------------------------------------- schema


class PriorModelSection(StrictModel):
    # A named configuration (random weights), a diffusers-layout folder or a CompVis model.ckpt.
    source: str = "small"
    compvis_architecture: str = "ldm-sr4x"  # architecture of a CompVis checkpoint
    init_seed: int = 0  # weights of a named configuration
    # Set the latent scale (LDM's scale_factor) to 1/std of the training latents before training
    # (for a VQGAN trained here; the public model's 1.0 is right for it).
    estimate_latent_scale: bool = False
    # Set what the UNet predicts (ldm_prior.model.SchedulerSpec): "v_prediction" for a UNet that
    # starts from random weights; None keeps the model's own (the public model's: "epsilon").
    # Changing it on a trained UNet throws away what it learned.
    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    # Set what the diffusion generates (ldm_prior.model.PriorConfig.latent_target): "residual"
    # (sharp latent minus blurry latent) for a UNet that starts from random weights; None keeps
    # the model's own (the public model's: "sharp"). Like prediction_type, only for a new UNet.
    latent_target: Literal["sharp", "residual"] | None = None
    # Set how a residual prior becomes an image (PriorConfig.pixel_residual); unlike the two
    # above it can be switched on a trained model, whose VQ decoder then learns it (vq_decoder).
    pixel_residual: bool | None = None


class PriorLossSection(StrictModel):
    """Weights of the ``vq_decoder`` objective's terms (``noise`` is a plain MSE)."""

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
    def _timestep_range(self) -> "PriorLossSection":
        if self.min_timestep >= self.max_timestep:
            raise ValueError(f"loss.min_timestep ({self.min_timestep}) must be below loss.max_timestep ({self.max_timestep})")
        return self


class PriorDataSection(StrictModel):
    root: Path | None = None  # set by --data
    val_root: Path | None = None
    layout: Literal["auto", "dpdd", "gopro", "hide", "folder"] = "auto"
    patch_size: int = Field(64, gt=0)
    augment: bool = True
    repeat: int = Field(1, ge=1)
    cache_images: bool = False


class PriorValidationSection(StrictModel):
    max_images: int | None = Field(None, gt=0)
    crop: int = Field(64, gt=0)  # centre crop of each validation image (a multiple of the UNet unit)
    noise_draws: int = Field(8, gt=0)  # fixed (timestep, noise) draws per image for the loss
    seed: int = 1234
    prior_psnr: bool = False  # also sample priors (slow) and score them against the sharp images
    prior_steps: int = Field(20, gt=0)


class PriorTrainConfig(StrictModel):
    output_dir: Path | None = None  # set by --output
    model: PriorModelSection = Field(default_factory=PriorModelSection)
    # noise / vq_decoder: SPEC 4. vq_autoencoder: pre-trains a from-scratch VQGAN (not the authors').
    objective: Literal["noise", "vq_decoder", "vq_autoencoder"] = "noise"
    mode: Literal["full", "quarter"] = "full"
    trainable: list[str] | None = None  # default by objective (ldm_prior.finetune)
    # Allow patterns to reach the VQ encoder / UNet backbone: only for models built from random
    # weights (nothing pretrained to keep); the authors' fine-tuning keeps them frozen.
    unfreeze_backbone: bool = False
    loss: PriorLossSection = Field(default_factory=PriorLossSection)
    data: PriorDataSection = Field(default_factory=PriorDataSection)
    train: TrainingConfig = Field(default_factory=TrainingConfig)
    validation: PriorValidationSection = Field(default_factory=PriorValidationSection)


# --------------------------------------------------------------------------- the trained module


class PriorTrainer(nn.Module):
    """The prior (and, for the GAN term, a discriminator) behind one ``forward`` that returns the
    loss, so that accelerate's DDP wrapper sees every trainable parameter's use."""

    def __init__(self, prior, config: PriorTrainConfig) -> None:
        super().__init__()
        self.prior = prior
        self.objective = config.objective
        self.mode = config.mode
        self.loss_config = config.loss
        self.scheduler = prior.ddpm_scheduler()
        object.__setattr__(self, "lpips", None)  # set by main() when the LPIPS term is on
        self.discriminator: nn.Module | None = None
        if self.objective != "noise" and config.loss.gan > 0:
            from taming.modules.discriminator.model import NLayerDiscriminator, weights_init

            self.discriminator = NLayerDiscriminator(input_nc=prior.config.image_channels, n_layers=config.loss.discriminator_layers)
            self.discriminator.apply(weights_init)

    def forward(self, blurry: torch.Tensor, sharp: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        from ldm_prior.finetune import (
            frozen_copy_logits,
            hinge_discriminator_loss,
            noise_prediction_loss,
            vq_decoder_reconstruction,
        )

        if self.objective == "noise":
            loss = noise_prediction_loss(self.prior, blurry, sharp, self.mode, self.scheduler)
            return loss, {}
        config = self.loss_config
        if self.objective == "vq_autoencoder":
            from ldm_prior.finetune import vq_autoencoder_reconstruction

            restored, codebook_loss = vq_autoencoder_reconstruction(self.prior, sharp, self.mode)
        else:
            restored = vq_decoder_reconstruction(
                self.prior, blurry, sharp, self.mode, self.scheduler, config.max_timestep, min_timestep=config.min_timestep
            )
            codebook_loss = None
        target = sharp * 2 - 1
        logs: dict[str, Any] = {}
        loss = config.l1 * F.l1_loss(restored, target)
        logs["l1"] = loss.detach()
        if codebook_loss is not None:
            loss = loss + codebook_loss.mean()
            logs["codebook"] = codebook_loss.detach().mean()
        if config.lpips > 0 and self.lpips is not None:
            perceptual = self.lpips(restored, target).mean()
            loss = loss + config.lpips * perceptual
            logs["lpips"] = perceptual.detach()
        if self.discriminator is not None:
            generator_term = -frozen_copy_logits(self.discriminator, restored).mean()
            discriminator_term = hinge_discriminator_loss(self.discriminator(target), self.discriminator(restored.detach()))
            loss = loss + config.gan * generator_term + discriminator_term
            logs.update({"gan_g": generator_term.detach(), "gan_d": discriminator_term.detach()})
        return loss, logs


# --------------------------------------------------------------------------- building blocks


def load_model(config: PriorTrainConfig):
    from ldm_prior.compvis import load_compvis_checkpoint
    from ldm_prior.model import NAMED_CONFIGS, PriorConfig, PriorModel

    source = config.model.source
    path = Path(source)
    if source in NAMED_CONFIGS:
        prior = PriorModel.from_config(source, seed=config.model.init_seed)
    elif path.is_file():
        prior = load_compvis_checkpoint(path, config.model.compvis_architecture)
    elif path.is_dir():
        prior = PriorModel.from_pretrained(path)
    else:
        raise ConfigError(f"model.source {source!r}: neither a named configuration {sorted(NAMED_CONFIGS)} nor a "
                          "model folder or checkpoint file")
    overrides = {"latent_target": config.model.latent_target, "pixel_residual": config.model.pixel_residual}
    overrides = {key: value for key, value in overrides.items() if value is not None}
    if config.model.prediction_type is not None:
        overrides["scheduler"] = {**prior.config.scheduler.model_dump(), "prediction_type": config.model.prediction_type}
    if overrides:
        try:
            prior.config = PriorConfig.model_validate({**prior.config.model_dump(), **overrides})
        except ValidationError as error:
            raise ConfigError(f"model: {error.errors()[0]['msg']}") from None
    return prior


def centre_crop_tensor(image: torch.Tensor, size: int, unit: int) -> torch.Tensor:
    """Centre crop of a C x H x W tensor to at most ``size``, both sides multiples of ``unit``."""
    height = min(size, image.shape[-2]) // unit * unit
    width = min(size, image.shape[-1]) // unit * unit
    if height == 0 or width == 0:
        raise ValueError(f"validation image of {image.shape[-2]}x{image.shape[-1]} is smaller than the unit {unit}")
    top, left = (image.shape[-2] - height) // 2, (image.shape[-1] - width) // 2
    return image[..., top : top + height, left : left + width]


def make_validation(config: PriorTrainConfig, dataset):
    """Validation hook: noise-prediction loss on fixed draws, PSNR of the VQ autoencoder's
    reconstruction of the sharp crop (through the mode's path: 4x up and back in ``full``; for a
    ``pixel_residual`` prior, the blurry crop plus the change that the sharp latent makes to the
    decoding), and optionally the PSNR of sampled priors and of the inputs."""
    from ldm_prior.finetune import noise_prediction_loss, pixel_residual_image, vq_autoencoder_reconstruction, vq_latent
    from ldm_prior.sampling import PriorSampler, SamplingSettings, image_seed
    from swintormer.core.metrics import psnr

    settings = config.validation
    count = len(dataset) if settings.max_images is None else min(settings.max_images, len(dataset))

    def validate(trainer: nn.Module, step: int) -> dict[str, float]:
        prior = trainer.prior
        device = next(prior.parameters()).device
        unit = prior.config.unet_multiple * (prior.config.vq_factor if config.mode == "quarter" else 1)
        scheduler = prior.ddpm_scheduler()
        losses, prior_scores, input_scores, vq_scores = [], [], [], []
        for index in range(count):
            item = dataset[index]
            blurry = centre_crop_tensor(item["input"][:3], settings.crop, unit)[None].to(device)
            sharp = centre_crop_tensor(item["target"], settings.crop, unit)[None].to(device)
            generator = torch.Generator().manual_seed(settings.seed + index)
            for _ in range(settings.noise_draws):
                losses.append(float(noise_prediction_loss(prior, blurry, sharp, config.mode, scheduler, generator=generator)))
            reconstructed = vq_autoencoder_reconstruction(prior, sharp, config.mode)[0]
            if prior.config.pixel_residual:  # what a perfect residual gives such a prior
                reconstructed = pixel_residual_image(prior, blurry, reconstructed, vq_latent(prior, blurry, config.mode),
                                                     config.mode)
            reconstructed = ((reconstructed[0] + 1) / 2).clamp(0, 1).permute(1, 2, 0).cpu().numpy()
            vq_scores.append(psnr(reconstructed, sharp[0].permute(1, 2, 0).cpu().numpy()))
            if settings.prior_psnr:
                sampler = PriorSampler(prior, SamplingSettings(steps=settings.prior_steps, mode=config.mode))
                blurry_image = blurry[0].permute(1, 2, 0).cpu().numpy()
                sharp_image = sharp[0].permute(1, 2, 0).cpu().numpy()
                sampled = sampler.sample(blurry_image, image_seed(settings.seed, item["name"]))
                prior_scores.append(psnr(sampled, sharp_image))
                input_scores.append(psnr(blurry_image, sharp_image))
        metrics = {"noise_loss": float(np.mean(losses)), "vq_psnr": float(np.mean(vq_scores))}
        if prior_scores:
            metrics.update({"prior_psnr": float(np.mean(prior_scores)), "input_psnr": float(np.mean(input_scores))})
        return metrics

    return validate


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_prior",
        description="Fine-tune the latent-diffusion prior (stage one) on blurry/sharp pairs: frozen VQ encoder "
                    "and UNet backbone, trainable parameters chosen by name patterns (printed with their "
                    "counts). Run under 'accelerate launch' for several processes or GPUs; the same command "
                    "works on one CPU. Override any config value with key.sub=value (parsed as YAML), e.g. "
                    "objective=vq_decoder mode=quarter train.batch_size=2.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_run_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ldm_prior.finetune import UNET_DECODER_PATTERNS, VQ_DECODER_PATTERNS, check_patch_size, select_trainable
    from swintormer.core.data.paired import PairedImageDataset, PairedPatchDataset
    from swintormer.core.training import TrainingTask, make_accelerator, train_and_report

    try:
        config, flags = load_run_config(PriorTrainConfig, build_parser(), argv)
        accelerator = make_accelerator(config.train)
        train_split, val_split = resolve_splits(config.data.root, config.data.val_root)
        torch.manual_seed(config.train.seed)  # same discriminator initialisation on every process
        prior = load_model(config)
        check_patch_size(prior, config.data.patch_size, config.data.patch_size, config.mode)
        defaults = {"noise": UNET_DECODER_PATTERNS, "vq_decoder": VQ_DECODER_PATTERNS, "vq_autoencoder": ("vqvae.*",)}
        patterns = config.trainable or list(defaults[config.objective])
        selection = select_trainable(prior, patterns, allow_frozen=config.objective == "vq_autoencoder" or config.unfreeze_backbone)
        train_set = PairedPatchDataset(discover_training_pairs(train_split, config.data.layout, "training data"), config.data.patch_size,
                                       augment=config.data.augment, seed=config.train.seed, repeat=config.data.repeat,
                                       cache_images=config.data.cache_images)
        if config.model.estimate_latent_scale:
            from ldm_prior.finetune import estimate_latent_scale

            count = min(len(train_set), 64)
            samples = [train_set[index] for index in range(count)]
            batches = [(torch.stack([s["input"][:3] for s in samples[start : start + 8]]),
                        torch.stack([s["target"] for s in samples[start : start + 8]])) for start in range(0, count, 8)]
            prior.config = prior.config.model_copy(update={"latent_scale": estimate_latent_scale(prior, batches, config.mode)})
            accelerator.print(f"latent scale set to {prior.config.latent_scale:.4f} (1/std of the diffusion targets of {count} training patches)")
        trainer = PriorTrainer(prior, config)
        if config.objective != "noise" and config.loss.lpips > 0:
            from swintormer.core.metrics import LPIPSMetric

            perceptual = LPIPSMetric(config.loss.lpips_alexnet_weights).model.requires_grad_(False)
            # Not a submodule: a fixed loss network is neither trained, averaged nor checkpointed.
            object.__setattr__(trainer, "lpips", perceptual)
        validate = None
        if val_split is not None:
            validate = make_validation(config, PairedImageDataset(discover_training_pairs(val_split, config.data.layout, "validation data"),
                                                                  cache_images=True))
    except (ConfigError, FileNotFoundError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    parameters = [p for p in trainer.parameters() if p.requires_grad]
    discriminator_count = sum(p.numel() for p in trainer.discriminator.parameters()) if trainer.discriminator else 0
    accelerator.print(f"{selection.describe()}" + (f"; discriminator: {discriminator_count:,}" if discriminator_count else ""))
    output_dir = Path(config.output_dir)
    if accelerator.is_main_process:
        save_config(config, output_dir / "config.yaml")

    def loss_step(net: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        return net(batch["input"][:, :3], batch["target"])

    def save_final(net: nn.Module, folder: Path) -> None:
        net.prior.save_pretrained(folder)

    task = TrainingTask(model=trainer, loss_step=loss_step, train_dataset=train_set, parameters=parameters,
                        aux_modules=[trainer.lpips] if trainer.lpips is not None else (),
                        validate=validate, save_final=save_final)
    return train_and_report(task, config.train, output_dir, accelerator=accelerator, resume=flags.resume, saved="prior")


if __name__ == "__main__":
    sys.exit(main())
