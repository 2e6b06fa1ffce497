"""Prior sampling: determinism per seed, output size in both conditioning modes (odd sizes too),
and tiled sampling against untiled sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ldm_prior.codec import LatentCodec
from ldm_prior.finetune import clean_latent_estimate
from ldm_prior.model import PriorModel
from ldm_prior.sampling import PriorSampler, SamplingSettings, image_seed

UNTILED = {"tile": 4096, "decode_tile": 4096}


@pytest.fixture(scope="module")
def tiny() -> PriorModel:
    return PriorModel.from_config("tiny", seed=1)


def _photo(height: int, width: int) -> np.ndarray:
    from skimage import data

    return (data.chelsea()[60 : 60 + height, 80 : 80 + width] / 255.0).astype(np.float32)


def test_image_seed_depends_on_run_seed_and_name_only() -> None:
    assert image_seed(0, "a/b.png") == image_seed(0, "a/b.png")
    assert len({image_seed(0, "a/b.png"), image_seed(1, "a/b.png"), image_seed(0, "a/c.png")}) == 3
    assert 0 <= image_seed(123, "x") < 2**63


@pytest.mark.parametrize("mode,height,width", [("full", 13, 22), ("quarter", 21, 35)])
def test_prior_has_the_image_size_and_is_reproducible(tiny: PriorModel, mode: str, height: int, width: int) -> None:
    sampler = PriorSampler(tiny, SamplingSettings(steps=2, mode=mode, eta=0.5))
    image = _photo(height, width)
    first = sampler.sample(image, seed=11)
    assert first.shape == (height, width, 3) and first.dtype == np.float32
    assert 0.0 <= first.min() and first.max() <= 1.0
    assert np.array_equal(first, sampler.sample(image, seed=11))  # eta noise is seeded too
    assert not np.array_equal(first, sampler.sample(image, seed=12))


def test_prior_depends_on_the_condition(tiny: PriorModel) -> None:
    sampler = PriorSampler(tiny, SamplingSettings(steps=3, mode="quarter"))
    image = _photo(32, 32)
    assert not np.array_equal(sampler.sample(image, seed=1), sampler.sample(1.0 - image, seed=1))


def test_tiled_denoising_matches_untiled_up_to_the_blend(tiny: PriorModel) -> None:
    """Quarter mode, latent 24x32 denoised in 16-latent tiles with stride 8 (6 tiles per step)."""
    image = _photo(96, 128)
    untiled = PriorSampler(tiny, SamplingSettings(steps=2, mode="quarter", **UNTILED)).sample(image, seed=4)
    tiled = PriorSampler(tiny, SamplingSettings(steps=2, mode="quarter", tile=16, tile_stride=8, tile_batch=5,
                                                decode_tile=4096)).sample(image, seed=4)
    other_seed = PriorSampler(tiny, SamplingSettings(steps=2, mode="quarter", **UNTILED)).sample(image, seed=5)
    difference = np.abs(tiled - untiled)
    assert 0 < difference.mean() < 0.005 and difference.max() < 0.1
    # The blend error is far below what a different noise draw changes.
    assert difference.mean() < 0.5 * np.abs(other_seed - untiled).mean()


def test_tiled_decoding_matches_untiled_up_to_the_blend(tiny: PriorModel) -> None:
    """Quarter mode, latent 24x32 decoded in 12-latent tiles with stride 8. The VQ decoder's
    group norms and mid-block attention see only their tile, so with random weights the tiles
    differ from a whole decode by more than the seams alone would (see ldm_prior/sampling.py);
    the bound below is what the blend guarantees at this tile size, not a seam-free result."""
    image = _photo(96, 128)
    untiled = PriorSampler(tiny, SamplingSettings(steps=2, mode="quarter", **UNTILED)).sample(image, seed=4)
    tiled = PriorSampler(tiny, SamplingSettings(steps=2, mode="quarter", tile=4096, decode_tile=12,
                                                decode_stride=8)).sample(image, seed=4)
    difference = np.abs(tiled - untiled)
    assert 0 < difference.mean() < 0.1


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown conditioning mode 'half'"):
        SamplingSettings(mode="half")
    with pytest.raises(ValueError, match="eta"):
        SamplingSettings(eta=2.0)
    with pytest.raises(ValueError, match="gaps"):
        SamplingSettings(tile=16, tile_stride=32)
    with pytest.raises(ValueError, match="unknown timestep spacing 'linspace'"):
        SamplingSettings(timestep_spacing="linspace")


@pytest.mark.parametrize("steps,leading,trailing", [(1, [0], [999]), (5, [800, 600, 400, 200, 0], [999, 799, 599, 399, 199])])
def test_timestep_spacing_places_the_ddim_steps(tiny: PriorModel, steps: int, leading: list, trailing: list) -> None:
    for spacing, expected in (("leading", leading), ("trailing", trailing)):
        scheduler = tiny.ddim_scheduler(spacing)
        scheduler.set_timesteps(steps)
        assert scheduler.timesteps.tolist() == expected


def test_one_trailing_step_decodes_the_clean_latent_estimate_from_pure_noise(tiny: PriorModel) -> None:
    """With trailing spacing and T = 1, DDIM (eta 0, alpha_prev = 1) returns the UNet's one-step
    estimate of the clean latent at t = 999 from the initial noise; computed here by hand."""
    image = _photo(16, 24)
    settings = SamplingSettings(steps=1, mode="full", timestep_spacing="trailing", **UNTILED)
    prior = PriorSampler(tiny, settings).sample(image, seed=3)

    config = tiny.config
    condition = torch.from_numpy(image).permute(2, 0, 1)[None] * 2 - 1
    noise = torch.randn((1, config.vqvae.latent_channels, 16, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        timestep = torch.tensor([999])
        prediction = tiny.unet(torch.cat([noise, condition], dim=1), timestep).sample
        latent = clean_latent_estimate(tiny.ddim_scheduler(), noise, prediction, timestep)
        decoded = tiny.vqvae.decode(latent / config.latent_scale).sample.clamp(-1, 1)
    by_hand = ((F.avg_pool2d(decoded, config.vq_factor) + 1) / 2).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    assert np.abs(prior - by_hand).max() < 1e-5
    # The default (leading) spacing runs its single step at t = 0 instead: another prior.
    leading = PriorSampler(tiny, SamplingSettings(steps=1, mode="full", **UNTILED)).sample(image, seed=3)
    assert np.abs(leading - by_hand).max() > 1e-3


@pytest.mark.parametrize("mode", ["full", "quarter"])
def test_residual_prior_decodes_its_sample_plus_the_blurry_latent(tiny: PriorModel, mode: str) -> None:
    """One trailing step by hand, as above: the UNet's estimate (the residual) plus the VQ latent
    of the blurry image, decoded. Encoding the blurry image in small tiles changes the result
    only as much as tiles change a random encoder."""
    residual = PriorModel(tiny.config.model_copy(update={"latent_target": "residual"}), unet=tiny.unet, vqvae=tiny.vqvae)
    image = _photo(32, 48)
    settings = SamplingSettings(steps=1, mode=mode, timestep_spacing="trailing", **UNTILED)
    prior = PriorSampler(residual, settings).sample(image, seed=3)

    config = tiny.config
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None]
    condition = pixels if mode == "full" else F.avg_pool2d(pixels, config.vq_factor)
    noise = torch.randn((1, config.vqvae.latent_channels, *condition.shape[-2:]), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        timestep = torch.tensor([999])
        prediction = tiny.unet(torch.cat([noise, condition * 2 - 1], dim=1), timestep).sample
        latent = clean_latent_estimate(tiny.ddim_scheduler(), noise, prediction, timestep) / config.latent_scale
        decoded = tiny.vqvae.decode(latent + LatentCodec.for_model(tiny, mode).encode(pixels)).sample.clamp(-1, 1)
    if mode == "full":
        decoded = F.avg_pool2d(decoded, config.vq_factor)
    by_hand = ((decoded + 1) / 2).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    assert np.abs(prior - by_hand).max() < 1e-5
    # The latent decoded is the same DDIM result plus the blurry image's latent.
    added = PriorSampler(residual, settings).sample_latent(image, seed=3) - PriorSampler(tiny, settings).sample_latent(image, seed=3)
    torch.testing.assert_close(added, LatentCodec.for_model(tiny, mode).encode(pixels), atol=1e-5, rtol=0)

    tiles = {"decode_tile": 16, "decode_stride": 8} if mode == "full" else {"decode_tile": 4, "decode_stride": 2}
    tiled = PriorSampler(residual, SamplingSettings(steps=1, mode=mode, timestep_spacing="trailing", tile=4096, **tiles))
    difference = (tiled.sample_latent(image, seed=3) - PriorSampler(residual, settings).sample_latent(image, seed=3)).abs()
    # As for tiled decoding, the random encoder's group norms see only their tile: 14% (full) and
    # 20% (quarter) of the latent's size here. Misplaced or missing tiles would give 100%.
    assert 0 < difference.mean() < 0.3 * added.abs().mean()


@pytest.mark.parametrize("mode", ["full", "quarter"])
def test_pixel_residual_prior_adds_the_decoded_change_to_the_blurry_image(tiny: PriorModel, mode: str) -> None:
    """B + dec(z_B + r) − dec(z_B), the decodings unclamped and only the sum clamped; in tiles,
    the same up to the decoder's tile effects, and never the plain decoding."""
    config = tiny.config.model_copy(update={"latent_target": "residual", "pixel_residual": True})
    model = PriorModel(config, unet=tiny.unet, vqvae=tiny.vqvae)
    image = _photo(32, 48)
    settings = SamplingSettings(steps=1, mode=mode, timestep_spacing="trailing", **UNTILED)
    sampler = PriorSampler(model, settings)
    prior = sampler.sample(image, seed=3)

    pixels = torch.from_numpy(image).permute(2, 0, 1)[None]
    codec = LatentCodec.for_model(tiny, mode)
    with torch.no_grad():
        change = codec.decode(sampler.sample_latent(image, seed=3)) - codec.decode(codec.encode(pixels))
    by_hand = (pixels + change / 2).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    assert np.abs(prior - by_hand).max() < 1e-5
    plain = PriorSampler(PriorModel(config.model_copy(update={"pixel_residual": False}), unet=tiny.unet, vqvae=tiny.vqvae),
                         settings).sample(image, seed=3)
    assert np.abs(prior - plain).mean() > 0.01

    tiles = {"decode_tile": 16, "decode_stride": 8} if mode == "full" else {"decode_tile": 4, "decode_stride": 2}
    tiled = PriorSampler(model, SamplingSettings(steps=1, mode=mode, timestep_spacing="trailing", tile=4096, **tiles))
    difference = np.abs(tiled.sample(image, seed=3) - prior)
    # The blurry image is added once, after blending: what remains is the random decoder's tile
    # effects on the small change, far below what the plain decoding moves the image by.
    assert 0 < difference.mean() < 0.01 < np.abs(plain - image).mean()
