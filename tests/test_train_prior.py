"""Stage-one fine-tuning: trainable-parameter selection by name patterns, frozen parameters that
stay frozen, both objectives' loss steps, and the train_prior pipeline on the shared engine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm_prior.codec import LatentCodec
from ldm_prior.finetune import (
    UNET_DECODER_PATTERNS,
    VQ_DECODER_PATTERNS,
    clean_latent_estimate,
    noise_prediction_loss,
    prediction_target,
    estimate_latent_scale,
    select_trainable,
    vq_decoder_reconstruction,
)
from ldm_prior.model import PriorConfig, PriorModel
from ldm_prior.trainer import PriorTrainer
from pipelines.train_prior import PriorTrainConfig
from pipelines.train_prior import main as train_prior
from swintormer.core.config import ConfigError
from swintormer.core.image_io import read_image

REPO = Path(__file__).resolve().parents[1]


def _images(batch: int, side: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    from skimage import data

    photo = torch.from_numpy(data.astronaut() / 255.0).float().permute(2, 0, 1)
    generator = torch.Generator().manual_seed(seed)
    crops = []
    for _ in range(batch):
        top, left = (int(v) for v in torch.randint(0, 512 - side, (2,), generator=generator))
        crops.append(photo[:, top : top + side, left : left + side])
    sharp = torch.stack(crops)
    blurry = torch.nn.functional.avg_pool2d(sharp, 3, stride=1, padding=1, count_include_pad=False)
    return blurry, sharp


def test_default_selection_is_the_unet_decoder_side() -> None:
    model = PriorModel.from_config("tiny", seed=0)
    selection = select_trainable(model, UNET_DECODER_PATTERNS)
    decoder_side = sum(p.numel() for n, p in model.unet.named_parameters() if n.startswith(("up_blocks", "conv_norm_out", "conv_out")))
    total = sum(p.numel() for p in model.parameters())
    assert selection.trainable_count == decoder_side
    assert selection.trainable_count + selection.frozen_count == total
    assert all(name.startswith("unet.up_blocks.") or name.startswith("unet.conv_") for name in selection.trainable_names)
    assert not model.unet.conv_in.weight.requires_grad and not model.vqvae.encoder.conv_in.weight.requires_grad
    assert f"{decoder_side:,}" in selection.describe()


def test_patterns_that_match_nothing_or_the_frozen_backbone_are_refused() -> None:
    model = PriorModel.from_config("tiny", seed=0)
    with pytest.raises(ValueError, match="'unet.decoder.\\*' matches no parameter"):
        select_trainable(model, ["unet.decoder.*"])
    with pytest.raises(ValueError, match="frozen"):
        select_trainable(model, ["unet.*"] + ["vqvae.encoder.*"])
    # Models built from random weights may train their backbone too, when asked explicitly.
    selection = select_trainable(model, ["unet.*"], allow_frozen=True)
    assert selection.trainable_count == sum(p.numel() for p in model.unet.parameters())


@pytest.mark.parametrize("objective,patterns", [
    ("noise", UNET_DECODER_PATTERNS),
    ("vq_decoder", VQ_DECODER_PATTERNS),
    ("vq_decoder", UNET_DECODER_PATTERNS + VQ_DECODER_PATTERNS),  # the pixel loss reaches the UNet too
], ids=["noise", "vq_decoder", "vq_decoder+unet"])
def test_frozen_parameters_do_not_change_while_the_rest_trains(objective: str, patterns) -> None:
    config = PriorTrainConfig(objective=objective, mode="quarter", loss={"gan": 0.5})
    model = PriorModel.from_config("tiny", seed=0)
    select_trainable(model, patterns)
    trainer = PriorTrainer(model, config.objective, config.mode, config.loss)
    before = {name: tensor.clone() for name, tensor in trainer.state_dict().items()}
    trainable = {name for name, p in trainer.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in trainer.parameters() if p.requires_grad], lr=1e-3)
    blurry, sharp = _images(2, 32)
    for _ in range(2):
        loss, logs = trainer(blurry, sharp)
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = trainer.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    # The discriminator's batch-norm statistics move too; everything else that moved must train.
    changed -= {name for name in changed if name.startswith("discriminator.") and ("running_" in name or "num_batches" in name)}
    assert changed and changed <= trainable  # nothing frozen moved
    assert any(name.startswith("prior.") for name in changed)
    if objective == "noise":
        assert set(logs) == {"diffusion_loss"} and torch.equal(logs["diffusion_loss"], loss.detach())
    if objective == "vq_decoder":
        assert set(logs) == {"decoder_l1", "gan_generator", "gan_discriminator"}
        assert any(name.startswith("discriminator.") for name in changed)
        prefixes = ("prior.vqvae.decoder.", "prior.vqvae.post_quant_conv.", "discriminator.")
        assert {name for name in changed if not name.startswith(prefixes)} == (
            {name for name in trainable if name.startswith("prior.unet.")})


def test_validation_diffusion_loss_is_deterministic_with_a_generator() -> None:
    model = PriorModel.from_config("tiny", seed=0)
    blurry, sharp = _images(2, 32)
    scheduler = model.ddpm_scheduler()
    with torch.no_grad():
        codec = LatentCodec.for_model(model, "quarter")
        first = noise_prediction_loss(model.unet, codec, blurry, sharp, scheduler, generator=torch.Generator().manual_seed(3))
        second = noise_prediction_loss(model.unet, codec, blurry, sharp, scheduler, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, second)


def _with_prediction_type(name: str, prediction_type: str) -> PriorModel:
    config = PriorConfig.named(name)
    scheduler = config.scheduler.model_copy(update={"prediction_type": prediction_type})
    torch.manual_seed(0)
    return PriorModel(config.model_copy(update={"scheduler": scheduler}))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_a_perfect_prediction_gives_back_the_clean_latent(prediction_type: str) -> None:
    """The training target and the one-step estimate are each other's inverse, for both
    parameterisations, at every noise level (the v formulas are easy to get backwards)."""
    scheduler = _with_prediction_type("tiny", prediction_type).ddpm_scheduler()
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(4, 3, 8, 8, generator=generator), torch.randn(4, 3, 8, 8, generator=generator)
    timesteps = torch.tensor([0, 250, 700, 999])
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = prediction_target(scheduler, latents, noise, timesteps)
    assert torch.equal(target, noise) == (prediction_type == "epsilon")
    torch.testing.assert_close(clean_latent_estimate(scheduler, noisy, target, timesteps), latents, atol=2e-4, rtol=0)
    # A prediction off by d moves the epsilon estimate by d·sqrt(1-ab)/sqrt(ab) (38x at t=999 on
    # this schedule) but the v estimate by only d·sqrt(1-ab): why v suits a briefly trained UNet.
    error = clean_latent_estimate(scheduler, noisy, target + 0.01, timesteps) - latents
    assert (error[-1].abs().max() > 0.3) == (prediction_type == "epsilon")


def test_prediction_type_is_saved_and_drives_training_and_sampling(tmp_path) -> None:
    model = _with_prediction_type("tiny", "v_prediction")
    model.save_pretrained(tmp_path / "prior")
    loaded = PriorModel.from_pretrained(tmp_path / "prior")
    assert loaded.config.scheduler.prediction_type == "v_prediction"
    assert loaded.ddim_scheduler().config.prediction_type == "v_prediction"
    blurry, sharp = _images(2, 32)
    draws = [torch.Generator().manual_seed(3) for _ in range(2)]
    with torch.no_grad():
        v_loss = noise_prediction_loss(loaded.unet, LatentCodec.for_model(loaded, "quarter"), blurry, sharp,
                                       loaded.ddpm_scheduler(), generator=draws[0])
        epsilon = _with_prediction_type("tiny", "epsilon")
        epsilon_loss = noise_prediction_loss(epsilon.unet, LatentCodec.for_model(epsilon, "quarter"), blurry, sharp,
                                             epsilon.ddpm_scheduler(), generator=draws[1])
    assert not torch.isclose(v_loss, epsilon_loss)  # same weights, same draws: only the target differs


def test_training_config_sets_the_prediction_type_of_a_loaded_prior(tmp_path) -> None:
    from pipelines.train_prior import load_model

    PriorModel.from_config("tiny", seed=0).save_pretrained(tmp_path / "epsilon")
    for source in ("tiny", str(tmp_path / "epsilon")):
        kept = load_model(PriorTrainConfig(model={"source": source}))
        assert kept.config.scheduler.prediction_type == "epsilon"
        switched = load_model(PriorTrainConfig(model={"source": source, "prediction_type": "v_prediction"}))
        assert switched.config.scheduler.prediction_type == "v_prediction"
        assert PriorTrainer(switched).scheduler.config.prediction_type == "v_prediction"


def _residual(model: PriorModel) -> PriorModel:
    """The same weights, generating the residual over the blurry latent."""
    return PriorModel(model.config.model_copy(update={"latent_target": "residual"}), unet=model.unet, vqvae=model.vqvae)


@pytest.mark.parametrize("mode", ["full", "quarter"])
def test_residual_target_is_the_sharp_latent_minus_the_blurry_one_and_decodes_back(mode: str) -> None:
    sharp_model = PriorModel.from_config("tiny", seed=0).eval()
    model = _residual(sharp_model)
    model.config = model.config.model_copy(update={"latent_scale": 2.5})
    blurry, sharp = _images(2, 32)
    codec, sharp_codec = LatentCodec.for_model(model, mode), LatentCodec.for_model(sharp_model, mode)
    with torch.no_grad():
        target, condition = codec.target_and_condition(blurry, sharp)
        sharp_target, sharp_condition = sharp_codec.target_and_condition(blurry, sharp)
        blurry_latent = codec.encode(blurry)
        torch.testing.assert_close(target, (codec.encode(sharp) - blurry_latent) * 2.5)
        torch.testing.assert_close(condition, sharp_condition)  # the condition does not change
        # A blurry image that is already sharp has nothing left to generate.
        assert codec.target_and_condition(sharp, sharp)[0].abs().max() == 0
        # Decoding adds the blurry latent back: the exact target decodes to the sharp latent.
        torch.testing.assert_close(codec.to_vq_latent(target, blurry_latent), sharp_target, atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="blurry image's latent"):
            codec.to_vq_latent(target, None)
        # The latent scale is estimated on what the diffusion generates: the residuals.
        scale = estimate_latent_scale(codec, [(blurry, sharp)])
        assert scale == pytest.approx(1 / float((target / 2.5).std()), rel=1e-4)
        assert scale > 1.5 * estimate_latent_scale(sharp_codec, [(blurry, sharp)])


@pytest.mark.parametrize("min_timestep, max_timestep", [(0, 200), (999, 1000)])
def test_vq_decoder_objective_decodes_the_residual_estimate_with_the_blurry_latent_added(
    min_timestep: int, max_timestep: int
) -> None:
    """(999, 1000) is the one-step trailing sampler's timestep: the decoder learns its estimates."""
    model = _residual(PriorModel.from_config("tiny", seed=0)).eval()
    blurry, sharp = _images(2, 32)
    scheduler, codec = model.ddpm_scheduler(), LatentCodec.for_model(model, "full")
    with torch.no_grad():
        decoded = vq_decoder_reconstruction(model.unet, codec, blurry, sharp, scheduler, max_timestep,
                                            torch.Generator().manual_seed(5), min_timestep=min_timestep)
        latents, condition = codec.target_and_condition(blurry, sharp)
        generator = torch.Generator().manual_seed(5)
        timesteps = torch.randint(min_timestep, max_timestep, (2,), generator=generator)
        if min_timestep == 999:
            assert timesteps.tolist() == [999, 999]
        noise = torch.randn(latents.shape, generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        estimate = clean_latent_estimate(scheduler, noisy, model.unet(torch.cat([noisy, condition], 1), timesteps).sample, timesteps)
        by_hand = model.vqvae.decode(estimate / model.config.latent_scale + codec.encode(blurry)).sample
    torch.testing.assert_close(decoded, torch.nn.functional.avg_pool2d(by_hand, 4))


def test_pixel_residual_objective_adds_the_decoded_change_to_the_blurry_image() -> None:
    """B + dec(ẑ) − dec(z_B): the plain objective's decoding, moved onto the blurry image; the
    VQ decoder learns from it."""
    residual = _residual(PriorModel.from_config("tiny", seed=0))
    model = PriorModel(residual.config.model_copy(update={"pixel_residual": True}), unet=residual.unet, vqvae=residual.vqvae)
    blurry, sharp = _images(2, 32)
    scheduler = model.ddpm_scheduler()
    select_trainable(model, VQ_DECODER_PATTERNS)
    codec = LatentCodec.for_model(model, "full")
    restored = vq_decoder_reconstruction(model.unet, codec, blurry, sharp, scheduler, 1000, torch.Generator().manual_seed(5), 999)
    with torch.no_grad():
        plain = vq_decoder_reconstruction(residual.unet, LatentCodec.for_model(residual, "full"), blurry, sharp, scheduler,
                                          1000, torch.Generator().manual_seed(5), 999)
        base = codec.decode(codec.encode(blurry))
        torch.testing.assert_close(restored, blurry * 2 - 1 + plain - base)
    restored.abs().mean().backward()
    assert model.vqvae.decoder.conv_out.weight.grad.abs().sum() > 0


def test_latent_target_is_saved_and_set_by_the_training_config(tmp_path) -> None:
    from pipelines.train_prior import load_model

    _residual(PriorModel.from_config("tiny", seed=0)).save_pretrained(tmp_path / "residual")
    assert PriorModel.from_pretrained(tmp_path / "residual").config.latent_target == "residual"
    assert load_model(PriorTrainConfig(model={"source": "tiny"})).config.latent_target == "sharp"
    switched = load_model(PriorTrainConfig(model={"source": "tiny", "latent_target": "residual"}))
    assert switched.config.latent_target == "residual"
    # pixel_residual switches on a saved residual prior, is saved, and needs a residual target.
    pixel = load_model(PriorTrainConfig(model={"source": str(tmp_path / "residual"), "pixel_residual": True}))
    pixel.save_pretrained(tmp_path / "pixel")
    assert PriorModel.from_pretrained(tmp_path / "pixel").config.pixel_residual
    assert pixel.fingerprint() != PriorModel.from_pretrained(tmp_path / "residual").fingerprint()
    with pytest.raises(ConfigError, match="pixel_residual needs latent_target 'residual'"):
        load_model(PriorTrainConfig(model={"source": "tiny", "pixel_residual": True}))
    with pytest.raises(ValueError):
        PriorTrainConfig(model={"source": "tiny", "latent_target": "difference"})


def test_full_mode_autoencoder_goes_up_four_times_and_back_like_a_prior() -> None:
    """In full mode the VQGAN learns what a full-mode prior decodes: the 4x upsampled image,
    decoded and area-downsampled back to the sharp image's size."""
    model = PriorModel.from_config("tiny", seed=0).eval()
    _, sharp = _images(1, 16)
    with torch.no_grad():
        restored, _ = LatentCodec.for_model(model, "full").reconstruct(sharp)
        upsampled = torch.nn.functional.interpolate(sharp, scale_factor=4, mode="bicubic").clamp(0, 1) * 2 - 1
        by_hand = torch.nn.functional.avg_pool2d(model.vqvae.decode(model.vqvae.encode(upsampled).latents).sample, 4)
        quarter, _ = LatentCodec.for_model(model, "quarter").reconstruct(sharp)
    assert restored.shape == sharp.shape == quarter.shape
    torch.testing.assert_close(restored, by_hand)
    assert not torch.allclose(restored, quarter)


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory) -> Path:
    from swintormer.core.image_io import write_image

    root = tmp_path_factory.mktemp("prior_data")
    rng = np.random.default_rng(0)
    from skimage import data

    photo = data.chelsea().astype(np.float32) / 255
    for split, count in (("train", 4), ("test", 2)):
        for index in range(count):
            top, left = rng.integers(0, 200, size=2)
            sharp = photo[top : top + 40, left : left + 40]
            blurry = (sharp + np.roll(sharp, 1, 0) + np.roll(sharp, 1, 1)) / 3
            write_image(root / split / "target" / f"{split}{index}.png", sharp)
            write_image(root / split / "input" / f"{split}{index}.png", blurry)
    return root


