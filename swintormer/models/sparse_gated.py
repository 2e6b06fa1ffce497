"""The sparse gated block family (seed 001): top-k sparse channel attention, ReLU² sparse
activation and the discriminative frequency-domain gating feed-forward.

The seed paper ("深度稀疏门控Transformer图像去模糊模型", a deep sparse gated transformer for
image deblurring) publishes no code and gives no equations beyond naming its ingredients, so
this file builds each ingredient from the published work it names:

- :class:`TopKChannelAttention` follows DRSformer's top-k sparse attention, TKSA (Chen et al.,
  "Learning a Sparse Transformer Network for Effective Image Deraining", CVPR 2023), which is
  Restormer's transposed (channel) attention, MDTA (Zamir et al., CVPR 2022), with a top-k
  selection per row of the C×C map.
- The ReLU² activation follows AST (Zhou et al., "Adapt or Perish: Adaptive Sparse Transformer
  with Attentive Feature Refinement for Image Restoration", CVPR 2024).
- :class:`FrequencyGatedFeedForward` follows FFTformer's discriminative frequency-domain
  feed-forward network, DFFN (Kong et al., "Efficient Frequency Domain-based Transformers for
  High-Quality Image Deblurring", CVPR 2023).
- The block family is the network's own pre-norm residual block, ``x + attn(LN(x))`` then
  ``x + ffn(LN(x))`` (``swintormer.models.swintormer.TransformerBlock``), with these two pieces:
  ``SwintormerConfig(block="sparse_gated")``. Either piece also swaps into the paper's block
  alone (``attention="topk"`` or ``ffn="frequency_gated"``).

Choices made where the seed paper is silent (each repeated in the docstring it concerns):

- k per fraction is ``floor(C_head · fraction)`` (at least 1); ties between equal scores are
  broken by ``torch.topk``, so exactly k entries of every row are kept.
- ReLU² is normalised by its row sum (plus ``RELU2_EPS``) by default, so that its rows sum to
  one like softmax rows do; AST's un-normalised ``relu(s)²`` is available as
  ``relu2_normalization="none"``. The "mixed" activation is AST's: ``w₀·softmax + w₁·relu²``
  with ``(w₀, w₁) = softmax(learned 2-vector)``, initialised to ``(½, ½)``; its ReLU² term
  uses the same normalisation as the ``"relu2"`` activation.
- Feature sizes that are not multiples of the FFT patch size are padded at the bottom and right
  by reflection to the next multiple, filtered, and cropped back (replicate padding where a side
  is too short to reflect). Because each patch is filtered on its own, only the last row and
  column of patches see padded pixels; the patch grid stays anchored at the top-left corner.
- The paper's "self-attention solver that fuses spatial and channel features" is read as:
  channel attention (its 3×3 depth-wise q/k/v convolutions bring the local
  spatial context) followed by the frequency gating feed-forward for the spatial fusion. The
  block has no windows and no shift; every block of a stage is the same.

All modules take and return N×C×H×W tensors, like the Swintormer blocks, in either memory
format (the network runs channels-last). ``swintormer.models.cpu_inference`` runs their dense
convolutions on pre-packed oneDNN weights for CPU inference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DRSFORMER_TOPK_FRACTIONS",
    "RELU2_EPS",
    "AttentionActivation",
    "FrequencyGatedFeedForward",
    "Relu2Normalization",
    "TopKChannelAttention",
    "sparse_attention_weights",
    "topk_counts",
]

AttentionActivation = Literal["softmax", "relu2", "mixed"]
Relu2Normalization = Literal["row_sum", "none"]

#: DRSformer's four top-k fractions: k = C/2, 2C/3, 3C/4, 4C/5.
DRSFORMER_TOPK_FRACTIONS: tuple[float, ...] = (1 / 2, 2 / 3, 3 / 4, 4 / 5)

#: Added to the ReLU² row sum so that a row whose kept scores are all ≤ 0 gives zeros, not NaN.
RELU2_EPS = 1e-6

_ACTIVATIONS = ("softmax", "relu2", "mixed")
_RELU2_NORMALIZATIONS = ("row_sum", "none")


def topk_counts(channels_per_head: int, fractions: Sequence[float]) -> list[int]:
    """The number of entries kept per row for each fraction: ``floor(C_head · fraction)``, at
    least 1.

    The tiny tolerance keeps products such as ``12 · (2/3)`` from rounding down to 7.
    """
    if channels_per_head < 1:
        raise ValueError(f"channels_per_head must be at least 1, got {channels_per_head}")
    counts = []
    for fraction in fractions:
        if not 0.0 < float(fraction) <= 1.0:
            raise ValueError(f"top-k fraction must be in (0, 1], got {fraction}")
        counts.append(max(1, math.floor(channels_per_head * float(fraction) + 1e-9)))
    return counts


def _normalised_relu2(scores: torch.Tensor, keep: torch.Tensor | None, normalization: str) -> torch.Tensor:
    squared = F.relu(scores).square()
    if keep is not None:
        squared = squared * keep
    if normalization == "row_sum":
        squared = squared / (squared.sum(dim=-1, keepdim=True) + RELU2_EPS)
    return squared


def sparse_attention_weights(
    scores: torch.Tensor,
    keep_count: int | None,
    activation: AttentionActivation = "softmax",
    relu2_normalization: Relu2Normalization = "row_sum",
    mix_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention weights from a score map, keeping the ``keep_count`` largest scores of each row.

    ``scores`` is ``…×R×C``; ``keep_count=None`` (or C) keeps the whole row (dense attention).
    The dropped entries are −∞ before softmax and zero in ReLU², so they get exactly zero weight.

    - ``"softmax"``: softmax over the kept scores (DRSformer).
    - ``"relu2"``: ``relu(s)²`` over the kept scores, divided by its row sum plus ``RELU2_EPS``
      when ``relu2_normalization="row_sum"`` (our default; rows then sum to one unless every
      kept score is ≤ 0, in which case the row is zero), or left as is with ``"none"`` (AST).
    - ``"mixed"``: AST's ``w₀·softmax + w₁·relu²`` with ``(w₀, w₁) = softmax(mix_logits)``.
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"attention activation must be one of {_ACTIVATIONS}, got {activation!r}")
    if relu2_normalization not in _RELU2_NORMALIZATIONS:
        raise ValueError(
            f"relu2_normalization must be one of {_RELU2_NORMALIZATIONS}, got {relu2_normalization!r}"
        )
    row_length = scores.shape[-1]
    keep: torch.Tensor | None = None
    if keep_count is not None and keep_count < row_length:
        if keep_count < 1:
            raise ValueError(f"keep_count must be at least 1, got {keep_count}")
        # Index-based selection (not a threshold) keeps exactly k entries even when scores tie.
        kept_indices = scores.detach().topk(keep_count, dim=-1).indices
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, kept_indices, True)

    def softmax_part() -> torch.Tensor:
        masked = scores if keep is None else scores.masked_fill(~keep, float("-inf"))
        return masked.softmax(dim=-1)

    if activation == "softmax":
        return softmax_part()
    if activation == "relu2":
        return _normalised_relu2(scores, keep, relu2_normalization)
    if mix_logits is None:
        raise ValueError("the 'mixed' attention activation needs mix_logits (a learned 2-vector)")
    mix = mix_logits.softmax(dim=0)
    return mix[0] * softmax_part() + mix[1] * _normalised_relu2(scores, keep, relu2_normalization)


class TopKChannelAttention(nn.Module):
    """Top-k sparse transposed (channel) attention: DRSformer's TKSA with a choice of activation.

    q, k and v come from a 1×1 convolution then a 3×3 depth-wise convolution (Restormer's MDTA);
    q and k are L2-normalised along the spatial axis and their per-head C_head×C_head product is
    scaled by a learned per-head temperature (init 1). For each fraction f in
    ``topk_fractions`` the k = ``floor(C_head·f)`` largest scores of each row are kept and
    normalised with ``activation`` (see :func:`sparse_attention_weights`); the resulting maps
    are applied to v and summed with learned scalars (init 0.2, as in DRSformer), then projected
    by a 1×1 convolution. Because the maps act linearly on v, they are summed before the single
    product with v, which gives the same result with one C×C-by-C×HW product instead of four.

    ``topk_fractions=None`` is the plain dense mode: one map over the whole row and no combining
    scalars, i.e. Restormer's MDTA (with ``activation="softmax"``), usable as "channel only"
    attention in ablations.

    The constructor's first three arguments match the Swintormer attention's (``dim``,
    ``num_heads``, ``bias``) so the two can be swapped.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        bias: bool = False,
        topk_fractions: Sequence[float] | None = DRSFORMER_TOPK_FRACTIONS,
        activation: AttentionActivation = "softmax",
        relu2_normalization: Relu2Normalization = "row_sum",
    ) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be a positive multiple of num_heads ({num_heads})")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"attention activation must be one of {_ACTIVATIONS}, got {activation!r}")
        if relu2_normalization not in _RELU2_NORMALIZATIONS:
            raise ValueError(
                f"relu2_normalization must be one of {_RELU2_NORMALIZATIONS}, got {relu2_normalization!r}"
            )
        self.dim = dim
        self.num_heads = num_heads
        self.activation: AttentionActivation = activation
        self.relu2_normalization: Relu2Normalization = relu2_normalization
        channels_per_head = dim // num_heads
        if topk_fractions is None:
            self.topk_fractions: tuple[float, ...] | None = None
            self.keep_counts: list[int | None] = [None]
            self.topk_weights = None
        else:
            fractions = tuple(float(f) for f in topk_fractions)
            if not fractions:
                raise ValueError("topk_fractions must hold at least one fraction (or be None for dense)")
            self.topk_fractions = fractions
            self.keep_counts = list(topk_counts(channels_per_head, fractions))
            self.topk_weights = nn.Parameter(torch.full((len(fractions),), 0.2))

        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, kernel_size=1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(dim * 3, dim * 3, kernel_size=3, padding=1, groups=dim * 3, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)
        # AST initialises its two mixing logits equal, i.e. half softmax, half ReLU².
        self.mix_logits = nn.Parameter(torch.ones(2)) if activation == "mixed" else None

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, keep_counts={self.keep_counts}, "
            f"activation={self.activation!r}, relu2_normalization={self.relu2_normalization!r}"
        )

    def _qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as N×heads×C_head×HW tensors."""
        qkv = self.qkv_dwconv(self.qkv(x)).flatten(2)  # N×3C×HW
        q, k, v = (part.unflatten(1, (self.num_heads, -1)) for part in qkv.chunk(3, dim=1))
        return q, k, v

    def _scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        q = F.normalize(q, dim=-1)  # along the spatial (token) axis
        k = F.normalize(k, dim=-1)
        return (q @ k.transpose(-2, -1)) * self.temperature

    def _weights_per_count(self, scores: torch.Tensor) -> list[torch.Tensor]:
        return [
            sparse_attention_weights(scores, count, self.activation, self.relu2_normalization, self.mix_logits)
            for count in self.keep_counts
        ]

    def attention_scores(self, x: torch.Tensor) -> torch.Tensor:
        """The per-head score map (N×heads×C_head×C_head) before selection and activation."""
        q, k, _ = self._qkv_heads(x)
        return self._scores(q, k)

    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The normalised attention weights, one N×heads×C_head×C_head map per top-k fraction
        (one map in dense mode), before they are combined with the learned scalars."""
        q, k, _ = self._qkv_heads(x)
        return self._weights_per_count(self._scores(q, k))

    def combined_map(self, scores: torch.Tensor) -> torch.Tensor:
        """The per-head map applied to v: the top-k maps summed with their learned scalars."""
        maps = self._weights_per_count(scores)
        if self.topk_weights is None:
            return maps[0]
        return sum(weight * attention for weight, attention in zip(self.topk_weights, maps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, height, width = x.shape
        q, k, v = self._qkv_heads(x)
        out = self.combined_map(self._scores(q, k)) @ v  # N×heads×C_head×HW: row c of the map mixes v's channels
        return self.project_out(out.reshape(n, c, height, width))


class FrequencyGatedFeedForward(nn.Module):
    """Discriminative frequency-domain gating feed-forward: FFTformer's DFFN.

    A 1×1 convolution expands to 2h channels (h = ``int(dim·ffn_expansion_factor)``, as in the
    Swintormer FFN); the features are cut into ``patch_size``×``patch_size`` patches, each
    patch is taken to the frequency domain by ``rfft2``, multiplied by a learned real weight per
    channel and frequency (2h×p×(p/2+1), init 1), and brought back by ``irfft2``; then a 3×3
    depth-wise convolution, a split into two halves, ``gelu(x1)·x2``, and a 1×1 convolution
    back to ``dim``. The FFT runs in float32 whatever the input dtype; the result is cast back.

    Sizes that are not multiples of ``patch_size`` (the seed paper and FFTformer assume they
    are): the expanded features are padded at the bottom and right by reflection to the next
    multiple, filtered, and cropped back before the depth-wise convolution; where a side is too
    short to reflect (size ≤ padding) replicate padding is used instead. With all weights at one
    the frequency step is exactly the identity for any size.

    ``frequency_gating=False`` builds the same layer without the frequency step (for
    ablations). The first three constructor arguments match the Swintormer FFN's (``dim``,
    ``ffn_expansion_factor``, ``bias``) so the two can be swapped.
    """

    def __init__(
        self,
        dim: int,
        ffn_expansion_factor: float,
        bias: bool = False,
        patch_size: int = 8,
        frequency_gating: bool = True,
    ) -> None:
        super().__init__()
        hidden = int(dim * ffn_expansion_factor)
        if hidden < 1:
            raise ValueError(f"dim·ffn_expansion_factor must be at least 1, got {dim}·{ffn_expansion_factor}")
        if patch_size < 1:
            raise ValueError(f"patch_size must be at least 1, got {patch_size}")
        self.dim = dim
        self.hidden = hidden
        self.patch_size = patch_size
        self.project_in = nn.Conv2d(dim, hidden * 2, kernel_size=1, bias=bias)
        self.frequency_weight = (
            nn.Parameter(torch.ones(hidden * 2, patch_size, patch_size // 2 + 1)) if frequency_gating else None
        )
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, kernel_size=3, padding=1, groups=hidden * 2, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, kernel_size=1, bias=bias)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, hidden={self.hidden}, patch_size={self.patch_size}, "
            f"frequency_gating={self.frequency_weight is not None}"
        )

    def frequency_gate(self, features: torch.Tensor) -> torch.Tensor:
        """The per-patch frequency weighting on expanded (2h-channel) N×C×H×W features of any
        size."""
        return self._frequency_gate_tokens(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def _frequency_gate_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The frequency weighting on N×H×W×C (channels-last) features."""
        if self.frequency_weight is None:
            return tokens
        patch = self.patch_size
        n, height, width, channels = tokens.shape
        pad_bottom = (-height) % patch
        pad_right = (-width) % patch
        padded = tokens
        if pad_bottom or pad_right:
            mode = "reflect" if pad_bottom < height and pad_right < width else "replicate"
            padded = F.pad(tokens.permute(0, 3, 1, 2), (0, pad_right, 0, pad_bottom), mode=mode).permute(0, 2, 3, 1)
        padded_height, padded_width = padded.shape[1:3]
        # The view N×(H/p)×p×(W/p)×p×C with an FFT over dims 2 and 4 cuts the patches without
        # moving any data on channels-last memory (the layout the network runs in).
        patches = padded.float().reshape(n, padded_height // patch, patch, padded_width // patch, patch, channels)
        weight = self.frequency_weight.float().permute(1, 2, 0).reshape(patch, 1, patch // 2 + 1, channels)
        spectrum = torch.fft.rfft2(patches, dim=(2, 4)) * weight
        patches = torch.fft.irfft2(spectrum, s=(patch, patch), dim=(2, 4))
        filtered = patches.reshape(n, padded_height, padded_width, channels)
        return filtered[:, :height, :width].to(tokens.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.dwconv(self.frequency_gate(self.project_in(x))).chunk(2, dim=1)
        return self.project_out(F.gelu(gate) * value)
