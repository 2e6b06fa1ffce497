"""Small layers shared by every Swintormer block family."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def pointwise(conv: nn.Conv2d, tokens: torch.Tensor) -> torch.Tensor:
    """A 1×1 convolution applied to an …×C token tensor (channels last) as one matrix product.

    Same maths as ``conv`` on the N×C×H×W view; as a GEMM over the channel axis it avoids
    PyTorch's slow CPU path for 1×1 convolutions and needs no layout change. Keeping the layer an
    ``nn.Conv2d`` keeps the authors' parameter shapes, so their checkpoints load unchanged.
    """
    return F.linear(tokens, conv.weight.flatten(1), conv.bias)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of an N×C×H×W map (with bias; the authors' ``norm.body``).

    On channels-last memory the permuted view is contiguous, so this costs no copy.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.body = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