def test_pipeline_trains_only_the_selected_parameters_and_saves_a_loadable_prior(synthetic_data, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    code = train_prior(["--config", str(REPO / "configs/prior/cpu_tiny.yaml"), "--data", str(synthetic_data),
                        "--output", str(out), "--max-steps", "3", "validation.noise_draws=2",
                        "train.logging.progress_bar=false"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "trainable parameters:" in printed and "frozen:" in printed
    assert "diffusion_loss" in printed and "prior_psnr" in printed and "noise_loss" not in printed
    validation = [json.loads(line) for line in (out / "logs/metrics.jsonl").read_text().splitlines() if "val/vq_psnr" in line]
    assert [line["step"] for line in validation] == [3]
    assert {"val/diffusion_loss", "val/vq_psnr", "val/prior_psnr", "val/input_psnr"} == {k for k in validation[0] if k.startswith("val/")}
    # the two test crops as blurry | prior | sharp (32 px each, two white columns apart), prior PSNR in the name
    images = sorted((out / "validation/step_00000003").iterdir())
    assert [p.name.split("_prior_")[0] for p in images] == ["00_test0", "01_test1"]
    assert all(p.name.endswith("dB.png") for p in images)
    assert read_image(images[0]).pixels.shape == (32, 3 * 32 + 2 * 2, 3)
    trained = PriorModel.from_pretrained(out / "model")
    initial = PriorModel.from_config("tiny", seed=0)
    frozen_equal = [torch.equal(a, b) for (name, a), (_, b) in zip(initial.named_parameters(), trained.named_parameters())
                    if not name.startswith(("unet.up_blocks", "unet.conv_norm_out", "unet.conv_out"))]
    assert frozen_equal and all(frozen_equal)
    assert not torch.equal(initial.unet.conv_out.weight, trained.unet.conv_out.weight)
    assert (out / "checkpoints").is_dir() and (out / "config.yaml").is_file()


def test_pipeline_refuses_bad_configuration(synthetic_data, tmp_path, capsys) -> None:
    code = train_prior(["--config", str(REPO / "configs/prior/cpu_tiny.yaml"), "--data", str(synthetic_data),
                        "--output", str(tmp_path / "run"), "objektive=noise"])
    assert code == 2
    assert "objektive" in capsys.readouterr().err
    code = train_prior(["--config", str(REPO / "configs/prior/cpu_tiny.yaml"), "--data", str(synthetic_data),
                        "--output", str(tmp_path / "run"), "data.patch_size=30"])
    assert code == 2
    assert "multiples of 16" in capsys.readouterr().err
    code = train_prior(["--config", str(REPO / "configs/prior/cpu_tiny.yaml"), "--data", str(synthetic_data),
                        "--output", str(tmp_path / "run"), "loss.min_timestep=999", "loss.max_timestep=999"])
    assert code == 2
    assert "must be below loss.max_timestep" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted([*(REPO / "configs" / "prior").glob("*.yaml"),
                                         *(REPO / "configs" / "benchmark").glob("prior_*.yaml")]), ids=lambda p: p.name)
def test_every_shipped_prior_config_validates(path: Path) -> None:
    import yaml

    from swintormer.core.config import load_config

    config = load_config(PriorTrainConfig, path, [])
    raw = yaml.safe_load(path.read_text())
    assert (config.train.max_steps, config.mode, config.objective) == (
        raw["train"]["max_steps"], raw.get("mode", "full"), raw.get("objective", "noise"))


def test_validation_scores_a_pixel_residual_prior_by_what_a_perfect_residual_gives() -> None:
    """vq_psnr of a pixel-residual prior: B + dec(z_S) − dec(z_B) against S, not dec(z_S)."""
    from ldm_prior.trainer import make_validation
    from swintormer.core.metrics import psnr

    residual = _residual(PriorModel.from_config("tiny", seed=0)).eval()
    pixel = PriorModel(residual.config.model_copy(update={"pixel_residual": True}), unet=residual.unet, vqvae=residual.vqvae)
    blurry, sharp = _images(1, 32)
    dataset = [{"input": blurry[0], "target": sharp[0], "name": "a.png"}]
    config = PriorTrainConfig(validation={"crop": 32, "noise_draws": 1})
    with torch.no_grad():
        scores = {name: make_validation(dataset, config.mode, config.validation)(PriorTrainer(model, mode=config.mode), 0).metrics["vq_psnr"]
                  for name, model in (("plain", residual), ("pixel", pixel))}
        codec = LatentCodec.for_model(pixel, "full")
        change = codec.decode(codec.encode(sharp)) - codec.decode(codec.encode(blurry))
    by_hand = psnr(((blurry * 2 - 1 + change + 1) / 2).clamp(0, 1)[0].permute(1, 2, 0).numpy(), sharp[0].permute(1, 2, 0).numpy())
    assert scores["pixel"] == pytest.approx(by_hand, abs=1e-3)
    assert abs(scores["pixel"] - scores["plain"]) > 0.5


def test_decoder_tuning_validation_reports_its_own_loss_and_the_prior_sampled_as_configured() -> None:
    """A vq_decoder run (UNet frozen) reports decoder_l1 and prior_psnr, no diffusion loss (it
    cannot change), and samples its priors with the validation's steps and spacing."""
    from ldm_prior.finetune import select_for_objective
    from ldm_prior.sampling import PriorSampler, SamplingSettings, image_seed
    from ldm_prior.trainer import make_validation
    from swintormer.core.metrics import psnr

    model = PriorModel.from_config("tiny", seed=0).eval()
    select_for_objective(model, "vq_decoder", None, False)
    blurry, sharp = _images(2, 32)
    dataset = [{"input": blurry[i], "target": sharp[i], "name": f"sub/img{i}.png"} for i in range(2)]
    config = PriorTrainConfig(objective="vq_decoder", mode="quarter",
                              validation={"crop": 32, "noise_draws": 1, "prior_steps": 2,
                                          "prior_timestep_spacing": "trailing", "images": 1})
    with torch.no_grad():
        report = make_validation(dataset, config.mode, config.validation)(
            PriorTrainer(model, config.objective, config.mode, config.loss), 0)
        sampler = PriorSampler(model, SamplingSettings(steps=2, mode="quarter", timestep_spacing="trailing"))
        priors = [sampler.sample(blurry[i].permute(1, 2, 0).numpy(), image_seed(config.validation.seed, f"sub/img{i}.png"))
                  for i in range(2)]
    assert set(report.metrics) == {"decoder_l1", "vq_psnr", "prior_psnr", "input_psnr"}
    assert report.metrics["decoder_l1"] > 0
    sharp_images = [sharp[i].permute(1, 2, 0).numpy() for i in range(2)]
    expected = np.mean([psnr(prior, target) for prior, target in zip(priors, sharp_images)])
    assert report.metrics["prior_psnr"] == pytest.approx(expected, abs=1e-4)
    [image] = report.images
    assert image.name == "00_img0" and image.note == f"prior_{psnr(priors[0], sharp_images[0]):.2f}dB"
    np.testing.assert_allclose(image.panels[1], priors[0], atol=1e-6)
    np.testing.assert_allclose(image.panels[2], sharp_images[0], atol=1e-6)
