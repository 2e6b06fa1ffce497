"""The on-the-fly degradations and the datasets that draw them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from swintormer.core.data.degradations import (
    BlurShares,
    DegradationConfig,
    degrade_crop,
    linear_to_srgb,
    radius_map_from_depth,
    render_varying_defocus,
    sample_degradation,
    srgb_to_linear,
)
from swintormer.core.data.degraded import DegradedImageDataset, DegradedPatchDataset
from swintormer.core.image_io import write_image


def _photo(seed: int, height: int = 96, width: int = 128) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 1, size=(height // 8, width // 8, 3)).astype(np.float32)
    return np.kron(base, np.ones((8, 8, 1), dtype=np.float32))  # blocks: strong edges everywhere


def _only(kind: str, **changes) -> DegradationConfig:
    shares = {name: 0.0 for name in BlurShares.model_fields}
    shares[kind] = 1.0
    return DegradationConfig(shares=BlurShares(**shares), **changes)


def test_srgb_curves_are_inverse():
    values = np.linspace(0, 1, 1001, dtype=np.float32)
    np.testing.assert_allclose(linear_to_srgb(srgb_to_linear(values)), values, atol=2e-6)
    assert srgb_to_linear(np.float32(0.5)) == pytest.approx(0.21404, abs=1e-4)  # the sRGB curve, not gamma 2.2


def test_the_sampler_is_reproducible_for_a_seed_and_differs_across_seeds():
    config = DegradationConfig()
    sharp = _photo(0, 80, 80)

    def draw(seed: int):
        rng = np.random.default_rng([seed, 0, 3])
        return degrade_crop(rng, sharp, config)

    first, second, other = draw(7), draw(7), draw(8)
    assert first[2].describe() == second[2].describe()
    np.testing.assert_array_equal(first[0], second[0])
    assert not np.array_equal(first[0], other[0]) or first[2].describe() != other[2].describe()


def test_a_depth_map_with_radius_zero_everywhere_returns_the_input_exactly():
    image = _photo(1)
    radius = np.zeros(image.shape[:2], dtype=np.float32)
    np.testing.assert_array_equal(render_varying_defocus(image, radius, levels=8), image)
    # Pixels of radius 0 stay exact even when the rest of the image is blurred.
    radius[:, 64:] = 5.0
    out = render_varying_defocus(image, radius, levels=8)
    np.testing.assert_array_equal(out[:, :64], image[:, :64])
    assert np.abs(out[:, 72:] - image[:, 72:]).max() > 0.1


def _edge_width(profile: np.ndarray) -> int:
    """Pixels over which a dark-to-bright step rises from 5% to 95%."""
    low, high = profile.min(), profile.max()
    normalised = (profile - low) / (high - low)
    return int(np.argmax(normalised >= 0.95) - np.argmax(normalised >= 0.05))


def test_blur_radii_follow_the_depth_map():
    # A vertical step edge, rendered where the depth map puts radius 2 (top) and radius 6 (bottom).
    height, width = 128, 64
    image = np.zeros((height, width, 3), dtype=np.float32)
    image[:, width // 2:] = 1.0
    depth = np.zeros((height, width), dtype=np.float32)
    depth[height // 2:] = 1.0
    radius = radius_map_from_depth(depth * 0.5 + 0.25, focus=0.0, max_radius=6.0, depth_of_field=0.0)
    # depth 0.25 → radius 2 (a third of the way), depth 0.75 → radius 6.
    assert radius[0, 0] == pytest.approx(2.0) and radius[-1, 0] == pytest.approx(6.0)
    out = render_varying_defocus(image, radius, levels=6)
    near = _edge_width(out[16, :, 0])
    far = _edge_width(out[height - 16, :, 0])
    # A disc of radius r spreads a step over about 2r pixels.
    assert 2 <= near <= 4
    assert 9 <= far <= 12


def test_the_in_focus_region_of_a_varying_defocus_sample_is_unblurred():
    rng = np.random.default_rng(3)
    config = _only("defocus_varying", noise_probability=0.0, jpeg_probability=0.0)
    degradation = sample_degradation(rng, config, 96, 128)
    assert degradation.radius_map is not None and degradation.radius_map.min() == 0.0
    assert degradation.radius_map.max() > 1.0
    image = _photo(2)
    blurred = degradation.blur(image)
    in_focus = degradation.radius_map == 0
    np.testing.assert_allclose(blurred[in_focus], image[in_focus], atol=1e-5)


def test_the_sharp_share_yields_that_share_of_unblurred_samples():
    config = DegradationConfig(shares=BlurShares(sharp=0.3, defocus_uniform=0.7, defocus_varying=0, motion=0,
                                                 defocus_motion=0), noise_probability=0.0, jpeg_probability=0.0)
    sharp_image = _photo(4, 72, 72)
    unblurred = 0
    draws = 1000
    for index in range(draws):
        rng = np.random.default_rng([0, 0, index])
        blurry, sharp, degradation = degrade_crop(rng, sharp_image, config)
        if degradation.kind == "sharp":
            # Nothing but 8-bit quantisation of an image that already is 8-bit-exact: identical.
            np.testing.assert_array_equal(blurry, np.rint(sharp * 255) / 255)
            unblurred += 1
    # Binomial(1000, 0.3): standard deviation 14.5; ±4.5σ.
    assert abs(unblurred - 300) < 65


def test_noise_is_signal_dependent():
    config = _only("sharp", noise_probability=1.0, shot_noise=(2e-3, 2e-3), read_noise_sigma=(0.0, 0.0),
                   jpeg_probability=0.0, linear_light=False)
    flat = np.concatenate([np.full((80, 40, 3), 0.1, np.float32), np.full((80, 40, 3), 0.8, np.float32)], axis=1)
    blurry, _, _ = degrade_crop(np.random.default_rng(0), flat, config)
    dark, bright = blurry[:, :15].std(), blurry[:, -15:].std()
    # Standard deviations sqrt(2e-3·x): 0.014 at 0.1, 0.040 at 0.8.
    assert dark == pytest.approx(np.sqrt(2e-3 * 0.1), rel=0.25)
    assert bright == pytest.approx(np.sqrt(2e-3 * 0.8), rel=0.25)


def test_jpeg_at_a_low_quality_changes_a_sharp_sample():
    clean = _only("sharp", noise_probability=0.0, jpeg_probability=0.0)
    jpeg = _only("sharp", noise_probability=0.0, jpeg_probability=1.0, jpeg_quality=(30, 30))
    image = _photo(5, 80, 80)
    without, _, _ = degrade_crop(np.random.default_rng(0), image, clean)
    with_jpeg, _, degradation = degrade_crop(np.random.default_rng(0), image, jpeg)
    assert degradation.jpeg_quality == 30
    assert 0.005 < np.abs(with_jpeg - without).mean() < 0.1


def test_config_rejects_reversed_ranges_and_unknown_keys():
    with pytest.raises(ValueError, match="defocus_radius"):
        DegradationConfig(defocus_radius=(5.0, 2.0))
    with pytest.raises(ValueError):
        DegradationConfig(blur_radius=(1.0, 2.0))
    with pytest.raises(ValueError, match="share"):
        BlurShares(sharp=0, defocus_uniform=0, defocus_varying=0, motion=0, defocus_motion=0)


@pytest.fixture()
def photos(tmp_path):
    paths = []
    for seed in range(3):
        path = tmp_path / f"photo_{seed}.png"
        write_image(path, _photo(seed, 120, 160))
        paths.append(path)
    return paths


def test_patch_dataset_items_depend_on_seed_epoch_and_index_only(photos):
    config = DegradationConfig(scale=(0.5, 1.0))
    dataset = DegradedPatchDataset(photos, 32, config, seed=3, repeat=2)
    assert len(dataset) == 6
    first = dataset[4]
    assert first["input"].shape == (3, 32, 32) and first["target"].shape == (3, 32, 32)
    assert first["input"].dtype == torch.float32
    fresh = DegradedPatchDataset(photos, 32, config, seed=3, repeat=2, cache_images=True)
    _ = fresh[1]  # other items drawn first change nothing
    again = fresh[4]
    assert torch.equal(first["input"], again["input"]) and torch.equal(first["target"], again["target"])
    dataset.set_epoch(1)
    assert not torch.equal(dataset[4]["target"], first["target"])


def test_validation_dataset_is_fixed_and_cycles_the_given_kinds(photos):
    config = DegradationConfig()
    dataset = DegradedImageDataset(photos, 48, config, seed=0, kinds=["sharp", "motion"])
    names = [dataset[i]["name"] for i in range(3)]
    assert names == ["photo_0_sharp", "photo_1_motion", "photo_2_sharp"]
    again = DegradedImageDataset(photos, 48, config, seed=0, kinds=["sharp", "motion"])
    assert torch.equal(dataset[1]["input"], again[1]["input"])
    assert dataset[1]["input"].shape == (3, 48, 48)
    # A photo smaller than the crop is served whole.
    whole = DegradedImageDataset(photos, 1000, config, seed=0)
    assert whole[0]["target"].shape == (3, 120, 160)
