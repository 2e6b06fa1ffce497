"""The shared tiling core: window placement and the separable overlap blend."""

from __future__ import annotations

import numpy as np
import torch

from swintormer.core.tiling import OverlapAccumulator, feather_weights, triangle_weights, window_grid, window_starts


def _blend_with_a_weight_image(image: torch.Tensor, tile: int, stride: int, weight_1d: torch.Tensor, scale: int,
                               transform) -> torch.Tensor:
    """The plain computation the accumulator must equal: a stored weight image."""
    channels, height, width = image.shape
    total = torch.zeros(channels, height * scale, width * scale, dtype=torch.float64)
    weights = torch.zeros(1, height * scale, width * scale, dtype=torch.float64)
    window_weight = torch.outer(weight_1d, weight_1d)
    for top, left in window_grid(height, width, tile, tile, stride):
        output = transform(image[:, top: top + tile, left: left + tile])
        region = (slice(None), slice(top * scale, (top + tile) * scale), slice(left * scale, (left + tile) * scale))
        total[region] += output * window_weight
        weights[region] += window_weight
    return total / weights


def _run(image: torch.Tensor, tile: int, stride: int, weight_1d: torch.Tensor, scale: int, transform) -> torch.Tensor:
    _, height, width = image.shape
    rows, cols = window_starts(height, tile, stride), window_starts(width, tile, stride)
    accumulator = OverlapAccumulator(height, width, rows, cols, weight_1d, weight_1d, scale=scale)
    for top, left in window_grid(height, width, tile, tile, stride):
        accumulator.add(top, left, transform(image[:, top: top + tile, left: left + tile]))
    return accumulator.result(dtype=torch.float64)


def test_identical_window_outputs_come_back_bit_for_bit():
    image = torch.rand(3, 37, 53, dtype=torch.float64).float().double()
    for weight in (torch.ones(16, dtype=torch.float64), feather_weights(16, 11), triangle_weights(16)):
        out = _run(image, 16, 11, weight, 1, lambda window: window)
        assert torch.equal(out.float(), image.float())


def test_the_separable_normalisation_equals_a_stored_weight_image_at_scale_two():
    torch.manual_seed(0)
    image = torch.rand(2, 30, 41, dtype=torch.float64)
    # A window-dependent transform (upsampling plus an offset that depends on the window's content),
    # so overlaps really disagree and the weights matter.
    def transform(window: torch.Tensor) -> torch.Tensor:
        up = window.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
        return up + window.mean()
    weight = triangle_weights(24)
    expected = _blend_with_a_weight_image(image, 12, 7, weight, 2, transform)
    got = _run(image, 12, 7, weight, 2, transform)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_channels_last_result_matches_the_tensor_result():
    image = torch.rand(3, 70, 90, dtype=torch.float64)
    rows, cols = window_starts(70, 32, 20), window_starts(90, 32, 20)
    accumulator = OverlapAccumulator(70, 90, rows, cols, feather_weights(32, 20), feather_weights(32, 20))
    for top, left in window_grid(70, 90, 32, 32, 20):
        accumulator.add(top, left, image[:, top: top + 32, left: left + 32] * (1 + top / 100))
    tensor = accumulator.result()
    array = accumulator.result(channels_last=True)
    assert isinstance(array, np.ndarray) and array.shape == (70, 90, 3)
    np.testing.assert_array_equal(array, tensor.permute(1, 2, 0).numpy())
