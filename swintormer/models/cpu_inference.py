"""CPU inference engine for the Swintormer network: same parameters, same function, faster.

``prepare_for_inference(model)`` swaps the network's modules, in place, for subclasses that add
CPU-inference paths (the approach of NAFNet's ``Local_Base.convert`` or timm's fused attention:
the module tree, parameter names and ``state_dict`` stay those of
``swintormer.models.swintormer``, so checkpoints save and load unchanged). ``restore_reference``
undoes it. The swapped modules take their fast paths only for CPU tensors without autograd
(``torch.no_grad`` / ``torch.inference_mode``); under autograd, on CUDA or any other device they
run the reference code of ``swintormer.py``, so a converted model still trains and runs
anywhere, one batched operation per step.

What the engine does, each step computing the reference's sums (the equivalence is tested in
``tests/test_cpu_inference.py``):

- **Blocked blocks** (no autocast): a block's attention runs a group of windows at a time (about
  ``GROUP_BYTES`` of q/k/v) from the layer norm to the residual add, and its feed-forward a block
  of pixels at a time (``BLOCK_BYTES`` of hidden activations), so each group's data stays in the
  CPU caches instead of every step passing full-map tensors through memory. A shifted block's
  windows are cut straight from the unrolled map, wrapping around its edges
  (:func:`window_group_pieces`), which is what ``torch.roll`` there and back does, without the
  two passes over the map.
- **Tokens**: the 1×1 convolutions run as matrix products over channels-last tokens (a view of
  the network's channels-last memory), never through PyTorch's slow 1×1 convolution path.
- **Packed weights** (fp32, no autocast, when this PyTorch build has the oneDNN ops): the 1×1
  convolutions run ``torch.ops.mkldnn._linear_pointwise`` and the dense convolutions
  ``torch.ops.mkldnn._convolution_pointwise`` with a weight reordered once (the ops PyTorch's
  inductor emits for frozen CPU graphs), instead of PyTorch reordering the weight on every call
  (10.6 MB for the ``paper`` preset's 384→768 upsampling conv). The gated FFN's hidden width is
  padded to a multiple of 16 with zero weights (255 → 256): exact zeros that add 0·0 terms to
  the second product's sums, while the products run on whole 16-float vectors. A packed copy is
  made again whenever its weight changes (in-place updates, ``load_state_dict``, a new
  Parameter); the private ops are probed once and the plain products used without them.
- **Sparse gated family** (``sparse_gated.py``): its top-k attention and frequency-gated FFN
  run on channels-last tokens with the same (packed) 1×1 products, the attention's output made
  token-major for ``project_out``.
- **Attention arithmetic**: the position bias plus shift mask is computed once per map size
  and weights, and enters the score product as ``torch.baddbmm``'s start value; the learned
  scale is folded into q's norm; norms are sums of squares (faster than ``vector_norm`` over
  the short rows here); the softmax-plus-one factor is applied after the product with v, where
  there are fewer entries; the channel branch divides its d×d scores by the two norms instead of
  normalising q and k.

Under CPU autocast (bf16) the blocks take the token paths unblocked: there every small block's
GEMM would re-cast its weights (``paper`` preset at 256² on a 2-core CPU: 0.397 s blocked
against 0.356 s unblocked).
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable, Hashable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from swintormer.models.sparse_gated import FrequencyGatedFeedForward, TopKChannelAttention
from swintormer.models.swintormer import (
    ChannelLayerNorm,
    GatedFeedForward,
    MixedWindowAttention,
    TransformerBlock,
    shifted_window_mask,
    softmax_plus_one,
)

__all__ = ["prepare_for_inference", "restore_reference", "is_prepared"]

# --------------------------------------------------------------------------------------------
# When the fast paths apply, and whether the private oneDNN ops exist
# --------------------------------------------------------------------------------------------


@functools.cache
def onednn_linear_available() -> bool:
    """Whether this build runs oneDNN's linear on a pre-packed weight (probed once)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    try:
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(torch.ones(2, 3), None)
            out = torch.ops.mkldnn._linear_pointwise(torch.ones(4, 3), packed, None, "none", [], "")
        return torch.equal(out, torch.full((4, 2), 3.0))
    except Exception:  # a build or version whose op signature differs: use the plain products
        return False


