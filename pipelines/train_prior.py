"""Stage one: fine-tune the conditional latent-diffusion prior on blurry/sharp pairs.

    accelerate launch -m pipelines.train_prior --config configs/prior/cpu_small.yaml \\
        --data DATA_ROOT --output RUN_DIR [--max-steps N] [--resume auto|latest|PATH | --overwrite] \\
        [--stop-after-steps N] [--time-limit 3h50m] [key.sub=value ...]

The VQ encoder and the UNet backbone stay frozen; the parameters matching ``trainable``
(name patterns, default: the UNet decoder side for ``objective: noise``, the VQ decoder for
``objective: vq_decoder``) train. Their counts are printed at the start. This module reads the
config, builds the data and the model, and hands the task to the shared engine
``swintormer.core.training`` (EMA, atomic checkpoints, exact resume, progress bar, NaN guard,
accelerate, early stops on signals or ``--time-limit``, run-folder rules, exit codes); the step
and the validation are ``ldm_prior.trainer``, the maths ``ldm_prior.finetune``.

``--data`` is a dataset root in any layout ``swintormer.core.data.paired.discover_pairs`` knows; with
``train/`` and ``test/`` (or ``val/``) sub-folders those are the splits. Validation reports the
loss the objective trains on fixed timesteps and noise (comparable across steps and runs:
``diffusion_loss``, ``decoder_l1`` or ``reconstruction_l1``), the VQ reconstruction's PSNR, and
the PSNR of sampled priors (``validation.prior_steps`` DDIM steps) and of the blurry inputs
against the sharp crops (``ldm_prior.trainer``). The run folder receives ``config.yaml``,
``checkpoints/``, ``logs/``, ``validation/`` (blurry | prior | sharp images of the first
``validation.images`` crops at every validation) and ``model/`` (``PriorModel.save_pretrained``,
EMA weights).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, ValidationError

from ldm_prior.trainer import PriorLossSettings, PriorValidationSettings
from pipelines.training_setup import (discover_training_pairs, load_run_config, resolve_splits, run_with_stop_signals,
                                      start_training, training_parser)
from swintormer.core.config import ConfigError, StrictModel, TrainingConfig


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


class PriorDataSection(StrictModel):
    root: Path | None = None  # set by --data
    val_root: Path | None = None
    layout: Literal["auto", "dpdd", "gopro", "hide", "folder"] = "auto"
    patch_size: int = Field(64, gt=0)
    augment: bool = True
    repeat: int = Field(1, ge=1)
    cache_images: bool = False


class PriorTrainConfig(StrictModel):
    output_dir: Path | None = None  # set by --output
    model: PriorModelSection = Field(default_factory=PriorModelSection)
    # noise / vq_decoder: the authors' fine-tuning (ldm_prior.finetune). vq_autoencoder:
    # pre-trains a VQGAN from random weights (not the authors').
    objective: Literal["noise", "vq_decoder", "vq_autoencoder"] = "noise"
    mode: Literal["full", "quarter"] = "full"
    trainable: list[str] | None = None  # default by objective (ldm_prior.finetune.DEFAULT_TRAINABLE)
    # Allow patterns to reach the VQ encoder / UNet backbone: only for models built from random
    # weights (nothing pretrained to keep); the authors' fine-tuning keeps them frozen.
    unfreeze_backbone: bool = False
    loss: PriorLossSettings = Field(default_factory=PriorLossSettings)
    data: PriorDataSection = Field(default_factory=PriorDataSection)
    train: TrainingConfig = Field(default_factory=TrainingConfig)
    validation: PriorValidationSettings = Field(default_factory=PriorValidationSettings)


# --------------------------------------------------------------------------- building blocks


def load_model(config: PriorTrainConfig):
    """The prior ``model.source`` names, with the config's prediction type, latent target and
    pixel-residual setting applied."""
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


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    return training_parser(
        "train_prior",
        "Fine-tune the latent-diffusion prior (stage one) on blurry/sharp pairs: frozen VQ encoder "
        "and UNet backbone, trainable parameters chosen by name patterns (printed with their "
        "counts). Run under 'accelerate launch' for several processes or GPUs; the same command "
        "works on one CPU. Override any config value with key.sub=value (parsed as YAML), e.g. "
        "objective=vq_decoder mode=quarter train.batch_size=2.")


def main(argv: list[str] | None = None) -> int:
    return run_with_stop_signals(_main, argv)


def _main(argv: list[str] | None) -> int:
    from ldm_prior.codec import LatentCodec
    from ldm_prior.finetune import check_patch_size, select_for_objective
    from ldm_prior.trainer import PriorTrainer, latent_scale_of_patches, make_validation
    from swintormer.core.data.paired import PairedImageDataset, PairedPatchDataset
    from swintormer.core.training import make_accelerator

    try:
        config, flags = load_run_config(PriorTrainConfig, build_parser(), argv)
        accelerator = make_accelerator(config.train)
        train_split, val_split = resolve_splits(config.data.root, config.data.val_root)
        torch.manual_seed(config.train.seed)  # same discriminator initialisation on every process
        prior = load_model(config)
        check_patch_size(prior, config.data.patch_size, config.data.patch_size, config.mode)
        selection = select_for_objective(prior, config.objective, config.trainable, config.unfreeze_backbone)
        train_pairs = discover_training_pairs(train_split, config.data.layout, "training data")
        train_set = PairedPatchDataset(train_pairs, config.data.patch_size, augment=config.data.augment,
                                       seed=config.train.seed, repeat=config.data.repeat,
                                       cache_images=config.data.cache_images)
        if config.model.estimate_latent_scale:
            scale, count = latent_scale_of_patches(LatentCodec.for_model(prior, config.mode), train_set)
            prior.config = prior.config.model_copy(update={"latent_scale": scale})
            accelerator.print(f"latent scale set to {prior.config.latent_scale:.4f} (1/std of the diffusion targets "
                              f"of {count} training patches)")
        trainer = PriorTrainer(prior, config.objective, config.mode, config.loss)
        validate = None
        if val_split is not None:
            validation_pairs = discover_training_pairs(val_split, config.data.layout, "validation data")
            validate = make_validation(PairedImageDataset(validation_pairs, cache_images=True), config.mode, config.validation)
    except (ConfigError, FileNotFoundError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    accelerator.print(trainer.describe(selection))
    return start_training(trainer.training_task(train_set, validate), config, flags, accelerator, saved="prior")


if __name__ == "__main__":
    from swintormer.core.run_control import exit_code_of_finished_job

    sys.exit(exit_code_of_finished_job(main()))
