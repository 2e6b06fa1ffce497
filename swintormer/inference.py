"""Sliding-window inference at the training size (the Swintormer paper, "Efficient Image Deblurring
Networks based on Diffusion Models", section on overlapping-patch inference).

The paper runs Swintormer on overlapping windows of the size it was trained on (256, or 512 with
stride 220 for its best figure) and averages the overlaps, instead of feeding the whole image at
once. :class:`SlidingWindowInferencer` does that for any image size in bounded memory:

* **Window placement.** Along each axis windows start at ``0, stride, 2·stride, ...`` and one last
  window sits flush with the far border, so every pixel is covered by a full-size window and the
  network never sees padding. Only an axis shorter than a window is reflect-padded (at its far
  end) up to the window size; the padded part of the output is cropped away.
* **Priors.** The prior is simply the extra channels of the input (blurry RGB then prior RGB for
  a 6-channel model), so it is cut in exactly the same windows as the image.
* **Blending.** ``blend="average"`` (the paper) gives every window pixel weight 1, so each output
  pixel is the mean of the windows covering it. ``blend="feather"`` weights a window pixel by
  ``w(i)·w(j)`` with ``w(i) = min(1, (d(i) + 1) / (tile − stride + 1))``, ``d(i)`` being the
  distance (in pixels) of row/column ``i`` to the nearest window edge: a linear cross-fade over the
  overlap width that is always positive, so pixels seen by a single window keep their value.
  Because the windows form a grid (every row position combined with every column position), the
  total weight is the outer product of two 1-D sums; no weight image is stored.
* **Memory.** Windows are cut, run and accumulated ``batch_size`` at a time, so the working
  memory beyond the input, the accumulator and the output grows with the window batch, not with
  the image. The full-size buffers always live on the CPU and only window batches are moved to the
  model's device: on a GPU, device memory is bounded by the window batch whatever the image size.
  The accumulator is float64 (8 bytes per output value, the only full-size buffer besides the
  input and the float32 output) so that averaging several identical window outputs returns them
  bit-exactly: a model that returns its input gives back the input exactly, with no seams.
* **CUDA transfers.** On a CUDA device each window batch is cut into pinned (page-locked) host
  memory and copied to the device without blocking, and its output comes back the same way into
  pinned memory behind a CUDA event; the next batch is started before the previous output is
  blended, so the GPU computes batch ``k + 1`` while the CPU blends batch ``k``. PyTorch's pinned
  memory allocator keeps a block from reuse until the copies that use it have finished. Same
  values as the blocking path; other devices and the CPU take the plain path.
* **Precision.** ``precision="bf16"`` runs the model under ``torch.autocast`` in bfloat16 on its
  device; outputs are accumulated in float64 either way.

:class:`WholeImageInferencer` is the comparison point of the paper's inference ablation: the
whole image in one forward pass (the model pads it to its size multiple and crops back). Its
memory grows with the image.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Literal, overload

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from swintormer.core.padding import reflect_pad
from swintormer.core.tiling import OverlapAccumulator, feather_weights, uniform_weights, window_grid, window_starts

BlendMode = Literal["average", "feather"]
Precision = Literal["fp32", "bf16"]
BLEND_MODES: tuple[str, ...] = ("average", "feather")
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")

class _Inferencer:
    """What both inferencers share: the precision and device set-up, and a call that takes a
    float ``H×W×C`` array or ``1×C×H×W`` CPU tensor and answers in the same form, float32.
    Subclasses implement :meth:`_restore` on the C×H×W view."""

    def __init__(self, model: nn.Module, precision: Precision = "fp32", device: torch.device | str | None = None) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
        self.model = model.eval()
        self.precision = precision
        self.device = torch.device(device) if device is not None else _model_device(model)

    @overload
    def __call__(self, image: torch.Tensor) -> torch.Tensor: ...

    @overload
    def __call__(self, image: np.ndarray) -> np.ndarray: ...

    def __call__(self, image: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        chw, from_array = _image_as_chw(image, self.device)
        output = self._restore(chw, channels_last=from_array)
        return output if from_array else output.unsqueeze(0)

    def _restore(self, image: torch.Tensor, channels_last: bool) -> torch.Tensor | np.ndarray:
        """The model's output for a C×H×W image: a float32 ``H×W×C_out`` array if
        ``channels_last``, else a float32 ``C_out×H×W`` tensor."""
        raise NotImplementedError


class SlidingWindowInferencer(_Inferencer):
    """Runs a model on overlapping ``tile``×``tile`` windows of an image and blends the outputs.

    ``model`` maps ``N×C×tile×tile`` to ``N×C_out×tile×tile`` (a Swintormer: C = 6 with prior,
    3 without, C_out = 3). The model is switched to eval mode; it runs under
    ``torch.inference_mode`` on its own device (the device of its first parameter, or ``device``
    when given, or the CPU for a model without parameters).

    Call it with a CPU ``torch.Tensor`` of shape ``1×C×H×W`` (returns a float32 ``1×C_out×H×W``
    CPU tensor) or a ``numpy`` array ``H×W×C`` (returns a float32 ``H×W×C_out`` array). Values
    are expected in [0, 1]; they are passed to the model in float32. ``overlap_transfers``
    (True on CUDA) selects the pinned, non-blocking transfers of the module docstring.
    """

    def __init__(
        self,
        model: nn.Module,
        tile: int = 256,
        stride: int | None = None,
        batch_size: int = 4,
        blend: BlendMode = "average",
        precision: Precision = "fp32",
        device: torch.device | str | None = None,
        progress: bool = True,
        progress_description: str = "windows",
    ) -> None:
        if tile < 1:
            raise ValueError(f"tile must be a positive number of pixels, got {tile}")
        stride = default_stride(tile) if stride is None else stride
        if not 1 <= stride <= tile:
            # A stride above the tile would leave uncovered gaps between windows.
            raise ValueError(f"stride must be between 1 and the tile size {tile}, got {stride}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if blend not in BLEND_MODES:
            raise ValueError(f"blend must be one of {', '.join(BLEND_MODES)}; got {blend!r}")
        super().__init__(model, precision, device)
        self.tile = tile
        self.stride = stride
        self.batch_size = batch_size
        self.blend = blend
        self.progress = progress
        self.progress_description = progress_description
        # Overlap transfers and compute (pinned memory, non-blocking copies): CUDA only.
        self.overlap_transfers = self.device.type == "cuda"
        self._window_weight_1d = feather_weights(tile, stride) if blend == "feather" else uniform_weights(tile)

    def window_grid(self, height: int, width: int) -> list[tuple[int, int]]:
        """The ``(top, left)`` corner of every window for an image of ``height``×``width``."""
        return window_grid(height, width, self.tile, self.tile, self.stride)

    def _restore(self, image: torch.Tensor, channels_last: bool) -> torch.Tensor | np.ndarray:
        return self._accumulate(image).result(channels_last=channels_last)

    def _batches(self, image: torch.Tensor) -> Iterator[tuple[list[tuple[int, int]], torch.Tensor]]:
        """Window corners and the matching ``N×C×tile×tile`` float32 batch, ``batch_size`` at a
        time; in pinned host memory when the model runs on CUDA."""
        channels, height, width = image.shape
        tile = self.tile
        pad_bottom, pad_right = max(0, tile - height), max(0, tile - width)
        grid = self.window_grid(height, width)
        pinned = self.overlap_transfers and self.device.type == "cuda"
        for first in range(0, len(grid), self.batch_size):
            corners = grid[first : first + self.batch_size]
            windows = [image[:, top : top + tile, left : left + tile] for top, left in corners]
            if pad_bottom or pad_right:
                # Only an image smaller than a window along some axis gets here.
                windows = [reflect_pad(window, pad_bottom, pad_right) for window in windows]
            if pinned:
                batch = torch.empty((len(windows), channels, tile, tile), dtype=torch.float32, pin_memory=True)
                for index, window in enumerate(windows):
                    batch[index].copy_(window)
                yield corners, batch
            else:
                yield corners, torch.stack(windows).to(torch.float32)

    def _run_model(self, batch: torch.Tensor) -> torch.Tensor:
        return self._checked(batch, _forward(self.model, batch, self.device, self.precision))

    def _checked(self, batch: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        if output.ndim != 4 or output.shape[0] != batch.shape[0] or output.shape[2:] != batch.shape[2:]:
            raise ValueError(
                f"the model turned a window batch of shape {tuple(batch.shape)} into "
                f"{tuple(output.shape)}; expected N×C_out×{self.tile}×{self.tile}"
            )
        return output

    def _accumulate(self, image: torch.Tensor) -> OverlapAccumulator:
        """All window outputs blended into a float64 CPU accumulator."""
        _, height, width = image.shape
        accumulator = OverlapAccumulator(height, width, window_starts(height, self.tile, self.stride),
                                         window_starts(width, self.tile, self.stride),
                                         self._window_weight_1d, self._window_weight_1d)
        valid_rows, valid_cols = min(height, self.tile), min(width, self.tile)
        total = len(self.window_grid(height, width))
        with tqdm(
            total=total, desc=self.progress_description, unit="win", disable=not self.progress, leave=False
        ) as bar:
            def blend(corners: list[tuple[int, int]], outputs: torch.Tensor) -> None:
                for (top, left), output in zip(corners, outputs[:, :, :valid_rows, :valid_cols]):
                    accumulator.add(top, left, output)
                bar.update(len(corners))

            if not self.overlap_transfers:
                for corners, batch in self._batches(image):
                    blend(corners, self._run_model(batch))
                return accumulator
            # CUDA: batch k + 1 is queued on the device before batch k's output is blended.
            pending = None
            for corners, batch in self._batches(image):
                launched = (corners, batch, _launch_forward(self.model, batch, self.device, self.precision))
                if pending is not None:
                    blend(pending[0], self._checked(pending[1], _collect_output(*pending[2])))
                pending = launched
            if pending is not None:
                blend(pending[0], self._checked(pending[1], _collect_output(*pending[2])))
        return accumulator


class WholeImageInferencer(_Inferencer):
    """Runs a model on the whole image at once; same call interface as :class:`SlidingWindowInferencer`.

    The model sees the image padded only to its own size multiple (a Swintormer reflect-pads and
    crops back), so there are no window seams, but memory grows with the image.
    """

    def _restore(self, image: torch.Tensor, channels_last: bool) -> torch.Tensor | np.ndarray:
        output = _forward(self.model, image.unsqueeze(0).to(torch.float32), self.device, self.precision)[0]
        output = output.to(torch.float32)
        return output.permute(1, 2, 0).numpy() if channels_last else output


def _image_as_chw(image: torch.Tensor | np.ndarray, device: torch.device) -> tuple[torch.Tensor, bool]:
    """Check an inferencer's input and view it as a C×H×W CPU tensor (no copy where possible).

    Accepts a float ``H×W×C`` numpy array or a float ``1×C×H×W`` CPU tensor; returns the view and
    whether the input was an array (the output then goes back as an ``H×W×C`` array).
    """
    if isinstance(image, np.ndarray):
        if image.ndim != 3:
            raise ValueError(f"expected an H×W×C array, got shape {image.shape}")
        if not np.issubdtype(image.dtype, np.floating):
            raise ValueError(f"expected a float array with values in [0, 1], got dtype {image.dtype}")
        if any(step < 0 for step in image.strides):
            image = np.ascontiguousarray(image)  # torch cannot view negative strides
        with warnings.catch_warnings():
            # A read-only array is fine: it is only read.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            # A channels-last view, not a copy: windows are made contiguous one at a time.
            return torch.from_numpy(image).permute(2, 0, 1), True
    if isinstance(image, torch.Tensor):
        if image.ndim != 4 or image.shape[0] != 1:
            raise ValueError(f"expected a 1×C×H×W tensor, got shape {tuple(image.shape)}")
        if not image.is_floating_point():
            raise ValueError(f"expected a float tensor with values in [0, 1], got dtype {image.dtype}")
        if image.device.type != "cpu":
            raise ValueError(
                "the image must be a CPU tensor (full-size buffers stay on the CPU; "
                f"windows are moved to {device}); got one on {image.device}"
            )
        return image[0], False
    raise TypeError(f"expected a torch.Tensor or numpy.ndarray, got {type(image).__name__}")


def _forward(model: nn.Module, batch: torch.Tensor, device: torch.device, precision: str) -> torch.Tensor:
    """One inference forward on ``device`` (bf16 autocast if asked); the result as a float64 CPU tensor."""
    batch = batch.to(device, non_blocking=True)
    with torch.inference_mode():
        if precision == "bf16":
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                output = model(batch)
        else:
            output = model(batch)
    return output.to("cpu", torch.float64)


def _launch_forward(model: nn.Module, batch: torch.Tensor, device: torch.device,
                    precision: str) -> tuple[torch.Tensor, torch.cuda.Event]:
    """Queue one forward on a CUDA ``device`` without waiting: the pinned ``batch`` goes up
    without blocking, and the output comes back into pinned host memory behind the returned
    event (:func:`_collect_output` waits for it)."""
    with torch.inference_mode():
        batch = batch.to(device, non_blocking=True)
        if precision == "bf16":
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                output = model(batch)
        else:
            output = model(batch)
        host = torch.empty(output.shape, dtype=output.dtype, pin_memory=True)
        host.copy_(output, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(device))
    return host, done


def _collect_output(host: torch.Tensor, done: torch.cuda.Event) -> torch.Tensor:
    """The output of :func:`_launch_forward` once its copy has arrived, as float64."""
    done.synchronize()
    return host.to(torch.float64)


def default_stride(tile: int) -> int:
    """The stride used when none is given: windows overlap by a quarter of their size."""
    return max(1, tile - tile // 4)


def _model_device(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")