@functools.cache
def onednn_conv_available() -> bool:
    """Whether this build runs oneDNN's convolution on a pre-packed weight (probed once)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
            and hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight")):
        return False
    try:
        with torch.no_grad():
            x = torch.ones(1, 2, 3, 3).contiguous(memory_format=torch.channels_last)
            packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                torch.ones(2, 2, 1, 1).to_mkldnn(), [0, 0], [1, 1], [1, 1], 1, [1, 2, 3, 3]
            )
            out = torch.ops.mkldnn._convolution_pointwise(x, packed, None, [0, 0], [1, 1], [1, 1], 1, "none", [], "")
        return torch.equal(out, torch.full((1, 2, 3, 3), 2.0))
    except Exception:
        return False


def cpu_without_grad(x: torch.Tensor) -> bool:
    """The engine's domain: a CPU tensor and no autograd recording."""
    return x.device.type == "cpu" and not torch.is_grad_enabled()


def blocked_inference(x: torch.Tensor) -> bool:
    """CPU inference without autocast: the cache-blocked block paths apply."""
    return cpu_without_grad(x) and not torch.is_autocast_enabled("cpu")


def packs_linear(tokens: torch.Tensor) -> bool:
    return tokens.dtype == torch.float32 and blocked_inference(tokens) and onednn_linear_available()


# --------------------------------------------------------------------------------------------
# Packed weights and the per-module caches
# --------------------------------------------------------------------------------------------

# module → {key: cached value}. Weak keys: a cache lives only as long as its module, and nothing
# joins the module's own state (state_dict, deepcopy).
_caches: "weakref.WeakKeyDictionary[nn.Module, dict[Hashable, Any]]" = weakref.WeakKeyDictionary()
_CACHE_ENTRIES = 16  # per module; many input sizes in one process would otherwise grow it


def _cache(module: nn.Module) -> dict[Hashable, Any]:
    entries = _caches.setdefault(module, {})
    if len(entries) > _CACHE_ENTRIES:
        entries.clear()
    return entries


def tensor_state(tensor: torch.Tensor) -> tuple[int, int] | None:
    """(version, address): changes whenever ``tensor``'s values may have changed, by an in-place
    update (optimiser steps, ``load_state_dict``, EMA copies) or new storage (``.to()``). None
    for an inference tensor (made under ``torch.inference_mode``): its in-place updates are not
    counted, so nothing derived from it may be kept."""
    return None if tensor.is_inference() else (tensor._version, tensor.data_ptr())


