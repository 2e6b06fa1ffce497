"""The Swintormer network: a four-level Restormer-style U-Net of shifted-window blocks.

This file is the whole network, written to compute exactly the function of the authors' public
implementation (SPEC section 1; proven against ``../shared/reference`` by
``tests/test_swintormer_reference.py``). Parameter names are the authors' own, so their
checkpoints load without renaming (``swintormer.models.reference_checkpoint`` only unwraps and
validates them).

Data flow for an input of 6 channels (blurry RGB then prior RGB) in [0, 1]::

    x → 2x − 1 → pixel-unshuffle 2, 3×3 conv            level 1: H/2,  dim
      → blocks → [3×3 conv c→c/2, unshuffle 2]        level 2: H/4,  2·dim
      → blocks → …                                    level 3: H/8,  4·dim
      → blocks → …                                    level 4: H/16, 8·dim (latent)
      → [3×3 conv c→2c, shuffle 2] ⊕ skip → 1×1 conv → blocks   (levels 3, 2)
      → [3×3 conv, shuffle 2] ⊕ skip (no reduction, 2·dim) → blocks → refinement blocks
      + 1×1 conv of the embedded input → 3×3 conv to 12, shuffle 2 → + input RGB → (y + 1) / 2

Each block is ``x + attn(LN(x))`` then ``x + ffn(LN(x))``. The attention cuts the map into
w×w windows *before* its q/k/v convolutions (so the depth-wise conv sees zero padding at window
borders) and runs two branches side by side on halves of the q/k/v channels: cosine-similarity
window attention with a continuous position bias (Swin V2) and transposed channel attention
(Restormer's MDTA) inside each window. Both normalise with "softmax plus one". Because windows
are cut at every level, H and W must be multiples of ``16·window_size``; other sizes are
reflect-padded and cropped back.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from swintormer.models.layers import (
    ChannelLayerNorm,
    PackedConv2d,
    cpu_inference,
    onednn_linear,
    pack_linear_weight,
    packed_weight,
    pointwise,
    tensor_state,
    uses_packed_weights,
)
from swintormer.models.sparse_gated import FrequencyGatedFeedForward, TopKChannelAttention
from swintormer.core.files import atomic_folder
from swintormer.core.padding import pad_to_multiple

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WINDOWED_ATTENTION = ("mixed", "window", "channel")
ATTENTION_KINDS = (*WINDOWED_ATTENTION, "topk")
FFN_KINDS = ("gated", "frequency_gated")
# Block family → (attention, feed-forward) used unless the config names another piece.
BLOCK_FAMILIES = {"mixed": ("mixed", "gated"), "sparse_gated": ("topk", "frequency_gated")}


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SwintormerConfig:
    """Architecture of a Swintormer network. ``SwintormerConfig.preset("paper")`` is the
    authors' configuration (25,177,224 parameters).

    ``block`` picks the block family: ``mixed`` (the paper: shifted-window attention with a
    spatial and a channel branch, gated feed-forward) or ``sparse_gated`` (seed 001: top-k sparse
    channel attention and the frequency-domain gating feed-forward, see ``sparse_gated.py``).
    ``attention`` and ``ffn`` name the block's two pieces; left empty they take the family's
    own, and set explicitly they swap one piece for ablations:

    - ``attention``: ``mixed`` (half of the q/k/v channels to window attention, half to channel
      attention), ``window`` or ``channel`` (all channels to one branch, still per window; the
      paper's Table 6 ablation), or ``topk`` (top-k sparse channel attention over the whole map).
    - ``ffn``: ``gated`` (the paper's) or ``frequency_gated``.

    ``topk_fractions``, ``attention_activation`` (``softmax``, ``relu2``, ``mixed``) and
    ``fft_patch_size`` configure the sparse pieces and are ignored by the others.
    """

    in_channels: int = 6
    dim: int = 48
    num_blocks: tuple[int, int, int, int] = (2, 4, 6, 8)
    num_refinement_blocks: int = 4
    heads: tuple[int, int, int, int] = (1, 2, 4, 8)
    ffn_expansion_factor: float = 2.66
    bias: bool = False
    window_size: int = 16
    block: str = "mixed"
    attention: str = ""
    ffn: str = ""
    topk_fractions: tuple[float, ...] = (1 / 2, 2 / 3, 3 / 4, 4 / 5)
    attention_activation: str = "softmax"
    fft_patch_size: int = 8

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    def __post_init__(self) -> None:
        # Lists from JSON/YAML become tuples so that configs compare and hash by value.
        object.__setattr__(self, "num_blocks", tuple(int(n) for n in self.num_blocks))
        object.__setattr__(self, "heads", tuple(int(n) for n in self.heads))
        object.__setattr__(self, "topk_fractions", tuple(float(f) for f in self.topk_fractions))
        problems = []
        if self.block not in BLOCK_FAMILIES:
            problems.append(f"block must be one of {tuple(BLOCK_FAMILIES)}, got {self.block!r}")
        else:
            family_attention, family_ffn = BLOCK_FAMILIES[self.block]
            object.__setattr__(self, "attention", self.attention or family_attention)
            object.__setattr__(self, "ffn", self.ffn or family_ffn)
        if self.in_channels < 3:
            problems.append(f"in_channels must be at least 3 (blurry RGB), got {self.in_channels}")
        if len(self.num_blocks) != 4 or min(self.num_blocks) < 1:
            problems.append(f"num_blocks must be 4 positive integers, got {list(self.num_blocks)}")
        if len(self.heads) != 4 or min(self.heads) < 1:
            problems.append(f"heads must be 4 positive integers, got {list(self.heads)}")
        if self.num_refinement_blocks < 0:
            problems.append("num_refinement_blocks must be >= 0")
        if self.window_size < 2:
            problems.append(f"window_size must be at least 2, got {self.window_size}")
        if self.attention and self.attention not in ATTENTION_KINDS:
            problems.append(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if self.ffn and self.ffn not in FFN_KINDS:
            problems.append(f"ffn must be one of {FFN_KINDS}, got {self.ffn!r}")
        if self.attention_activation not in ("softmax", "relu2", "mixed"):
            problems.append(f"attention_activation must be softmax, relu2 or mixed, got {self.attention_activation!r}")
        if not self.topk_fractions or not all(0 < f <= 1 for f in self.topk_fractions):
            problems.append(f"topk_fractions must be fractions in (0, 1], got {list(self.topk_fractions)}")
        if self.fft_patch_size < 2:
            problems.append(f"fft_patch_size must be at least 2, got {self.fft_patch_size}")
        if self.dim < 2 or self.dim % 2:
            problems.append(f"dim must be even (downsampling halves it), got {self.dim}")
        if not problems:
            widths = [self.dim, 2 * self.dim, 4 * self.dim, 8 * self.dim]
            # Decoder level 1 and refinement run at 2·dim with heads[0].
            for width, heads in [*zip(widths, self.heads), (2 * self.dim, self.heads[0])]:
                branch = width // 2 if self.attention == "mixed" else width
                if branch % heads:
                    problems.append(
                        f"{branch} attention channels at width {width} do not split into {heads} heads"
                    )
        if problems:
            raise ValueError("invalid SwintormerConfig: " + "; ".join(problems))

    @property
    def uses_windows(self) -> bool:
        return self.attention in WINDOWED_ATTENTION

    @property
    def size_multiple(self) -> int:
        """Inputs are padded to a multiple of this: four halvings, and windows cut at every
        level (so w at level 4, H/16) when the attention is windowed."""
        return 16 * self.window_size if self.uses_windows else 16

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "SwintormerConfig":
        """A registered configuration by name, with optional field overrides."""
        if name not in cls.PRESETS:
            raise ValueError(f"unknown Swintormer preset {name!r}; known: {', '.join(sorted(cls.PRESETS))}")
        return cls.from_dict({**cls.PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "SwintormerConfig":
        """Build from a mapping; an unknown key is an error naming it."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown SwintormerConfig key(s): {', '.join(unknown)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        for name in ("num_blocks", "heads", "topk_fractions"):
            values[name] = list(values[name])
        return values


def register_preset(name: str, **fields: Any) -> None:
    """Register a named configuration (validated now, so a bad preset fails at import)."""
    SwintormerConfig(**fields)
    SwintormerConfig.PRESETS[name] = fields


# The authors' configuration for DPDD defocus deblurring (paper, 25.18 M parameters).
register_preset("paper")
# The reference test-vector configuration (../shared/reference/swintormer_tiny_config.json).
register_preset(
    "tiny", dim=8, num_blocks=(1, 2, 2, 2), num_refinement_blocks=2, heads=(1, 2, 2, 4), window_size=8
)
# A CPU-trainable configuration: the paper's shape at a third of its width and fewer blocks.
register_preset(
    "small", dim=16, num_blocks=(1, 2, 2, 4), num_refinement_blocks=2, heads=(1, 2, 4, 8), window_size=8
)
# The sparse gated family (seed 001) for GoPro motion deblurring: the paper's U-Net shape with an
# FFN expansion of 2.4, chosen so that the parameter count (25.28 M) is about the paper preset's
# (25.18 M; the frequency-gated FFN adds a depth-wise conv and spectral weights). No prior, as
# in the seed paper; ``in_channels=6`` adds one.
register_preset("sparse_gated_gopro", block="sparse_gated", ffn_expansion_factor=2.4, in_channels=3)
# CPU and test sizes, their FFN expansion lowered to match the parameters of `small` (1.59 M)
# and `tiny` (0.33 M), so that the two families compare at the same size.
register_preset(
    "sparse_gated_small", block="sparse_gated", dim=16, num_blocks=(1, 2, 2, 4), num_refinement_blocks=2,
    heads=(1, 2, 4, 8), window_size=8, ffn_expansion_factor=2.1,
)
register_preset(
    "sparse_gated_tiny", block="sparse_gated", dim=8, num_blocks=(1, 2, 2, 2), num_refinement_blocks=2,
    heads=(1, 2, 2, 4), window_size=8, ffn_expansion_factor=2.0,
)


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def softmax_plus_one(scores: torch.Tensor) -> torch.Tensor:
    """The authors' attention normalisation: ``exp(s − max) / (1 + Σ exp(s − max))`` per row.

    The extra one lets a row attend to "nothing". Since the row maximum contributes exp(0) = 1
    to the sum, ``Σ = 1 / max(softmax(s))``, so this equals ``softmax(s) / (1 + max softmax(s))``,
    which uses PyTorch's fused softmax.
    """
    probs = torch.softmax(scores, dim=-1)
    return probs / (1.0 + probs.amax(dim=-1, keepdim=True))


def l2_norms(x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    """Euclidean norms along ``dim``, clamped at F.normalize's eps of 1e-12, in ``x``'s dtype.

    The same norms as ``torch.linalg.vector_norm``, computed as a sum of squares, which on this
    project's CPU is 1.2–1.7× faster over the short rows of the window branch and 3–6× faster
    across the token rows of the channel branch. Summed in float32, as autocast runs
    ``vector_norm`` (a no-op for float32 input).
    """
    return x.float().square().sum(dim, keepdim=keepdim).sqrt().clamp_min(1e-12).to(x.dtype)


class GatedFeedForward(nn.Module):
    """1×1 conv to two halves of ``int(dim·factor)`` channels, their product, 1×1 conv back.

    Unlike Restormer's GDFN there is neither a depth-wise conv nor a GELU: the gate is the plain
    product of the two halves.
    """

    def __init__(self, dim: int, ffn_expansion_factor: float, bias: bool) -> None:
        super().__init__()
        hidden = int(dim * ffn_expansion_factor)
        self.project_in = nn.Conv2d(dim, 2 * hidden, kernel_size=1, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, kernel_size=1, bias=bias)

    # Inference works on blocks of this many bytes of hidden activations (see residual_forward).
    BLOCK_BYTES = 4 << 20

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = pointwise(self.project_in, x.permute(0, 2, 3, 1)).chunk(2, dim=-1)
        return pointwise(self.project_out, x1 * x2).permute(0, 3, 1, 2)

    def residual_forward(self, x: torch.Tensor, norm: ChannelLayerNorm) -> torch.Tensor:
        """``x + self(norm(x))`` for inference, a block of pixels at a time.

        Every step is per pixel, so the pixels can be processed in blocks. A block's 2·hidden
        activations (a few MiB) then stay in cache from the first GEMM through the product to the
        second, instead of a full-map hidden tensor (33 MB at 256×256 input, decoder level 1)
        being written to and read back from memory; the residual is added to each block's output.
        Same arithmetic as the plain path, row by row.
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
            h = h[:, :hidden] * h[:, hidden:]
            # Not a fused ``addmm(out=...)``: out= variants bypass autocast, and under bf16 autocast
            # the GEMM must see bf16 operands while the sum keeps the residual's dtype.
            torch.add(block, project_out(h), out=out[start : start + rows])
        return out.view(n, height, width, c).permute(0, 3, 1, 2)

    def _projections(self, tokens: torch.Tensor) -> tuple[Callable, Callable, int]:
        """``project_in`` and ``project_out`` as functions of token blocks, and the hidden width
        between them.

        On oneDNN the hidden width is padded to a multiple of 16 (255 → 256 for the paper's
        96 channels) with zero weights: each padded channel is exactly 0, and adding 0·0 to the
        second product's sums changes no bit of the result, while the GEMMs and the gate's
        product run on whole 16-float vectors (the FFN 1–11% faster, by width; measurements doc,
        ninth session).
        """
        hidden = self.project_out.weight.shape[1]
        if not uses_packed_weights(tokens):
            return partial(pointwise, self.project_in), partial(pointwise, self.project_out), hidden
        padded = -(-hidden // 16) * 16

        def pad_halves(t: torch.Tensor) -> torch.Tensor:  # 2·hidden×… → 2·padded×…, zeros after each half
            zeros = t.new_zeros(padded - hidden, *t.shape[1:])
            return torch.cat([t[:hidden], zeros, t[hidden:], zeros])

        def pad_columns(weight: torch.Tensor) -> torch.Tensor:  # c×hidden → c×padded
            return F.pad(weight.flatten(1), (0, padded - hidden))

        in_weight = packed_weight(self.project_in, "padded", lambda w: pack_linear_weight(pad_halves(w.flatten(1))))
        out_weight = packed_weight(self.project_out, "padded", lambda w: pack_linear_weight(pad_columns(w)))
        in_bias = None if self.project_in.bias is None else pad_halves(self.project_in.bias)
        return (
            lambda h: onednn_linear(h, in_weight, in_bias),
            lambda h: onednn_linear(h, out_weight, self.project_out.bias),
            padded,
        )


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """N×C×H×W → (N·nH·nW)×C×w×w, windows in row-major order per image."""
    n, c, h, w = x.shape
    x = x.view(n, c, h // window, window, w // window, window)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(-1, c, window, window)


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
    (``map[index].unflatten(1, (k, w)).transpose(0, 1)``, see :func:`window_piece`) when k > 0
    and as is when k = 0 (part of one window's columns). Away from the map's last row and column
    of windows the result is a single piece of g whole windows.
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


def shifted_window_mask(height: int, width: int, window: int, shift: int) -> torch.Tensor:
    """Swin's mask for a map rolled by −shift: 0 within a region, −100 across regions.

    Returns nW×w²×w² for an H×W map.
    """
    region = torch.zeros(1, 1, height, width)
    bands = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for rows in bands:
        for cols in bands:
            region[:, :, rows, cols] = label
            label += 1
    labels = window_partition(region, window).flatten(1)  # nW × w²
    different = labels.unsqueeze(1) != labels.unsqueeze(2)
    return torch.zeros(different.shape).masked_fill_(different, -100.0)


def log_spaced_relative_coords(window: int) -> torch.Tensor:
    """Swin V2's continuous position-bias input: (2w−1)²×2 log-spaced relative offsets."""
    offsets = torch.arange(-(window - 1), window, dtype=torch.float32)
    table = torch.stack(torch.meshgrid(offsets, offsets, indexing="ij"), dim=-1)
    table = table / (window - 1) * 8
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)


def relative_position_index(window: int) -> torch.Tensor:
    """w²×w² index into the (2w−1)² offset table for every pair of tokens in a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return relative[..., 0] * (2 * window - 1) + relative[..., 1]


class MixedWindowAttention(nn.Module):
    """Shifted-window attention with a spatial and a channel branch ("SWDA + MDTA").

    Windows are cut first; q/k/v come from a 1×1 then a 3×3 depth-wise conv *per window*.
    With ``attention="mixed"`` the first 3c/2 q/k/v channels feed the window branch and the last
    3c/2 the channel branch; ``window`` or ``channel`` give all 3c to one branch.

    In inference the position bias (a function of the ``cpb_mlp`` weights only) plus the shift
    mask (a function of the map size only) is cached: it is the same for every call.
    """

    def __init__(
        self, dim: int, num_heads: int, bias: bool, window_size: int, shift_size: int, attention: str = "mixed"
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.shift_size = shift_size
        self.attention = attention
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 512), nn.ReLU(inplace=True), nn.Linear(512, num_heads, bias=False))
        self.register_buffer("relative_coords_table", log_spaced_relative_coords(window_size), persistent=False)
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=False)
        self.qkv = nn.Conv2d(dim, 3 * dim, kernel_size=1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(3 * dim, 3 * dim, kernel_size=3, padding=1, groups=3 * dim, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)
        self._cache: dict[Any, torch.Tensor] = {}

    def _position_bias(
        self, height: int, width: int, device: torch.device, windows: int | None = None
    ) -> torch.Tensor:
        """``16·sigmoid(cpb_mlp(coords))`` for every token pair, plus the shift mask.

        Returns heads×w²×w² (no shift) or nW×heads×w²×w² (shifted windows of an H×W map). With
        ``windows`` and several heads, the unshifted bias comes repeated for a product over that
        many windows (windows×heads×w²×w², see ``_window_branch``). In inference (eval mode, no
        gradients) the result is cached, keyed on the MLP weights' versions so that loading new
        weights invalidates it.
        """
        states = tuple(tensor_state(p) for p in self.cpb_mlp.parameters())
        key = (height, width, device, windows, *states)
        cacheable = not self.training and not torch.is_grad_enabled() and None not in states
        if cacheable and key in self._cache:
            return self._cache[key]
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        tokens = self.window_size**2
        bias = table[self.relative_position_index.view(-1)].view(tokens, tokens, -1).permute(2, 0, 1)
        bias = 16 * torch.sigmoid(bias)
        if self.shift_size > 0:
            mask = shifted_window_mask(height, width, self.window_size, self.shift_size).to(device)
            bias = bias.unsqueeze(0) + mask.unsqueeze(1)
        elif windows is not None and self.num_heads > 1:
            bias = bias.expand(windows, *bias.shape)
        if cacheable:
            if len(self._cache) > 8:  # many image sizes in one session: keep memory bounded
                self._cache.clear()
            self._cache[key] = bias = bias.detach().contiguous()
        return bias

    def _window_branch(self, qkv: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Cosine window attention: windows×tokens×3c' q/k/v (heads·d channels each) →
        windows×tokens×c'.

        ``bias`` is heads×w²×w², or nW×heads×w²×w² for windows that repeat in groups of nW.
        The learned scale is folded into q's norm (q/(|q|/s) rather than (q/|q|)·s), so q and k
        are normalised by one division; with one head every product reads q, k and v in place.
        """
        heads, channels = self.num_heads, qkv.shape[-1] // 3
        qk = qkv[..., : 2 * channels].unflatten(-1, (2, heads, -1))  # n×tokens×2×heads×d
        norms = l2_norms(qk, dim=-1, keepdim=True)
        scale = torch.clamp(self.logit_scale, max=math.log(100.0)).exp().view(heads, 1)
        q, k = (qk / (norms / torch.stack([scale, torch.ones_like(scale)]))).unbind(2)
        n, tokens, d = q.shape[0], q.shape[1], q.shape[-1]
        # The bias as the product's starting value: one pass over the scores fewer than adding it
        # afterwards. Per window position (nW×heads, repeating over the images) or shared.
        bias = bias.expand(n // bias.shape[0], *bias.shape) if bias.ndim == 4 else bias.expand(n, *bias.shape)
        scores = torch.baddbmm(
            bias.reshape(n * heads, tokens, tokens),
            q.transpose(1, 2).reshape(n * heads, tokens, d),
            k.permute(0, 2, 3, 1).reshape(n * heads, d, tokens),
        ).view(n, heads, tokens, tokens)
        probs = torch.softmax(scores, dim=-1)
        v = qkv[..., 2 * channels :].unflatten(-1, (heads, -1)).transpose(1, 2)
        # softmax-plus-one = softmax / (1 + row max of softmax) (see softmax_plus_one); the
        # per-row factor is applied after the product with v, where there are fewer entries.
        out = probs @ v
        out /= 1.0 + probs.amax(dim=-1, keepdim=True)
        return out.transpose(1, 2).flatten(2)

    def _channel_branch(self, qkv: torch.Tensor) -> torch.Tensor:
        """Transposed (channel) attention inside each window: windows×tokens×3c' → windows×tokens×c'.

        The scores are cosine similarities of q's and k's channels along the token axis. Rather
        than normalising q and k (two passes over tokens×d each), the d×d product is divided
        by the two norms: the same similarities, F.normalize's eps included.
        """
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
        # Zero padding of the depth-wise conv happens at each window's border, as in the reference.
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
        n, c, height, width = x.shape
        window = self.window_size
        # Work on channels-last tokens: every 1×1 conv is then a GEMM and the depth-wise conv
        # runs on channels-last memory. Windows are cut from the c-channel input (a third of the
        # bytes of q/k/v); the per-pixel qkv conv then yields tokens already in window order.
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

    # Inference runs the windows in groups of about this many q/k/v bytes (see residual_forward).
    GROUP_BYTES = 4 << 20

    def residual_forward(self, x: torch.Tensor, norm: ChannelLayerNorm) -> torch.Tensor:
        """``x + self(norm(x))`` for inference, a group of windows at a time.

        Windows are independent, so each group goes from the input through the layer norm,
        q/k/v, both branches, ``project_out`` and the residual add while its data (a few MiB)
        stays in cache, instead of every step passing full-map tensors (19 MB of q/k/v at
        decoder level 1 for a 256×256 input) through memory. A group is copied out of the map
        and its result added back in place with strided copies of that group, so no full-map
        window (un)partition copies remain. A shifted block's group is cut at an offset of half
        a window, wrapping around the map's edges (:func:`window_group_pieces`), which is what
        ``torch.roll`` there and back would do, without the two passes over the map. A group
        lies within one row of windows of one image, so a shifted block's per-window bias is a
        slice.
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
                        target = window_piece(out[image], map_index, whole)
                        torch.add(part[group_index], result[group_index], out=target)
        return out.permute(0, 3, 1, 2)


def build_attention(config: SwintormerConfig, dim: int, num_heads: int, shift_size: int) -> nn.Module:
    """The attention piece named by ``config.attention`` for one block."""
    if config.attention == "topk":
        return TopKChannelAttention(
            dim, num_heads, config.bias, topk_fractions=config.topk_fractions, activation=config.attention_activation
        )
    return MixedWindowAttention(dim, num_heads, config.bias, config.window_size, shift_size, config.attention)


def build_feed_forward(config: SwintormerConfig, dim: int) -> nn.Module:
    """The feed-forward piece named by ``config.ffn`` for one block."""
    if config.ffn == "frequency_gated":
        return FrequencyGatedFeedForward(dim, config.ffn_expansion_factor, config.bias, patch_size=config.fft_patch_size)
    return GatedFeedForward(dim, config.ffn_expansion_factor, config.bias)


class TransformerBlock(nn.Module):
    """``x + attn(LN(x))`` then ``x + ffn(LN(x))``, the pieces chosen by the config.

    Within a stage, blocks at odd index shift their windows by half a window (windowed
    attention only).
    """

    def __init__(self, config: SwintormerConfig, dim: int, num_heads: int, shift_size: int = 0) -> None:
        super().__init__()
        self.norm1 = ChannelLayerNorm(dim)
        self.attn = build_attention(config, dim, num_heads, shift_size)
        self.norm2 = ChannelLayerNorm(dim)
        self.ffn = build_feed_forward(config, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # CPU inference takes the cache-blocked paths (the same sums). Not under autocast: there
        # every small block's GEMM re-casts its weights, and the blocked bf16 forward measured
        # 0.397 s against 0.356 s for the plain one (paper preset, 256², this CPU). Not on other
        # devices: the blocking is for CPU caches, and on a GPU it would only split each step's
        # one batched kernel into many small launches.
        blocked = cpu_inference(x)
        if blocked and isinstance(self.attn, MixedWindowAttention):
            x = self.attn.residual_forward(x, self.norm1)
        else:
            x = x + self.attn(self.norm1(x))
        if blocked and isinstance(self.ffn, GatedFeedForward):
            return self.ffn.residual_forward(x, self.norm2)
        return x + self.ffn(self.norm2(x))


class PatchEmbed(nn.Module):
    """Pixel-unshuffle by 2 (C → 4C channels), then a 3×3 conv to ``dim``."""

    def __init__(self, in_channels: int, dim: int, bias: bool) -> None:
        super().__init__()
        self.proj = nn.PixelUnshuffle(2)
        self.proj2 = PackedConv2d(4 * in_channels, dim, kernel_size=3, padding=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj2(self.proj(x))


class Downsample(nn.Module):
    """3×3 conv c → c/2, then pixel-unshuffle 2: half the resolution, twice the channels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            PackedConv2d(channels, channels // 2, kernel_size=3, padding=1, bias=False), nn.PixelUnshuffle(2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Upsample(nn.Module):
    """3×3 conv c → 2c, then pixel-shuffle 2: twice the resolution, half the channels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            PackedConv2d(channels, 2 * channels, kernel_size=3, padding=1, bias=False), nn.PixelShuffle(2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------


class Swintormer(nn.Module):
    """The Swintormer U-Net. ``model(x)``: N×C×H×W in [0, 1] (C = ``config.in_channels``:
    blurry RGB first, then the prior) → N×3×H×W deblurred RGB, for any H and W."""

    # Stages the authors wrap in activation checkpointing (not level 1, the largest activation
    # is cheap to keep relative to recomputing the first stage's convs).
    CHECKPOINTED_STAGES = (
        "encoder_level2", "encoder_level3", "latent", "decoder_level3", "decoder_level2", "decoder_level1", "refinement",
    )

    def __init__(self, config: SwintormerConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or SwintormerConfig()
        self.gradient_checkpointing = False
        dim, heads = config.dim, config.heads

        def stage(width: int, num_heads: int, depth: int) -> nn.Sequential:
            shift = config.window_size // 2
            return nn.Sequential(*[TransformerBlock(config, width, num_heads, 0 if i % 2 == 0 else shift) for i in range(depth)])

        self.patch_embed = PatchEmbed(config.in_channels, dim, config.bias)
        self.encoder_level1 = stage(dim, heads[0], config.num_blocks[0])
        self.down1_2 = Downsample(dim)
        self.encoder_level2 = stage(2 * dim, heads[1], config.num_blocks[1])
        self.down2_3 = Downsample(2 * dim)
        self.encoder_level3 = stage(4 * dim, heads[2], config.num_blocks[2])
        self.down3_4 = Downsample(4 * dim)
        self.latent = stage(8 * dim, heads[3], config.num_blocks[3])

        self.up4_3 = Upsample(8 * dim)
        self.reduce_chan_level3 = PackedConv2d(8 * dim, 4 * dim, kernel_size=1, bias=config.bias)
        self.decoder_level3 = stage(4 * dim, heads[2], config.num_blocks[2])
        self.up3_2 = Upsample(4 * dim)
        self.reduce_chan_level2 = PackedConv2d(4 * dim, 2 * dim, kernel_size=1, bias=config.bias)
        self.decoder_level2 = stage(2 * dim, heads[1], config.num_blocks[1])
        self.up2_1 = Upsample(2 * dim)
        # Level 1 keeps the concatenated 2·dim channels: no reduction conv.
        self.decoder_level1 = stage(2 * dim, heads[0], config.num_blocks[0])
        self.refinement = stage(2 * dim, heads[0], config.num_refinement_blocks)
        self.skip_conv = PackedConv2d(dim, 2 * dim, kernel_size=1, bias=config.bias)
        self.apply(_init_weights)
        # Created after the init above, as in the reference, so it keeps PyTorch's default init.
        self.output = nn.Sequential(PackedConv2d(2 * dim, 12, kernel_size=3, padding=1, bias=False), nn.PixelShuffle(2))

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute the activations of the deeper stages in the backward pass (saves memory)."""
        self.gradient_checkpointing = enabled

    def _run(self, name: str, x: torch.Tensor) -> torch.Tensor:
        stage = getattr(self, name)
        if self.gradient_checkpointing and torch.is_grad_enabled() and name in self.CHECKPOINTED_STAGES:
            return checkpoint(stage, x, use_reentrant=False)
        return stage(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"Swintormer expects N×{self.config.in_channels}×H×W input, got shape {tuple(x.shape)}"
            )
        height, width = x.shape[-2:]
        x = pad_to_multiple(2 * x - 1, self.config.size_multiple)
        # Channels-last memory makes every block's per-pixel work (LayerNorm, 1×1 convs) run on
        # contiguous N×H×W×C views without copies; the logical shape stays N×C×H×W.
        x = x.contiguous(memory_format=torch.channels_last)

        embedded = self.patch_embed(x)
        enc1 = self._run("encoder_level1", embedded)
        enc2 = self._run("encoder_level2", self.down1_2(enc1))
        enc3 = self._run("encoder_level3", self.down2_3(enc2))
        latent = self._run("latent", self.down3_4(enc3))

        dec3 = self.reduce_chan_level3(torch.cat([self.up4_3(latent), enc3], 1))
        dec3 = self._run("decoder_level3", dec3)
        dec2 = self.reduce_chan_level2(torch.cat([self.up3_2(dec3), enc2], 1))
        dec2 = self._run("decoder_level2", dec2)
        dec1 = self._run("decoder_level1", torch.cat([self.up2_1(dec2), enc1], 1))
        dec1 = self._run("refinement", dec1) + self.skip_conv(embedded)

        out = self.output(dec1) + x[:, :3]
        return ((out + 1) / 2)[:, :, :height, :width]

    # ----------------------------------------------------------------------------------------
    # Saving and loading
    # ----------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` to ``directory`` atomically.

        Both files are written to a temporary folder beside ``directory``, which then replaces it:
        a reader never sees a half-written model, and an interrupted save leaves the old one.
        """
        directory = Path(directory)
        with atomic_folder(directory) as staging:
            state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
            save_file(state, staging / WEIGHTS_NAME, metadata={"format": "pt", "model": "swintormer"})
            config = {"model_type": "swintormer", **self.config.to_dict()}
            (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> "Swintormer":
        """Load a model saved by :meth:`save_pretrained`; every problem is one clear error."""
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"model folder not found: {directory}")
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"model folder {directory} is incomplete: missing {path.name}")
        config = load_config_file(config_path)
        model = cls(config)
        try:
            state = load_file(weights_path, device=str(map_location))
        except Exception as error:  # safetensors raises several types for damaged files
            raise ValueError(f"cannot read weights {weights_path}: {error}") from None
        check_state_dict(model, state, source=str(weights_path))
        model.load_state_dict(state)
        return model.eval()


def load_config_file(path: str | os.PathLike) -> SwintormerConfig:
    """Read a ``config.json`` written by :meth:`Swintormer.save_pretrained`."""
    path = Path(path)
    try:
        values = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read model config {path}: {error}") from None
    if not isinstance(values, dict) or values.pop("model_type", None) != "swintormer":
        raise ValueError(f"{path} is not a Swintormer config (model_type must be 'swintormer')")
    try:
        return SwintormerConfig.from_dict(values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from None


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise one error listing every missing, unexpected or mis-shaped key of ``state``."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{k} {list(state[k].shape)} (expected {list(expected[k].shape)})"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    parts = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if names:
            shown = ", ".join(names[:20]) + (f", … ({len(names) - 20} more)" if len(names) > 20 else "")
            parts.append(f"{len(names)} {label}: {shown}")
    if parts:
        raise ValueError(f"weights in {source} do not fit the model: " + "; ".join(parts))


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
