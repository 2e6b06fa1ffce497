"""Reflect padding that works for any pad amount.

``torch.nn.functional.pad(mode="reflect")`` refuses a pad as large as the input (a 100-pixel
image cannot be padded to 256). The network and the sliding-window inferencer both need to pad
arbitrary sizes, so this module mirrors the image as many times as needed: the index sequence
``0, 1, …, n-1, n-2, …, 1, 0, 1, …`` continued to the requested length. Where ``F.pad`` can
reflect, the result is identical to it.
"""

from __future__ import annotations

import torch


def _mirror_indices(size: int, length: int, device: torch.device) -> torch.Tensor:
    """Indices ``0..length-1`` folded back into ``0..size-1`` by repeated mirroring."""
    if size == 1:
        return torch.zeros(length, dtype=torch.long, device=device)
    period = 2 * size - 2
    idx = torch.arange(length, device=device) % period
    return torch.where(idx < size, idx, period - idx)


def reflect_pad(x: torch.Tensor, pad_bottom: int, pad_right: int) -> torch.Tensor:
    """Pad the last two dimensions of ``x`` at the bottom and right by mirroring."""
    if pad_bottom < 0 or pad_right < 0:
        raise ValueError(f"padding must be non-negative, got bottom={pad_bottom}, right={pad_right}")
    height, width = x.shape[-2:]
    if pad_bottom < height and pad_right < width:
        if pad_bottom == 0 and pad_right == 0:
            return x
        return torch.nn.functional.pad(x, (0, pad_right, 0, pad_bottom), mode="reflect")
    rows = _mirror_indices(height, height + pad_bottom, x.device)
    cols = _mirror_indices(width, width + pad_right, x.device)
    return x.index_select(-2, rows).index_select(-1, cols)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Reflect-pad height and width of ``x`` (…×H×W) up to the next multiple of ``multiple``."""
    height, width = x.shape[-2:]
    return reflect_pad(x, -height % multiple, -width % multiple)
