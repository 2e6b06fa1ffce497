"""Stage two: train the Swintormer deblurring network.

    accelerate launch -m pipelines.train_swintormer --config configs/swintormer/cpu_small.yaml \\
        --data DATA_ROOT --output RUN_DIR [--max-steps N] [--resume auto|latest|PATH | --overwrite] \\
        [--stop-after-steps N] [--time-limit 3h50m] [key.sub=value ...]

The same command runs on one CPU, one or many GPUs and many machines (accelerate decides the
device and the process count). Orchestration only: the network is ``swintormer.models``, the
losses ``swintormer.losses``, the loop ``swintormer.core.training``, the data ``swintormer.core.data.paired``.

``--data`` is a dataset root in any layout ``swintormer.core.data.paired.discover_pairs`` knows. When
it holds ``train/`` and ``test/`` (or ``val/``) sub-folders (the synthetic generator's output,
DPDD), those are the training and validation splits; otherwise the root is the training split
and ``data.val_root`` names the validation split. With a prior source (``data.prior``) the
network sees ``blurry ⊕ prior`` (6 channels); ``model.in_channels=3`` trains the no-prior
ablation from the same config (the prior is then not read).

The run folder receives ``config.yaml`` (the resolved configuration), ``checkpoints/``,
``logs/`` (``metrics.jsonl`` and TensorBoard), ``validation/`` (blurry | prior | output | sharp
crops of the first ``validation.images`` validation images at every validation) and, at the
end, ``model/`` written with
``save_pretrained`` (EMA weights by default). Stopping early (signals, ``--time-limit``,
``--stop-after-steps``), the run-folder rules and the exit codes are the shared engine's
(``swintormer.core.training``, ``swintormer.core.run_control``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from pipelines.training_setup import (discover_training_pairs, load_run_config, resolve_splits, run_with_stop_signals,
                                      start_training, training_parser)
from swintormer.core.config import ConfigError, StrictModel, TrainingConfig
from swintormer.core.data.degradations import DegradationConfig
from swintormer.core.priors import PriorContract, PriorExpectation
from swintormer.losses import LossConfig, MissingWeightsError, build_loss



# --------------------------------------------------------------------------- schema


class ModelSection(StrictModel):
    """The network: a preset with field overrides, and optionally the weights to start from.

    ``init_from`` names a model folder written by ``save_pretrained`` (another run's ``model/``,
    the shipped default) whose weights a new run starts from, to fine-tune or to train a model
    further under a new schedule (one cosine after another is the warm-restart schedule of
    Loshchilov & Hutter, SGDR, 2017). Its architecture must be the one this section builds.
    A resumed run takes its weights from the checkpoint instead.
    """

    preset: str = "paper"
    in_channels: Literal[3, 6] = 6  # 6 = blurry ⊕ prior, 3 = the no-prior ablation
    overrides: dict[str, Any] = Field(default_factory=dict)  # any SwintormerConfig field
    init_from: Path | None = None


class PriorSection(StrictModel):
    """Where priors come from; read only when ``model.in_channels`` is 6.

    ``source: cache`` reads a prior cache made by ``pipelines.cache_priors`` from the same
    ``--data`` root (one cache holds every split); ``source: folder`` reads prior files that
    mirror the dataset root (priors made by another tool). ``expected`` holds cache settings the
    run insists on (``data.prior.expected.steps=5``); the run fills the unset ones from the
    cache's manifest, records them in ``config.yaml``, checks every entry against them before
    the first step, and the saved model records them as its prior contract
    (``model/pipeline.json``).
    """

    source: Literal["none", "folder", "cache"] = "none"
    path: Path | None = None  # prior folder (mirrors the dataset root) or prior cache folder
    data_root: Path | None = None  # cache: the dataset root it was made from, when moved
    expected: PriorExpectation = Field(default_factory=PriorExpectation)


class DataSection(StrictModel):
    root: Path | None = None  # set by --data
    val_root: Path | None = None
    layout: Literal["auto", "dpdd", "gopro", "hide", "folder"] = "auto"
    patch_size: int = Field(256, gt=0)
    augment: bool = True
    repeat: int = Field(1, ge=1)  # visits of each pair per epoch (small datasets)
    cache_images: bool = False
    prior: PriorSection = Field(default_factory=PriorSection)
    # Set: the splits hold sharp photos, degraded on the fly (swintormer.core.data.degradations); the
    # validation split becomes a fixed set of degraded centre crops of this side.
    degradation: DegradationConfig | None = None
    validation_crop: int = Field(256, gt=0)
    # Draws the validation crops' degradations: kept apart from train.seed, so that runs trained
    # with other seeds (a second run from init_from, say) are scored on the same images.
    validation_seed: int = 0


class ValidationSection(StrictModel):
    mode: Literal["whole", "sliding"] = "whole"  # whole images padded by the model, or sliding windows
    tile: int = Field(256, gt=0)
    stride: int | None = Field(None, gt=0)
    batch_size: int = Field(4, gt=0)
    max_images: int | None = Field(None, gt=0)
    ssim: bool = True
    # The first `images` validation images are written at every validation as one PNG each
    # (RUN_DIR/validation/step_XXXXXXXX/): their centre image_crop crops, panels blurry | prior
    # (6-channel models) | output | sharp; 0 writes none.
    images: int = Field(4, ge=0)
    image_crop: int = Field(256, gt=0)


class DebugSection(StrictModel):
    log_sample_names: bool = False  # each process appends the names it trained on to debug/


class SwintormerTrainConfig(StrictModel):
    output_dir: Path | None = None  # set by --output
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainingConfig = Field(default_factory=TrainingConfig)
    validation: ValidationSection = Field(default_factory=ValidationSection)
    debug: DebugSection = Field(default_factory=DebugSection)


# --------------------------------------------------------------------------- building blocks


def prior_source(config: SwintormerTrainConfig):
    """The one place stage two turns ``data.prior`` into a ``swintormer.core.priors.PriorSource``.

    For a cache, the settings ``data.prior.expected`` leaves unset are filled from the cache's
    manifest (in ``config``, so that ``config.yaml`` records them)."""
    if config.model.in_channels == 3:
        return None
    prior = config.data.prior
    if prior.source == "none":
        raise ConfigError("model.in_channels is 6 (blurry ⊕ prior) but data.prior.source is 'none'; "
                          "set data.prior.source=cache data.prior.path=CACHE (a cache made by cache_priors "
                          "with the same --data), or model.in_channels=3 for the no-prior variant")
    if prior.path is None:
        raise ConfigError(f"data.prior.source is {prior.source!r} but data.prior.path is not set")
    if prior.source == "folder":
        from swintormer.core.priors import PriorFolder

        return PriorFolder(prior.path, dataset_root=config.data.root)
    from ldm_prior.cache import PriorCache, PriorCacheError

    try:
        cache = PriorCache(prior.path, data_root=prior.data_root, expected=prior.expected)
    except PriorCacheError as exc:
        raise ConfigError(f"data.prior.path: {exc}") from None
    prior.expected = PriorExpectation.model_validate(cache.contract().model_dump())
    return cache


def check_priors(source, pairs: list, what: str) -> None:
    """Stop before training, naming the first image of ``pairs`` whose prior is missing, stale or
    made with other settings (a cache is checked from its entries' metadata; prior files by
    their existence)."""
    from ldm_prior.cache import PriorCache
    from swintormer.core.priors import PriorFolder

    for index, pair in enumerate(pairs):
        if isinstance(source, PriorCache):
            problem = source.entry_problem(pair.blurry)
        elif isinstance(source, PriorFolder):
            found = any(path.is_file() for path in source.candidates(pair.blurry))
            problem = None if found else f"{pair.blurry}: no prior file in {source.folder}"
        else:
            problem = None
        if problem:
            raise ConfigError(f"{what}: {problem} (image {index + 1} of {len(pairs)}; build the cache with "
                              "cache_priors --data on the dataset root that --data names)")


def prior_contract(config: SwintormerTrainConfig) -> PriorContract | None:
    """What the model's priors were made with, recorded beside the saved model (a cache only:
    prior files carry no settings)."""
    prior = config.data.prior
    if config.model.in_channels == 3 or prior.source != "cache":
        return None
    return PriorContract.model_validate(prior.expected.model_dump())


def build_datasets(config: SwintormerTrainConfig, train_split: Path, val_split: Path | None, source):
    """Training patches and validation images: fixed pairs, or sharp photos degraded on the fly."""
    data = config.data
    if data.degradation is not None:
        if source is not None:
            raise ConfigError("data.degradation makes its blurry inputs on the fly, which no prior cache or "
                              "folder can hold; use model.in_channels=3 with it")
        from swintormer.core.data.degraded import DegradedImageDataset, DegradedPatchDataset, discover_photos

        train_set = DegradedPatchDataset(discover_photos(train_split), data.patch_size, data.degradation,
                                         augment=data.augment, seed=config.train.seed, repeat=data.repeat,
                                         cache_images=data.cache_images)
        val_set = None
        if val_split is not None:
            val_set = DegradedImageDataset(discover_photos(val_split), data.validation_crop, data.degradation,
                                           seed=data.validation_seed)
        return train_set, val_set
    from swintormer.core.data.paired import PairedImageDataset, PairedPatchDataset

    train_pairs = discover_training_pairs(train_split, data.layout, "training data")
    val_pairs = discover_training_pairs(val_split, data.layout, "validation data") if val_split is not None else None
    check_priors(source, train_pairs, "training data")
    if val_pairs is not None:
        check_priors(source, val_pairs, "validation data")
    train_set = PairedPatchDataset(train_pairs, data.patch_size, augment=data.augment, prior_source=source,
                                   seed=config.train.seed, repeat=data.repeat, cache_images=data.cache_images)
    val_set = None
    if val_pairs is not None:
        val_set = PairedImageDataset(val_pairs, prior_source=source, cache_images=True)
    return train_set, val_set


def build_model(config: SwintormerTrainConfig):
    from swintormer.models import Swintormer, SwintormerConfig

    try:
        overrides = {**config.model.overrides, "in_channels": config.model.in_channels}
        net_config = SwintormerConfig.preset(config.model.preset, **overrides)
    except (KeyError, ValueError, TypeError) as exc:
        raise ConfigError(f"model: {exc}".replace("\n", " ")) from None
    if config.model.init_from is None:
        return Swintormer(net_config)
    source = Path(config.model.init_from)
    try:
        start = Swintormer.from_pretrained(source)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"model.init_from: {exc}") from None
    built, saved = net_config.to_dict(), start.config.to_dict()
    differing = [f"{key} {built.get(key)!r} here, {saved.get(key)!r} there"
                 for key in sorted(set(built) | set(saved)) if built.get(key) != saved.get(key)]
    if differing:
        raise ConfigError(f"model.init_from: {source} holds a different network than model.preset/overrides "
                          f"build: {'; '.join(differing)}")
    return start.train()


def inference_settings(config: SwintormerTrainConfig):
    """How validation runs the network, as the deblur pipeline does."""
    from swintormer.pipeline import InferenceSettings

    settings = config.validation
    return InferenceSettings(tile=settings.tile, stride=settings.stride, batch_size=settings.batch_size,
                             whole=settings.mode == "whole")


def make_validation(config: SwintormerTrainConfig, dataset):
    """Validation hook: mean PSNR/SSIM of the images restored by the deblur pipeline and the
    PSNR of the blurry inputs, and the first ``validation.images`` of them as images (centre
    crops of the restorations already made for the scores: no extra inference)."""
    from swintormer.core.metrics import psnr, ssim
    from swintormer.core.validation_images import ValidationImage, ValidationReport, centre_crop
    from swintormer.pipeline import DeblurPipeline

    settings = config.validation
    inference = inference_settings(config)
    count = len(dataset) if settings.max_images is None else min(settings.max_images, len(dataset))
    input_scores: dict[int, float] = {}

    def validate(model: torch.nn.Module, step: int) -> ValidationReport:
        pipe = DeblurPipeline(model, settings=inference)
        scores = {"psnr": [], "ssim": [], "input_psnr": []}
        images = []
        for index in range(count):
            item = dataset[index]
            image = item["input"].permute(1, 2, 0).numpy()
            # The channels after the first three are the prior (or a dual-pixel pair's right view).
            extra = image[..., 3:] if image.shape[2] > 3 else None
            result = np.clip(pipe(image[..., :3], prior=extra), 0.0, 1.0)
            target = item["target"].permute(1, 2, 0).numpy()
            scores["psnr"].append(psnr(result, target))
            if settings.ssim:
                scores["ssim"].append(ssim(result, target))
            if index not in input_scores:  # the blurry input's score never changes
                input_scores[index] = psnr(np.clip(image[..., :3], 0.0, 1.0), target)
            scores["input_psnr"].append(input_scores[index])
            if index < settings.images:
                panels = [image[..., :3], result, target]
                if extra is not None and model.config.in_channels == 6:  # the prior the network saw
                    panels.insert(1, extra[..., :3])
                images.append(ValidationImage(f"{index:02d}_{Path(item['name']).stem}",
                                              [centre_crop(np.clip(panel, 0.0, 1.0), settings.image_crop) for panel in panels],
                                              note=f"output_{scores['psnr'][-1]:.2f}dB"))
        metrics = {name: float(np.mean(values)) for name, values in scores.items() if values}
        return ValidationReport(metrics, images)

    return validate


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    return training_parser(
        "train_swintormer",
        "Train the Swintormer deblurring network (stage two) on blurry/sharp pairs, with "
        "or without a diffusion prior. Run it under 'accelerate launch' for several "
        "processes or GPUs; the same command works on one CPU. Any config value can be "
        "overridden with key.sub=value (value parsed as YAML), e.g. train.batch_size=4 "
        "model.in_channels=3 loss.vgg.weights_path=/weights/vgg19-dcbbe01f.pth.")


def main(argv: list[str] | None = None) -> int:
    return run_with_stop_signals(_main, argv)


def _main(argv: list[str] | None) -> int:
    from swintormer.core.training import TrainingTask, make_accelerator

    try:
        config, flags = load_run_config(SwintormerTrainConfig, build_parser(), argv)
        accelerator = make_accelerator(config.train)
        train_split, val_split = resolve_splits(config.data.root, config.data.val_root)
        source = prior_source(config)
        loss = build_loss(config.loss)  # missing backbone files stop the run here, before training
        train_set, val_set = build_datasets(config, train_split, val_split, source)
        validate = make_validation(config, val_set) if val_set is not None else None
        torch.manual_seed(config.train.seed)  # same initial weights on every process
        model = build_model(config)
    except (ConfigError, MissingWeightsError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    output_dir = Path(config.output_dir)
    names_log = None
    if config.debug.log_sample_names:
        names_log = output_dir / "debug" / f"samples_rank{accelerator.process_index}.txt"

    def loss_step(net: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        if names_log is not None:
            names_log.parent.mkdir(parents=True, exist_ok=True)  # here: the run folder is checked first
            with open(names_log, "a", encoding="utf-8") as handle:
                handle.write("\n".join(batch["name"]) + "\n")
        restored = net(batch["input"]).float()
        return loss(restored, batch["target"])

    def save_final(net: torch.nn.Module, folder: Path) -> None:
        from swintormer.pipeline import DeblurPipeline

        # The deblur command's default window is the patch size the network learnt at.
        settings = inference_settings(config).model_copy(update={"tile": config.data.patch_size, "stride": None,
                                                                 "whole": False})
        DeblurPipeline(net, settings=settings, prior_contract=prior_contract(config)).save_pretrained(folder)

    task = TrainingTask(model=model, loss_step=loss_step, train_dataset=train_set, aux_modules=[loss],
                        validate=validate, save_final=save_final)
    return start_training(task, config, flags, accelerator, saved="model")


if __name__ == "__main__":
    from swintormer.core.run_control import exit_code_of_finished_job

    sys.exit(exit_code_of_finished_job(main()))
