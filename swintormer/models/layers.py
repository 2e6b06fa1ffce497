"""Small layers shared by every Swintormer block family."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable

import torch
import torch.nn.functional as F
from torch import nn

# oneDNN's linear and convolution with a weight packed once ahead of time, the ops PyTorch's
# inductor emits for the linears and convolutions of frozen CPU graphs. Not part of every build
# (they need oneDNN), hence the probe.
_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and all(
    hasattr(torch.ops.mkldnn, name) for name in ("_linear_pointwise", "_reorder_linear_weight")
)
_ONEDNN_CONV = (
    torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
    and hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight")
)
# layer → {packing key: (weight, its version and address when packed, packed weight)}. Weak
# keys: a packed copy lives only as long as its layer, and nothing joins the module's own state
# (state_dict, deepcopy). The weight itself is held by a weak reference, so a replaced
# Parameter repacks.
_packed_weights: "weakref.WeakKeyDictionary[nn.Module, dict[Hashable, tuple[weakref.ref, tuple[int, int], torch.Tensor]]]" = (
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


def tensor_state(tensor: torch.Tensor) -> tuple[int, int] | None:
    """(version, address): changes whenever ``tensor``'s values may have changed, by an in-place
    update (a new version: optimiser steps, ``load_state_dict``, EMA copies) or new storage
    (``.to()``). None for an inference tensor (made under ``torch.inference_mode``, a model
    built there): its in-place updates are not counted, so nothing derived from it may be kept."""
    return None if tensor.is_inference() else (tensor._version, tensor.data_ptr())


def packed_weight(layer: nn.Module, key: Hashable, pack: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``pack(layer.weight)``, kept per layer and ``key`` and packed again whenever the weight
    changes: another Parameter, or a new :func:`tensor_state`."""
    weight = layer.weight
    state = tensor_state(weight)
    if state is None:
        return pack(weight.detach())
    entries = _packed_weights.setdefault(layer, {})
    entry = entries.get(key)
    if entry is None or entry[0]() is not weight or entry[1] != state:
        if len(entries) > 8:  # a convolution packed for many input sizes: keep memory bounded
            entries.clear()
        entry = entries[key] = (weakref.ref(weight), state, pack(weight.detach()))
    return entry[2]


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """A 1×1 conv's (or linear's) weight, out×in, reordered for oneDNN's linear."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.flatten(1), None)


def onednn_linear(tokens: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``tokens @ W.T + bias`` for an …×C token tensor, ``weight`` packed by :func:`pack_linear_weight`."""
    flat = tokens.reshape(-1, tokens.shape[-1])
    out = torch.ops.mkldnn._linear_pointwise(flat, weight, bias, "none", [], "")
    return out.view(*tokens.shape[:-1], out.shape[-1])


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
        return onednn_linear(tokens, packed_weight(conv, "linear", pack_linear_weight), conv.bias)
    return F.linear(tokens, conv.weight.flatten(1), conv.bias)


class PackedConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, same results) whose fp32 CPU inference on channels-last
    input (the network's layout) runs on oneDNN with a weight packed once per input size.

    PyTorch's own path reorders the weight on every call (for channels-last input it first
    copies it to channels-last): 10.6 MB for the ``paper`` preset's 384→768 upsampling conv,
    which with the packed weight took 6.1 against 11.7 ms, with identical results
    (docs/measurements_2026-11-21.md, ninth session).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packable = _ONEDNN_CONV and self.padding_mode == "zeros" and not isinstance(self.padding, str)
        if not (packable and uses_packed_weights(x) and x.is_contiguous(memory_format=torch.channels_last)):
            return super().forward(x)
        size = tuple(x.shape)
        padding, stride, dilation = list(self.padding), list(self.stride), list(self.dilation)

        def pack(weight: torch.Tensor) -> torch.Tensor:
            return torch._C._nn.mkldnn_reorder_conv2d_weight(
                weight.to_mkldnn(), padding, stride, dilation, self.groups, list(size)
            )

        weight = packed_weight(self, ("conv", size), pack)
        return torch.ops.mkldnn._convolution_pointwise(
            x, weight, self.bias, padding, stride, dilation, self.groups, "none", [], ""
        )


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of an N×C×H×W map (with bias; the authors' ``norm.body``).

    On channels-last memory the permuted view is contiguous, so this costs no copy.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.body = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
