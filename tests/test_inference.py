"""Tests of the sliding-window inferencer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from swintormer.core.tiling import feather_weights, window_starts
from swintormer.inference import SlidingWindowInferencer, WholeImageInferencer
from swintormer.models import Swintormer, SwintormerConfig
from swintormer.core.padding import reflect_pad


class FirstThreeChannels(nn.Module):
    """Returns its first three input channels: tiled inference must give the image back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :3].clone()


class WindowCornerConstant(nn.Module):
    """Fills each output window with the values of its input's top-left pixel.

    Fed an image whose channels hold the row and column index of each pixel, every output
    window is constant: channel 0 = the window's first row, channel 1 = its first column. The
    blended result is then the (weighted) mean of the starts of the windows covering a pixel,
    which the tests write out by hand.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :3, :1, :1].expand(-1, -1, x.shape[2], x.shape[3]).clone()


class RecordingModel(nn.Module):
    """Identity on the first three channels that records every batch it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[tuple[int, ...]] = []
        self.autocast_dtypes: list[torch.dtype | None] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(tuple(x.shape))
        enabled = torch.is_autocast_enabled(x.device.type)
        self.autocast_dtypes.append(torch.get_autocast_dtype(x.device.type) if enabled else None)
        return x[:, :3].clone()


def coordinate_image(height: int, width: int) -> torch.Tensor:
    rows = torch.arange(height, dtype=torch.float32)[:, None].expand(height, width)
    cols = torch.arange(width, dtype=torch.float32)[None, :].expand(height, width)
    return torch.stack([rows, cols, rows * 100 + cols])[None]


# ---------------------------------------------------------------------------------------------
# Window placement


@pytest.mark.parametrize(
    ("length", "tile", "stride", "expected"),
    [
        (100, 256, 192, [0]),  # smaller than a window: one (padded) window
        (256, 256, 192, [0]),  # exactly one window
        (600, 256, 192, [0, 192, 344]),  # last window flush with the border
        (512, 256, 256, [0, 256]),  # a multiple of the stride: no extra window
        (10, 4, 3, [0, 3, 6]),
        (10, 5, 3, [0, 3, 5]),
    ],
)
def test_window_starts(length: int, tile: int, stride: int, expected: list[int]) -> None:
    assert window_starts(length, tile, stride) == expected


@pytest.mark.parametrize("length", [257, 300, 511, 777, 1000])
@pytest.mark.parametrize("stride", [100, 192, 220, 256])
def test_windows_are_full_cover_every_pixel_and_keep_the_stride(length: int, stride: int) -> None:
    tile = 256
    starts = window_starts(length, tile, stride)
    covered = np.zeros(length, dtype=int)
    for start in starts:
        assert 0 <= start and start + tile <= length  # never padding
        covered[start : start + tile] += 1
    assert covered.min() >= 1
    assert starts[-1] == length - tile
    assert all(b - a <= stride for a, b in zip(starts, starts[1:]))


def test_feather_weights_ramp_over_the_overlap() -> None:
    np.testing.assert_allclose(feather_weights(5, 3), [1 / 3, 2 / 3, 1, 2 / 3, 1 / 3])
    np.testing.assert_allclose(feather_weights(4, 4), [1, 1, 1, 1])  # no overlap: plain average


# ---------------------------------------------------------------------------------------------
# Identity model: no seams, no missed border pixel


@pytest.mark.parametrize(
    ("height", "width"),
    [
        (5, 7),  # much smaller than a window (reflection repeats)
        (23, 40),  # smaller in one axis only
        (32, 32),  # exactly one window
        (33, 67),  # odd sizes
        (97, 121),  # not multiples of the stride
        (1, 90),  # a single row
    ],
)
@pytest.mark.parametrize("blend", ["average", "feather"])
def test_identity_model_returns_the_input_exactly(height: int, width: int, blend: str) -> None:
    generator = torch.Generator().manual_seed(height * 1000 + width)
    image = torch.rand(1, 6, height, width, generator=generator)
    inferencer = SlidingWindowInferencer(
        FirstThreeChannels(), tile=32, stride=12, batch_size=5, blend=blend, progress=False
    )
    output = inferencer(image)
    assert output.dtype == torch.float32 and output.shape == (1, 3, height, width)
    assert torch.equal(output, image[:, :3])


