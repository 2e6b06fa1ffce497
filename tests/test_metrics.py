"""Metrics equal direct computations with the published formulas (tolerance 1e-6)."""

from __future__ import annotations

import math
from pathlib import Path

import lpips
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import uniform_filter

from swintormer.core.image_io import read_image, write_image
from swintormer.core.metrics import PSNR_CAP_DB, LPIPSMetric, LPIPSWeightsMissing, mae, psnr, ssim


@pytest.fixture(scope="module")
def image_pair():
    rng = np.random.default_rng(0)
    target = rng.random((40, 48, 3)).astype(np.float32)
    restored = np.clip(target + rng.normal(0, 0.05, target.shape), 0, 1).astype(np.float32)
    return restored, target


def test_psnr_formula(image_pair):
    restored, target = image_pair
    mse = np.mean((restored.astype(np.float64) - target) ** 2)
    assert abs(psnr(restored, target) - 10 * math.log10(1 / mse)) < 1e-6
    # a constant error of 0.1 is exactly 20 dB
    assert abs(psnr(np.full((4, 4, 3), 0.6), np.full((4, 4, 3), 0.5)) - 20.0) < 1e-6


def test_identical_images_give_the_documented_cap(image_pair):
    _, target = image_pair
    assert psnr(target, target.copy()) == PSNR_CAP_DB == 100.0
    assert abs(ssim(target, target) - 1.0) < 1e-12
    assert mae(target, target) == 0.0


def test_mae_formula(image_pair):
    restored, target = image_pair
    per_channel = [np.mean(np.abs(restored[:, :, c].astype(np.float64) - target[:, :, c])) for c in range(3)]
    assert abs(mae(restored, target) - np.mean(per_channel)) < 1e-6