def packed_weight(layer: nn.Module, key: Hashable, pack: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``pack(layer.weight)``, kept per layer and ``key``, packed again whenever the weight
    changes: another Parameter, or a new :func:`tensor_state`."""
    weight = layer.weight
    state = tensor_state(weight)
    if state is None:
        return pack(weight.detach())
    entries = _cache(layer)
    entry = entries.get(("packed", key))
    if entry is None or entry[0]() is not weight or entry[1] != state:
        entry = entries[("packed", key)] = (weakref.ref(weight), state, pack(weight.detach()))
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
    """A 1×1 convolution applied to an …×C (channels-last) token tensor as one matrix product;
    on oneDNN with a packed weight where :func:`packs_linear` holds."""
    if packs_linear(tokens):
        return onednn_linear(tokens, packed_weight(conv, "linear", pack_linear_weight), conv.bias)
    return F.linear(tokens, conv.weight.flatten(1), conv.bias)


def l2_norms(x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    """Euclidean norms along ``dim``, clamped at F.normalize's eps of 1e-12, in ``x``'s dtype.

    A sum of squares: on this project's CPU 1.2–1.7× faster than ``torch.linalg.vector_norm``
    over the short rows of the window branch and 3–6× across the token rows of the channel
    branch. Summed in float32, as autocast runs ``vector_norm``.
    """
    return x.float().square().sum(dim, keepdim=keepdim).sqrt().clamp_min(1e-12).to(x.dtype)


# --------------------------------------------------------------------------------------------
# Swapped modules
# --------------------------------------------------------------------------------------------


class CpuConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose fp32 CPU inference on channels-last input runs on oneDNN with a
    weight packed once per input size (PyTorch's own path reorders it on every call: 11.7 ms
    against 6.1 ms for the ``paper`` preset's 384→768 upsampling conv, the same results)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (
            x.dtype == torch.float32 and blocked_inference(x) and x.is_contiguous(memory_format=torch.channels_last)
            and self.padding_mode == "zeros" and not isinstance(self.padding, str) and onednn_conv_available()
        ):
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


class CpuGatedFeedForward(GatedFeedForward):
    """The gated FFN on channels-last tokens; cache-blocked with the residual in inference."""

    # Inference works on blocks of this many bytes of hidden activations (see residual_forward).
    BLOCK_BYTES = 4 << 20

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not cpu_without_grad(x):
            return super().forward(x)
        x1, x2 = pointwise(self.project_in, x.permute(0, 2, 3, 1)).chunk(2, dim=-1)
        return pointwise(self.project_out, x1 * x2).permute(0, 3, 1, 2)

    def residual_forward(self, x: torch.Tensor, norm: ChannelLayerNorm) -> torch.Tensor:
        """``x + self(norm(x))``, a block of pixels at a time.

        Every step is per pixel, so a block's 2·hidden activations (a few MiB) stay in cache
        from the first GEMM through the product to the second, instead of a full-map hidden
        tensor (33 MB at 256×256 input, decoder level 1) going through memory.
        """
        n, c, height, width = x.shape
        tokens = x.permute(0, 2, 3, 1).reshape(-1, c)  # a view on channels-last memory
        out = torch.empty_like(tokens)
        project_in, project_out, hidden = self._projections(tokens)
        rows = max(1, self.BLOCK_BYTES // (2 * hidden * tokens.element_size()))
        ln = norm.body
        for start in range(0, tokens.shape[0], rows):
            block = tokens[start : start + rows]
            h = project_in(F.layer_norm(block, ln.normalized_shape, ln.weight, ln.bias, ln.eps))
            torch.add(block, project_out(h[:, :hidden] * h[:, hidden:]), out=out[start : start + rows])
        return out.view(n, height, width, c).permute(0, 3, 1, 2)

    def _projections(self, tokens: torch.Tensor) -> tuple[Callable, Callable, int]:
        """``project_in`` and ``project_out`` as functions of token blocks, and the hidden width
        between them: padded to a multiple of 16 with zero weights on oneDNN (255 → 256 for the
        paper's 96 channels; the FFN 1–11% faster by width, the same result)."""
        hidden = self.project_out.weight.shape[1]
        if not packs_linear(tokens):
            return (lambda h: pointwise(self.project_in, h)), (lambda h: pointwise(self.project_out, h)), hidden
        padded = -(-hidden // 16) * 16

        def pad_halves(t: torch.Tensor) -> torch.Tensor:  # 2·hidden×… → 2·padded×…, zeros after each half
            zeros = t.new_zeros(padded - hidden, *t.shape[1:])
            return torch.cat([t[:hidden], zeros, t[hidden:], zeros])

        in_weight = packed_weight(self.project_in, "padded", lambda w: pack_linear_weight(pad_halves(w.flatten(1))))
        out_weight = packed_weight(
            self.project_out, "padded", lambda w: pack_linear_weight(F.pad(w.flatten(1), (0, padded - hidden)))
        )
        in_bias = None if self.project_in.bias is None else pad_halves(self.project_in.bias)
        return (
            lambda h: onednn_linear(h, in_weight, in_bias),
            lambda h: onednn_linear(h, out_weight, self.project_out.bias),
            padded,
        )


def _wrapped_runs(start: int, length: int, size: int) -> list[tuple[int, int, int]]:
    """Positions [start, start + length) along an axis ``size`` long, wrapping around its end
    (``start < size``, ``length <= size``): (offset, source start, run length) runs."""
    first = min(length, size - start)
    return [(0, start, first)] + ([(first, 0, length - first)] if first < length else [])


def window_group_pieces(
    window: int, group: int, top: int, left: int, height: int, width: int
) -> list[tuple[tuple[Any, ...], tuple[slice, slice], int]]:
    """Where ``group`` windows side by side lie in an H×W map, cut from row ``top`` and column
    ``left`` and wrapping around the map's edges, exactly as after ``torch.roll`` by
    (−top mod w, −left mod w): a shifted block's windows, without rolling the map.

    Returns (group index, map index, k) triples. ``group_buffer[group index]`` (of a g×w×w×c
    buffer) matches ``map[map index]`` (of an H×W×c map), seen as k whole windows
    (see :func:`window_piece`) when k > 0 and as is when k = 0 (part of one window's columns).
    Away from the map's last row and column of windows the result is one piece of g windows.
    """
    pieces = []
    for row_offset, source_row, rows in _wrapped_runs(top, window, height):
        row_index = slice(row_offset, row_offset + rows)
        for col_offset, source_col, cols in _wrapped_runs(left, group * window, width):
            start, stop = col_offset, col_offset + cols
            while start < stop:  # split the run at window borders, whole windows kept together
                if start % window == 0 and stop - start >= window:
                    end, whole = start + (stop - start) // window * window, (stop - start) // window
                    group_index: tuple[Any, ...] = (slice(start // window, end // window), row_index)
                else:
                    end, whole = min(stop, (start // window + 1) * window), 0
                    group_index = (start // window, row_index, slice(start % window, start % window + end - start))
                source = source_col + start - col_offset
                map_index = (slice(source_row, source_row + rows), slice(source, source + end - start))
                pieces.append((group_index, map_index, whole))
                start = end
    return pieces


def window_piece(image_map: torch.Tensor, map_index: tuple[slice, slice], whole: int) -> torch.Tensor:
    """The view of ``image_map`` (H×W×c) named by a :func:`window_group_pieces` triple."""
    piece = image_map[map_index]
    return piece.unflatten(1, (whole, -1)).transpose(0, 1) if whole else piece


class CpuMixedWindowAttention(MixedWindowAttention):
    """The mixed window attention on channels-last tokens, with a cached position bias and, in
    inference, a group of windows at a time from the layer norm to the residual add."""

    # Inference runs the windows in groups of about this many q/k/v bytes (see residual_forward).
    GROUP_BYTES = 4 << 20

    def _position_bias(self, height: int, width: int, device: torch.device, windows: int | None = None) -> torch.Tensor:
        """The reference's position bias plus the shift mask: heads×w²×w² (no shift) or
        nW×heads×w²×w² (shifted windows of an H×W map). With ``windows`` and several heads the
        unshifted bias comes repeated for a product over that many windows. Cached in eval mode,
        keyed on the MLP weights' versions so that loading new weights invalidates it."""
        states = tuple(tensor_state(p) for p in self.cpb_mlp.parameters())
        key = ("bias", height, width, device, windows, *states)
        cacheable = not self.training and None not in states
        if cacheable and key in _caches.get(self, {}):
            return _caches[self][key]
        bias = self.position_bias()
        if self.shift_size > 0:
            mask = shifted_window_mask(height, width, self.window_size, self.shift_size, device)
            bias = bias.unsqueeze(0) + mask.unsqueeze(1)
        elif windows is not None and self.num_heads > 1:
            bias = bias.expand(windows, *bias.shape)
        if cacheable:
            _cache(self)[key] = bias = bias.contiguous()
        return bias

    def _window_branch(self, qkv: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Cosine window attention: windows×tokens×3c' q/k/v → windows×tokens×c'."""
        heads, channels = self.num_heads, qkv.shape[-1] // 3
        qk = qkv[..., : 2 * channels].unflatten(-1, (2, heads, -1))  # n×tokens×2×heads×d
        norms = l2_norms(qk, dim=-1, keepdim=True)
        scale = torch.clamp(self.logit_scale, max=math.log(100.0)).exp().view(heads, 1)
        q, k = (qk / (norms / torch.stack([scale, torch.ones_like(scale)]))).unbind(2)  # q/(|q|/s), k/|k|
        n, tokens, d = q.shape[0], q.shape[1], q.shape[-1]
        # Per window position (nW×heads, repeating over the images) or shared by all windows.
        bias = bias.expand(n // bias.shape[0], *bias.shape) if bias.ndim == 4 else bias.expand(n, *bias.shape)
        scores = torch.baddbmm(
            bias.reshape(n * heads, tokens, tokens),
            q.transpose(1, 2).reshape(n * heads, tokens, d),
            k.permute(0, 2, 3, 1).reshape(n * heads, d, tokens),
        ).view(n, heads, tokens, tokens)
        probs = torch.softmax(scores, dim=-1)
        v = qkv[..., 2 * channels :].unflatten(-1, (heads, -1)).transpose(1, 2)
        out = probs @ v
        out /= 1.0 + probs.amax(dim=-1, keepdim=True)  # softmax-plus-one's row factor
        return out.transpose(1, 2).flatten(2)

    def _channel_branch(self, qkv: torch.Tensor) -> torch.Tensor:
        """Transposed attention inside each window: windows×tokens×3c' → windows×tokens×c'."""
        n, heads = qkv.shape[0], self.num_heads
        channels = qkv.shape[-1] // 3
        q, k, v = (t.unflatten(-1, (heads, -1)) for t in qkv.split(channels, dim=-1))  # n×tokens×heads×d
        norms = l2_norms(qkv[..., : 2 * channels], dim=1).view(n, 2, heads, -1)  # n×(q, k)×heads×d
        scores = q.permute(0, 2, 3, 1) @ k.transpose(1, 2)  # n×heads×d×d
        scores /= norms[:, 0, :, :, None] * norms[:, 1, :, None, :]
        out = v.transpose(1, 2) @ softmax_plus_one(scores).transpose(-2, -1)  # n×heads×tokens×d
        return out.transpose(1, 2).flatten(2)

    def _attend(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Attention inside windows: windows×w×w×c tokens → windows×w²×c (after ``project_out``)."""
        window, c = self.window_size, x.shape[-1]
        qkv = pointwise(self.qkv, x)  # windows×w×w×3c
        qkv = self.qkv_dwconv(qkv.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(-1, window * window, 3 * c)
        if self.attention == "mixed":
            qkv_window, qkv_channel = qkv.split(3 * c // 2, dim=-1)
            out = torch.cat([self._window_branch(qkv_window, bias), self._channel_branch(qkv_channel)], dim=-1)
        elif self.attention == "window":
            out = self._window_branch(qkv, bias)
        else:
            out = self._channel_branch(qkv)
        return pointwise(self.project_out, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not cpu_without_grad(x):
            return super().forward(x)
        n, c, height, width = x.shape
        window = self.window_size
        # Windows are cut from the c-channel input (a third of the bytes of q/k/v); the per-pixel
        # qkv product then yields tokens already in window order.
        x = x.permute(0, 2, 3, 1)  # n×H×W×c
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        x = x.reshape(n, height // window, window, width // window, window, c).permute(0, 1, 3, 2, 4, 5)
        bias = self._position_bias(height, width, x.device) if self.attention != "channel" else None
        out = self._attend(x.reshape(-1, window, window, c), bias)  # windows×tokens×c
        out = out.view(n, height // window, width // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
        out = out.reshape(n, height, width, c)
        if self.shift_size > 0:
            out = torch.roll(out, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        return out.permute(0, 3, 1, 2)

    def residual_forward(self, x: torch.Tensor, norm: ChannelLayerNorm) -> torch.Tensor:
        """``x + self(norm(x))``, a group of windows at a time.

        Each group goes from the input through the layer norm, q/k/v, both branches,
        ``project_out`` and the residual add while its data (a few MiB) stays in cache. A group
        is copied out of the map and its result added back in place with strided copies, so no
        full-map window (un)partition copies remain. A group lies within one row of windows of
        one image, so a shifted block's per-window bias is a slice.
        """
        n, c, height, width = x.shape
        window, shift = self.window_size, self.shift_size
        rows, cols = height // window, width // window
        tokens = x.permute(0, 2, 3, 1)  # n×H×W×c, a view on channels-last memory
        out = torch.empty(tokens.shape, dtype=x.dtype, device=x.device)
        group = max(1, self.GROUP_BYTES // (3 * c * window * window * x.element_size()))
        group = max(g for g in range(1, min(group, cols) + 1) if cols % g == 0)
        bias = self._position_bias(height, width, x.device, group) if self.attention != "channel" else None
        part = torch.empty(group, window, window, c, dtype=x.dtype, device=x.device)
        ln = norm.body
        for row in range(rows):
            for col in range(0, cols, group):
                pieces = window_group_pieces(window, group, row * window + shift, col * window + shift, height, width)
                position = bias
                if bias is not None and shift > 0:
                    position = bias[row * cols + col : row * cols + col + group]
                for image in range(n):
                    for group_index, map_index, whole in pieces:
                        part[group_index].copy_(window_piece(tokens[image], map_index, whole))
                    normed = F.layer_norm(part, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
                    result = self._attend(normed, position).view(group, window, window, c)
                    for group_index, map_index, whole in pieces:
                        torch.add(part[group_index], result[group_index], out=window_piece(out[image], map_index, whole))
        return out.permute(0, 3, 1, 2)


class CpuTopKChannelAttention(TopKChannelAttention):
    """Top-k channel attention on channels-last tokens in CPU inference: the 1×1 convolutions
    as (packed) matrix products, and the result produced token-major for ``project_out``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not cpu_without_grad(x):
            return super().forward(x)
        n, c, height, width = x.shape
        qkv = pointwise(self.qkv, x.permute(0, 2, 3, 1))  # N×H×W×3C
        qkv = self.qkv_dwconv(qkv.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(n, height * width, 3 * c)
        q, k, v = (part.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for part in qkv.chunk(3, dim=-1))
        combined = self.combined_map(self._scores(q.transpose(-2, -1), k.transpose(-2, -1)))
        out = (v @ combined.transpose(-2, -1)).transpose(1, 2).reshape(n, height, width, c)  # (map · v)ᵀ
        return pointwise(self.project_out, out).permute(0, 3, 1, 2)


class CpuFrequencyGatedFeedForward(FrequencyGatedFeedForward):
    """The frequency-gated FFN on channels-last tokens in CPU inference, its 1×1 convolutions as
    (packed) matrix products."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not cpu_without_grad(x):
            return super().forward(x)
        features = self._frequency_gate_tokens(pointwise(self.project_in, x.permute(0, 2, 3, 1)))
        features = self.dwconv(features.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        gate, value = features.chunk(2, dim=-1)
        return pointwise(self.project_out, F.gelu(gate) * value).permute(0, 3, 1, 2)


class CpuTransformerBlock(TransformerBlock):
    """The block; in CPU inference without autocast its pieces run their cache-blocked
    ``residual_forward`` where they have one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not blocked_inference(x):
            return super().forward(x)
        x = _residual(self.attn, x, self.norm1)
        return _residual(self.ffn, x, self.norm2)


def _residual(piece: nn.Module, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    blocked = getattr(piece, "residual_forward", None)
    return blocked(x, norm) if blocked is not None else x + piece(norm(x))


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------

# Reference module type → its engine subclass. Depth-wise convolutions keep PyTorch's own path
# (packing them measured no gain).
ENGINE_MODULES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv2d: CpuConv2d,
    GatedFeedForward: CpuGatedFeedForward,
    MixedWindowAttention: CpuMixedWindowAttention,
    TopKChannelAttention: CpuTopKChannelAttention,
    FrequencyGatedFeedForward: CpuFrequencyGatedFeedForward,
    TransformerBlock: CpuTransformerBlock,
}
REFERENCE_MODULES = {engine: reference for reference, engine in ENGINE_MODULES.items()}


def _swappable(module: nn.Module) -> bool:
    return not (isinstance(module, nn.Conv2d) and module.groups != 1)


def prepare_for_inference(model: nn.Module) -> nn.Module:
    """Swap, in place, every module of ``model`` that the engine has a subclass for, and return
    ``model``.

    Idempotent, cheap (no weights are copied or packed here; packing happens on the first CPU
    forward), and harmless anywhere: the parameters, buffers, names and ``state_dict`` are
    unchanged, and outside CPU inference (autograd on, CUDA or other devices) every swapped
    module runs the reference code. The model's train/eval mode is left as it is.
    """
    for module in model.modules():
        engine = ENGINE_MODULES.get(type(module))
        if engine is not None and _swappable(module):
            module.__class__ = engine
    return model


def restore_reference(model: nn.Module) -> nn.Module:
    """Undo :func:`prepare_for_inference` (and drop the engine's packed weights and caches)."""
    for module in model.modules():
        reference = REFERENCE_MODULES.get(type(module))
        if reference is not None:
            module.__class__ = reference
        _caches.pop(module, None)
    return model


def is_prepared(model: nn.Module) -> bool:
    """Whether any module of ``model`` is an engine module."""
    return any(type(module) in REFERENCE_MODULES for module in model.modules())