@pytest.mark.parametrize(("height", "width"), [(100, 130), (300, 451), (257, 513)])
def test_identity_model_at_the_training_size_on_numpy_input(height: int, width: int) -> None:
    rng = np.random.default_rng(height + width)
    image = rng.random((height, width, 3), dtype=np.float32)
    inferencer = SlidingWindowInferencer(FirstThreeChannels(), tile=256, stride=220, batch_size=3, progress=False)
    output = inferencer(image)
    assert isinstance(output, np.ndarray) and output.dtype == np.float32
    np.testing.assert_array_equal(output, image)


# ---------------------------------------------------------------------------------------------
# Overlap blending equals the computation by hand


def test_overlap_average_equals_hand_computation() -> None:
    # Height 10, tile 5, stride 3: row windows start at 0, 3, 5; width 8: column windows at 0, 3.
    image = coordinate_image(10, 8)
    inferencer = SlidingWindowInferencer(WindowCornerConstant(), tile=5, stride=3, batch_size=4, progress=False)
    output = inferencer(image)[0]
    # Row y is covered by the windows starting at: y0-2: {0}; y3,4: {0,3}; y5-7: {3,5}; y8,9: {5}.
    expected_rows = torch.tensor([0, 0, 0, 1.5, 1.5, 4, 4, 4, 5, 5])
    # Column x: x0-2: {0}; x3,4: {0,3}; x5-7: {3}.
    expected_cols = torch.tensor([0, 0, 0, 1.5, 1.5, 3, 3, 3])
    torch.testing.assert_close(output[0], expected_rows[:, None].expand(10, 8), rtol=0, atol=1e-6)
    torch.testing.assert_close(output[1], expected_cols[None, :].expand(10, 8), rtol=0, atol=1e-6)
    torch.testing.assert_close(
        output[2], expected_rows[:, None] * 100 + expected_cols[None, :], rtol=0, atol=1e-4
    )


def test_feathered_blend_equals_hand_computation() -> None:
    # Tile 5, stride 3: window weights w = [1/3, 2/3, 1, 2/3, 1/3] by offset inside the window.
    image = coordinate_image(10, 5)
    inferencer = SlidingWindowInferencer(
        WindowCornerConstant(), tile=5, stride=3, batch_size=2, blend="feather", progress=False
    )
    output = inferencer(image)[0]
    # y3: (0·2/3 + 3·1/3) / 1 = 1;   y4: (0·1/3 + 3·2/3) / 1 = 2;   y5: (3·1 + 5·1/3) / (4/3) = 3.5
    # y6: (3·2/3 + 5·2/3) / (4/3) = 4;   y7: (3·1/3 + 5·1) / (4/3) = 4.5;   y8, y9: window 5 only.
    expected_rows = torch.tensor([0, 0, 0, 1, 2, 3.5, 4, 4.5, 5, 5])
    torch.testing.assert_close(output[0], expected_rows[:, None].expand(10, 5), rtol=0, atol=1e-6)
    torch.testing.assert_close(output[1], torch.zeros(10, 5))  # one column window


# ---------------------------------------------------------------------------------------------
# The prior is cut in exactly the same windows