def _ssim_wang(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM of Wang et al. 2004 as scikit-image's default evaluates it: 7×7 uniform window,
    sample covariances, K1=0.01, K2=0.03, L=1, mean over the map without the 3-pixel border,
    then the mean over channels."""
    values = []
    for c in range(3):
        a, b = x[:, :, c].astype(np.float64), y[:, :, c].astype(np.float64)
        n = 49
        mean_a, mean_b = uniform_filter(a, 7), uniform_filter(b, 7)
        var_a = (uniform_filter(a * a, 7) - mean_a**2) * n / (n - 1)
        var_b = (uniform_filter(b * b, 7) - mean_b**2) * n / (n - 1)
        cov = (uniform_filter(a * b, 7) - mean_a * mean_b) * n / (n - 1)
        c1, c2 = 0.01**2, 0.03**2
        smap = ((2 * mean_a * mean_b + c1) * (2 * cov + c2)) / ((mean_a**2 + mean_b**2 + c1) * (var_a + var_b + c2))
        values.append(smap[3:-3, 3:-3].mean())
    return float(np.mean(values))


def test_ssim_formula(image_pair):
    restored, target = image_pair
    assert abs(ssim(restored, target) - _ssim_wang(restored, target)) < 1e-6
    assert ssim(restored, target) < 0.99


def test_16bit_differences_below_one_8bit_step_are_measured(tmp_path):
    rng = np.random.default_rng(1)
    high_bytes = rng.integers(0, 256, size=(16, 16, 3)) * 256
    a = (high_bytes + rng.integers(0, 128, size=high_bytes.shape)).astype(np.uint16)
    b = (high_bytes + rng.integers(128, 256, size=high_bytes.shape)).astype(np.uint16)
    # the two images have the same 8-bit values: an 8-bit reader would report identical images
    assert np.array_equal(a >> 8, b >> 8)
    write_image(tmp_path / "a.png", a / 65535.0, bit_depth=16)
    write_image(tmp_path / "b.png", b / 65535.0, bit_depth=16)
    got = psnr(read_image(tmp_path / "a.png").pixels, read_image(tmp_path / "b.png").pixels)
    # the published DPDD protocol: float32(samples) / 65535, then 10·log10(1/MSE)
    a32 = a.astype(np.float32) / np.float32(65535.0)
    b32 = b.astype(np.float32) / np.float32(65535.0)
    expected = 10 * math.log10(1 / np.mean((a32.astype(np.float64) - b32) ** 2))
    assert abs(got - expected) < 1e-6
    # and the exact value of the 16-bit samples, up to float32 storage of the pixels
    exact = 10 * math.log10(1 / np.mean((a / 65535.0 - b / 65535.0) ** 2))
    assert abs(got - exact) < 1e-3
    assert 40 < got < PSNR_CAP_DB


def test_shape_mismatch_is_an_error(image_pair):
    restored, target = image_pair
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(restored[:-1], target)


# --------------------------------------------------------------------------------------------
# LPIPS with random AlexNet weights

ALEXNET_FEATURES = [  # torchvision AlexNet .features: (index, in, out, kernel, stride, padding)
    (0, 3, 64, 11, 4, 2),
    (3, 64, 192, 5, 1, 2),
    (6, 192, 384, 3, 1, 1),
    (8, 384, 256, 3, 1, 1),
    (10, 256, 256, 3, 1, 1),
]


@pytest.fixture(scope="module")
def random_alexnet(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    state = {}
    for index, cin, cout, k, _, _ in ALEXNET_FEATURES:
        state[f"features.{index}.weight"] = torch.randn(cout, cin, k, k, generator=generator) * (2.0 / (cin * k * k)) ** 0.5
        state[f"features.{index}.bias"] = torch.randn(cout, generator=generator) * 0.1
    state["classifier.1.weight"] = torch.randn(4, 4, generator=generator)  # ignored by LPIPS
    path = tmp_path_factory.mktemp("alexnet") / "alexnet-random.pth"
    torch.save(state, path)
    return path, state


def _lpips_direct(x: np.ndarray, y: np.ndarray, state: dict[str, torch.Tensor]) -> float:
    """LPIPS v0.1 (Zhang et al. 2018) written out: inputs [0,1] → [-1,1], the published scaling
    layer, AlexNet ReLU outputs after conv1..conv5 (max-pooling before conv2 and conv3), unit
    normalisation over channels, squared differences weighted by the package's linear layers,
    spatial mean, sum over layers."""
    lins = torch.load(Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth", map_location="cpu", weights_only=True)
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def features(image: np.ndarray) -> list[torch.Tensor]:
        h = torch.from_numpy(image).permute(2, 0, 1)[None].float() * 2 - 1
        h = (h - shift) / scale
        outputs = []
        for number, (index, _, _, _, stride, padding) in enumerate(ALEXNET_FEATURES):
            if number in (1, 2):
                h = F.max_pool2d(h, kernel_size=3, stride=2)
            h = F.relu(F.conv2d(h, state[f"features.{index}.weight"], state[f"features.{index}.bias"], stride=stride, padding=padding))
            outputs.append(h)
        return outputs

    total = 0.0
    with torch.no_grad():
        for layer, (fa, fb) in enumerate(zip(features(x), features(y))):
            na = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            nb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            weight = lins[f"lin{layer}.model.1.weight"]
            total += float(F.conv2d((na - nb) ** 2, weight).mean())
    return total


def test_lpips_matches_direct_computation(random_alexnet, image_pair, tmp_path):
    path, state = random_alexnet
    restored, target = image_pair
    restored = np.ascontiguousarray(np.pad(restored, ((12, 12), (8, 8), (0, 0)), mode="reflect"))
    target = np.ascontiguousarray(np.pad(target, ((12, 12), (8, 8), (0, 0)), mode="reflect"))
    metric = LPIPSMetric(path)
    value = metric(restored, target)
    assert value > 1e-3
    assert abs(value - _lpips_direct(restored, target, state)) < 1e-6
    assert metric(target, target) == 0.0
    # the same weights stored as safetensors give the same number
    from safetensors.torch import save_file

    st_path = tmp_path / "alexnet.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(st_path))
    assert abs(LPIPSMetric(st_path)(restored, target) - value) < 1e-7


def test_lpips_missing_or_wrong_weights(tmp_path, monkeypatch):
    missing = tmp_path / "nothing.pth"
    with pytest.raises(LPIPSWeightsMissing, match=str(missing)):
        LPIPSMetric(missing)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(LPIPSWeightsMissing, match="alexnet-owt-7be5be79.pth"):
        LPIPSMetric()
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match="not a torchvision AlexNet"):
        LPIPSMetric(wrong)
