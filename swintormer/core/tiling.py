"""Overlapping tiles: where windows go, how they are weighted, and how their outputs are blended.

Both stages run networks on windows of a large input and blend the overlaps: stage two's
sliding-window inferencer (``swintormer.inference``, windows of the image, outputs at the same
scale) and stage one's tiled latent decoding and denoising (``ldm_prior.sampling``, where a
latent window decodes to an image window ``scale`` times larger). Both use this module.

* **Placement** (:func:`window_starts`): along each axis windows start at ``0, stride,
  2·stride, …`` while one fits, then one last window sits flush with the far border, so every
  pixel is covered by a full-size window and nothing is padded unless the axis is shorter than a
  window.
* **Weights** are separable: a window pixel ``(i, j)`` has weight ``w_r(i)·w_c(j)``. Because the
  windows form a grid (every row start with every column start), the total weight at a pixel is
  the outer product of two 1-D sums, so no weight image is stored (:class:`OverlapAccumulator`).
  :func:`uniform_weights` averages the overlapping outputs (the Swintormer paper's inference);
  :func:`feather_weights` cross-fades them linearly over the overlap; :func:`triangle_weights`
  ramps from each border to the centre.
"""

from __future__ import annotations

import numpy as np
import torch

# Rows normalised per step when the accumulated sum is turned into the output, so that the
# temporaries of the division stay small next to the image.
_FINALISE_ROWS = 64


def window_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of the windows along one axis of ``length`` pixels.

    ``0, stride, 2·stride, ...`` while a window fits, then one window flush with the far border;
    a single window at 0 when the axis is not longer than a window.
    """
    if tile < 1 or stride < 1:
        raise ValueError(f"tile and stride must be positive, got {tile} and {stride}")
    if length <= tile:
        return [0]
    last = length - tile
    starts = list(range(0, last, stride))
    starts.append(last)
    return starts


def window_grid(height: int, width: int, tile_h: int, tile_w: int, stride: int) -> list[tuple[int, int]]:
    """The ``(top, left)`` corner of every window, row by row."""
    rows = window_starts(height, tile_h, stride)
    cols = window_starts(width, tile_w, stride)
    return [(top, left) for top in rows for left in cols]


def uniform_weights(tile: int) -> torch.Tensor:
    """Weight 1 everywhere: each output pixel is the mean of the windows covering it."""
    return torch.ones(tile, dtype=torch.float64)


def feather_weights(tile: int, stride: int) -> torch.Tensor:
    """``w(i) = min(1, (d(i) + 1) / (tile − stride + 1))``, ``d(i)`` the distance of pixel ``i``
    to the nearest window edge: a linear cross-fade over the overlap width that is always
    positive, so pixels seen by a single window keep their value."""
    index = np.arange(tile)
    distance_to_edge = np.minimum(index, tile - 1 - index)
    ramp = tile - stride + 1
    return torch.from_numpy(np.minimum(1.0, (distance_to_edge + 1) / ramp))


def triangle_weights(length: int) -> torch.Tensor:
    """``min(i + 1, length − i)``: positive everywhere, highest in the window's centre."""
    index = torch.arange(length, dtype=torch.float64)
    return torch.minimum(index + 1, length - index)


class OverlapAccumulator:
    """The weighted sum of window outputs over an image, normalised by the total weight.

    ``rows`` and ``cols`` are the window starts along each axis (:func:`window_starts`, in input
    pixels); ``row_weight`` / ``col_weight`` the 1-D window weights at the output's scale,
    ``scale`` times the input window. :meth:`add` takes one window's ``C×h×w`` output (``h``,
    ``w`` at most the window's side at that scale: windows of an image smaller than a window are
    cropped to it). The sum is kept in ``dtype`` on ``device``: float64 on the CPU makes the
    average of identical window outputs return them bit for bit.
    """

    def __init__(
        self,
        height: int,
        width: int,
        rows: list[int],
        cols: list[int],
        row_weight: torch.Tensor,
        col_weight: torch.Tensor,
        scale: int = 1,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
    ) -> None:
        self.height, self.width, self.scale = height * scale, width * scale, scale
        self.rows, self.cols = rows, cols
        self.row_weight = row_weight.to(device, dtype)
        self.col_weight = col_weight.to(device, dtype)
        self.dtype, self.device = dtype, torch.device(device)
        self.sum: torch.Tensor | None = None  # allocated on the first window, which tells the channels

    def add(self, top: int, left: int, output: torch.Tensor) -> None:
        """Add one window's output (``C×h×w``), whose input window started at ``(top, left)``."""
        channels, rows, cols = output.shape
        if self.sum is None:
            self.sum = torch.zeros((channels, self.height, self.width), dtype=self.dtype, device=self.device)
        weight = torch.outer(self.row_weight[:rows], self.col_weight[:cols])
        top, left = top * self.scale, left * self.scale
        self.sum[:, top: top + rows, left: left + cols] += output.to(self.device, self.dtype) * weight

    def _axis_total(self, starts: list[int], weight: torch.Tensor, length: int) -> torch.Tensor:
        total = torch.zeros(length, dtype=self.dtype, device=self.device)
        valid = min(length, weight.shape[0])
        for start in starts:
            offset = start * self.scale
            total[offset: offset + valid] += weight[:valid]
        return total

    def result(self, channels_last: bool = False, dtype: torch.dtype = torch.float32) -> torch.Tensor | np.ndarray:
        """The blended image: a ``C×H×W`` tensor of ``dtype`` on the accumulator's device, or,
        with ``channels_last``, an ``H×W×C`` float32 numpy array (CPU accumulators only),
        normalised a few rows at a time."""
        if self.sum is None:
            raise ValueError("no window was added")
        row_total = self._axis_total(self.rows, self.row_weight, self.height)
        col_total = self._axis_total(self.cols, self.col_weight, self.width)
        channels = self.sum.shape[0]
        if channels_last:
            output: torch.Tensor | np.ndarray = np.empty((self.height, self.width, channels), dtype=np.float32)
        else:
            output = torch.empty((channels, self.height, self.width), dtype=dtype, device=self.device)
        for top in range(0, self.height, _FINALISE_ROWS):
            rows = slice(top, top + _FINALISE_ROWS)
            block = self.sum[:, rows] / torch.outer(row_total[rows], col_total)
            if channels_last:
                output[rows] = block.to(torch.float32).permute(1, 2, 0).numpy()
            else:
                output[:, rows] = block.to(dtype)
        return output