class PriorAlignmentCheck(nn.Module):
    """Returns |blurry + prior − 1|: zero everywhere if and only if the prior window matches."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, :3] + x[:, 3:6] - 1).abs()


def test_prior_channels_are_cut_in_the_same_windows() -> None:
    generator = torch.Generator().manual_seed(0)
    blurry = torch.rand(1, 3, 71, 93, generator=generator)
    image = torch.cat([blurry, 1 - blurry], dim=1)  # prior = 1 − blurry, pixel by pixel
    output = SlidingWindowInferencer(PriorAlignmentCheck(), tile=32, stride=20, progress=False)(image)
    assert output.abs().max() < 1e-6
    # The check can fail: shift the prior by one pixel and it no longer cancels.
    shifted = torch.cat([blurry, torch.roll(1 - blurry, 1, dims=3)], dim=1)
    assert SlidingWindowInferencer(PriorAlignmentCheck(), tile=32, stride=20, progress=False)(shifted).abs().max() > 0.1


def test_prior_channels_reach_the_model_with_the_image() -> None:
    class ReturnPrior(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, 3:6].clone()

    image = torch.rand(1, 6, 50, 77, generator=torch.Generator().manual_seed(1))
    output = SlidingWindowInferencer(ReturnPrior(), tile=32, stride=24, progress=False)(image)
    assert torch.equal(output, image[:, 3:6])


# ---------------------------------------------------------------------------------------------
# The real network


@pytest.fixture(scope="module")
def tiny_model() -> Swintormer:
    torch.manual_seed(0)
    return Swintormer(SwintormerConfig.preset("tiny", in_channels=6)).eval()


def test_one_window_image_equals_a_direct_forward(tiny_model: Swintormer) -> None:
    image = torch.rand(1, 6, 128, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        direct = tiny_model(image)
    for blend in ("average", "feather"):
        tiled = SlidingWindowInferencer(tiny_model, tile=128, stride=96, blend=blend, progress=False)(image)
        torch.testing.assert_close(tiled, direct, rtol=0, atol=1e-6)


def test_image_smaller_than_a_window_equals_the_padded_forward_cropped(tiny_model: Swintormer) -> None:
    image = torch.rand(1, 6, 40, 100, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        direct = tiny_model(reflect_pad(image, 128 - 40, 128 - 100))[:, :, :40, :100]
    tiled = SlidingWindowInferencer(tiny_model, tile=128, progress=False)(image)
    torch.testing.assert_close(tiled, direct, rtol=0, atol=1e-6)


def test_multi_window_output_is_the_mean_of_the_window_forwards(tiny_model: Swintormer) -> None:
    # Two overlapping windows along the width (starts 0 and 32): the overlap is their mean.
    image = torch.rand(1, 6, 128, 160, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        left = tiny_model(image[..., :128])
        right = tiny_model(image[..., 32:])
    expected = torch.cat([left[..., :32], (left[..., 32:] + right[..., :96]) / 2, right[..., 96:]], dim=3)
    tiled = SlidingWindowInferencer(tiny_model, tile=128, stride=96, batch_size=1, progress=False)(image)
    torch.testing.assert_close(tiled, expected, rtol=0, atol=1e-5)


def test_whole_image_inferencer_is_one_forward_of_the_whole_image(tiny_model: Swintormer) -> None:
    # 70×150 is not a multiple of the tiny preset's 128: the model pads and crops back itself.
    image = torch.rand(1, 6, 70, 150, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        direct = tiny_model(image)
    whole = WholeImageInferencer(tiny_model)
    torch.testing.assert_close(whole(image), direct, rtol=0, atol=0)
    as_array = whole(image[0].permute(1, 2, 0).numpy())
    assert as_array.shape == (70, 150, 3) and as_array.dtype == np.float32
    np.testing.assert_allclose(as_array, direct[0].permute(1, 2, 0).numpy(), rtol=0, atol=0)
    # Different from the windowed result: windows see only part of the image.
    tiled = SlidingWindowInferencer(tiny_model, tile=128, stride=96, progress=False)(image)
    assert (tiled - direct).abs().max() > 1e-3
    with pytest.raises(ValueError, match="1×C×H×W"):
        whole(image[0])


# ---------------------------------------------------------------------------------------------
# Batching, precision, arguments


def test_windows_run_in_batches_of_the_requested_size() -> None:
    model = RecordingModel()
    image = torch.rand(1, 3, 70, 100)
    inferencer = SlidingWindowInferencer(model, tile=32, stride=32, batch_size=4, progress=False)
    assert len(inferencer.window_grid(70, 100)) == 3 * 4
    inferencer(image)
    assert model.batches == [(4, 3, 32, 32)] * 3
    model.batches.clear()
    SlidingWindowInferencer(model, tile=32, stride=32, batch_size=5, progress=False)(image)
    assert model.batches == [(5, 3, 32, 32), (5, 3, 32, 32), (2, 3, 32, 32)]


def test_bf16_precision_runs_the_model_under_autocast() -> None:
    model = RecordingModel()
    image = torch.rand(1, 3, 40, 40)
    SlidingWindowInferencer(model, tile=32, precision="bf16", progress=False)(image)
    assert model.autocast_dtypes and set(model.autocast_dtypes) == {torch.bfloat16}
    model.autocast_dtypes.clear()
    SlidingWindowInferencer(model, tile=32, precision="fp32", progress=False)(image)
    assert set(model.autocast_dtypes) == {None}


def test_bf16_output_of_the_real_network_stays_close_to_fp32(tiny_model: Swintormer) -> None:
    image = torch.rand(1, 6, 128, 128, generator=torch.Generator().manual_seed(5))
    fp32 = SlidingWindowInferencer(tiny_model, tile=128, progress=False)(image)
    bf16 = SlidingWindowInferencer(tiny_model, tile=128, precision="bf16", progress=False)(image)
    assert bf16.dtype == torch.float32
    difference = (bf16 - fp32).abs()
    assert 0 < difference.max() < 0.05  # differs (bf16 ran) but only by rounding


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tile": 32, "stride": 33}, "stride"),
        ({"tile": 32, "stride": 0}, "stride"),
        ({"tile": 0}, "tile"),
        ({"batch_size": 0}, "batch_size"),
        ({"blend": "gaussian"}, "blend"),
        ({"precision": "fp16"}, "precision"),
    ],
)
def test_bad_arguments_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SlidingWindowInferencer(FirstThreeChannels(), **kwargs)


def test_bad_inputs_are_rejected() -> None:
    inferencer = SlidingWindowInferencer(FirstThreeChannels(), tile=32, progress=False)
    with pytest.raises(ValueError, match="1×C×H×W"):
        inferencer(torch.rand(2, 3, 40, 40))
    with pytest.raises(ValueError, match="H×W×C"):
        inferencer(np.zeros((40, 40), dtype=np.float32))
    with pytest.raises(ValueError, match="float"):
        inferencer(np.zeros((40, 40, 3), dtype=np.uint8))


def test_overlapped_transfers_queue_the_next_batch_before_blending_and_give_the_same_result(monkeypatch) -> None:
    """The CUDA path's order, run on the CPU: batch k + 1 is launched before batch k is collected."""
    import swintormer.inference as inference

    events: list[str] = []

    def launch(model, batch, device, precision):
        events.append(f"launch {len(events)}")
        return model(batch).to(torch.float32), None

    def collect(host, done):
        events.append("collect")
        return host.to(torch.float64)

    monkeypatch.setattr(inference, "_launch_forward", launch)
    monkeypatch.setattr(inference, "_collect_output", collect)
    image = coordinate_image(70, 100)
    plain = SlidingWindowInferencer(WindowCornerConstant(), tile=32, stride=24, batch_size=4, progress=False)
    overlapped = SlidingWindowInferencer(WindowCornerConstant(), tile=32, stride=24, batch_size=4, progress=False)
    overlapped.overlap_transfers = True
    assert not plain.overlap_transfers  # only CUDA overlaps
    torch.testing.assert_close(overlapped(image), plain(image), rtol=0, atol=0)
    kinds = [event.split()[0] for event in events]
    assert kinds[:3] == ["launch", "launch", "collect"] and kinds.count("launch") == kinds.count("collect")
