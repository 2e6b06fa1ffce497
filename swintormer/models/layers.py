"""Small layers shared by every Swintormer block family."""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

# oneDNN's linear with a weight packed once ahead of time, one of the ops PyTorch's inductor
# emits for the linears of frozen CPU graphs. Not part of every build (it needs oneDNN), hence
# the probe.
_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and all(
    hasattr(torch.ops.mkldnn, name) for name in ("_linear_pointwise", "_reorder_linear_weight")
)
# conv → (weight, its version and address when packed, packed weight). Weak keys: a packed
# copy lives only as long as its layer, and nothing joins the module's own state (state_dict,
# deepcopy). The weight itself is held by a weak reference, so a replaced Parameter repacks.
_packed_weights: "weakref.WeakKeyDictionary[nn.Conv2d, tuple[weakref.ref, tuple[int, int], torch.Tensor]]" = (
    weakref.WeakKeyDictionary()
)


def autocast_enabled(device: torch.device) -> bool:
    """Whether autocast is on for this device type (never, for types without autocast: meta)."""
    try:
        return torch.is_autocast_enabled(device.type)
    except RuntimeError:
        return False


def cpu_inference(x: torch.Tensor) -> bool:
    """Whether ``x`` is being run through the network on CPU for inference: no gradients, no
    autocast. The CPU-only fast paths (cache-blocked blocks, packed weights) key on this."""
    return x.device.type == "cpu" and not torch.is_grad_enabled() and not autocast_enabled(x.device)


def uses_packed_weights(tokens: torch.Tensor) -> bool:
    """Whether :func:`pointwise` runs on oneDNN with a packed weight for this input: fp32 CPU
    inference on a build that has the op."""
    return _ONEDNN_LINEAR and tokens.dtype == torch.float32 and cpu_inference(tokens)


def _packed_weight(conv: nn.Conv2d) -> torch.Tensor:
    """``conv``'s weight packed for oneDNN, packed again whenever the weight changes: another
    Parameter, an in-place update (a new version: optimiser steps, ``load_state_dict``, EMA
    copies) or new storage (``.to()``)."""
    weight = conv.weight
    state = (weight._version, weight.data_ptr())
    entry = _packed_weights.get(conv)
    if entry is None or entry[0]() is not weight or entry[1] != state:
        entry = (weakref.ref(weight), state, torch.ops.mkldnn._reorder_linear_weight(weight.detach().flatten(1), None))
        _packed_weights[conv] = entry
    return entry[2]


def pointwise(conv: nn.Conv2d, tokens: torch.Tensor) -> torch.Tensor:
    """A 1×1 convolution applied to an …×C token tensor (channels last) as one matrix product.

    Same maths as ``conv`` on the N×C×H×W view; as a GEMM over the channel axis it avoids
    PyTorch's slow CPU path for 1×1 convolutions and needs no layout change. Keeping the layer an
    ``nn.Conv2d`` keeps the authors' parameter shapes, so their checkpoints load unchanged.

    In fp32 CPU inference the product runs on oneDNN with a weight packed once per layer. On
    this project's AMD EPYC CPU that ran the network's GEMMs (inner dimension 48 to 510, blocks
    of about 2000 rows) at 154–222 GFLOP/s against MKL's 157–200 for ``F.linear``, and the
    ``paper`` forward about 10% faster, with the same results to float rounding
    (docs/measurements_2026-11-21.md, fifth session).
    """
    if uses_packed_weights(tokens):
        flat = tokens.reshape(-1, tokens.shape[-1])
        out = torch.ops.mkldnn._linear_pointwise(flat, _packed_weight(conv), conv.bias, "none", [], "")
        return out.view(*tokens.shape[:-1], out.shape[-1])
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
