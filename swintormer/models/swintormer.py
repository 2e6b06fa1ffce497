"""The Swintormer network: a four-level Restormer-style U-Net of shifted-window blocks.

The reference implementation: it computes the function of the authors' public Swintormer code
("Efficient Image Deblurring Networks based on Diffusion Models"; proven by
``tests/test_swintormer_reference.py``) under their parameter names,
so their checkpoints load unchanged. ``swintormer.models.cpu_inference`` makes it faster on CPUs.

    x (N×C×H×W in [0, 1]) → 2x − 1 → pixel-unshuffle 2, 3×3 conv      level 1: H/2,  dim
      → blocks → [3×3 conv c→c/2, unshuffle 2] → blocks …           levels 2–4: H/4–H/16, 2–8·dim
      → [3×3 conv c→2c, shuffle 2] ⊕ skip → 1×1 conv → blocks       (levels 3, 2)
      → [3×3 conv, shuffle 2] ⊕ skip (2·dim) → blocks → refinement blocks
      + 1×1 conv of the embedded input → 3×3 conv to 12, shuffle 2 → + input RGB → (y + 1) / 2

Each block is ``x + attn(LN(x))`` then ``x + ffn(LN(x))``. The attention ("SWDA + MDTA") cuts the
map into w×w windows *before* its q/k/v convolutions (the depth-wise conv zero-pads at window
borders) and splits the q/k/v channels between two branches: cosine window attention with Swin
V2's continuous position bias (Liu et al., CVPR 2022) and Restormer's transposed channel
attention, MDTA (Zamir et al., CVPR 2022), inside each window. Both normalise with "softmax
plus one". As windows are cut at every level, H and W must be multiples of ``16·window_size``;
other sizes are reflect-padded and cropped back.
"""

from __future__ import annotations

import math
import os
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field, model_validator
from torch import nn
from torch.utils.checkpoint import checkpoint

from swintormer.core.config import StrictModel
from swintormer.core.padding import pad_to_multiple
from swintormer.models.pretrained import CONFIG_NAME, WEIGHTS_NAME, PretrainedMixin, check_state_dict
from swintormer.models.sparse_gated import FrequencyGatedFeedForward, TopKChannelAttention

__all__ = [
    "CONFIG_NAME", "WEIGHTS_NAME", "Swintormer", "SwintormerConfig", "TransformerBlock", "check_state_dict",
    "load_config_file", "register_preset", "softmax_plus_one", "window_partition", "window_reverse",
]
WINDOWED_ATTENTION = ("mixed", "window", "channel")
# Block family → (attention, feed-forward) used unless the config names another piece.
BLOCK_FAMILIES = {"mixed": ("mixed", "gated"), "sparse_gated": ("topk", "frequency_gated")}


# ----------------------------------------------------------------------------- configuration


class SwintormerConfig(StrictModel):
    """Architecture of a Swintormer network (frozen; an unknown key is an error naming it).
    ``SwintormerConfig.preset("paper")`` is the authors' configuration (25,177,224 parameters).

    ``block`` picks the family: ``mixed`` (the paper's) or ``sparse_gated`` (seed 001, see
    ``sparse_gated.py``). ``attention`` and ``ffn`` name the block's pieces; left out they take
    the family's own, set they swap one piece for ablations: ``attention`` ``mixed`` (half of the
    q/k/v channels to each branch), ``window`` or ``channel`` (all to one branch, still per
    window: the paper's Table 6), or ``topk``; ``ffn`` ``gated`` or ``frequency_gated``. The last
    three fields configure the sparse pieces.
    """

    model_config = ConfigDict(frozen=True)

    in_channels: int = Field(6, ge=3)  # blurry RGB, then the prior's channels if any
    dim: int = Field(48, ge=2, multiple_of=2)  # level-1 width; downsampling halves it
    num_blocks: tuple[int, int, int, int] = (2, 4, 6, 8)
    num_refinement_blocks: int = Field(4, ge=0)
    heads: tuple[int, int, int, int] = (1, 2, 4, 8)
    ffn_expansion_factor: float = Field(2.66, gt=0)
    bias: bool = False
    window_size: int = Field(16, ge=2)
    block: Literal["mixed", "sparse_gated"] = "mixed"
    attention: Literal["mixed", "window", "channel", "topk"] | None = None
    ffn: Literal["gated", "frequency_gated"] | None = None
    topk_fractions: tuple[float, ...] = Field((1 / 2, 2 / 3, 3 / 4, 4 / 5), min_length=1)
    attention_activation: Literal["softmax", "relu2", "mixed"] = "softmax"
    fft_patch_size: int = Field(8, ge=2)

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    @model_validator(mode="before")
    @classmethod
    def _known_keys_and_family_pieces(cls, values: Any) -> Any:
        if isinstance(values, dict):
            unknown = sorted(set(values) - set(cls.model_fields))
            if unknown:
                raise ValueError(f"unknown SwintormerConfig key(s): {', '.join(unknown)}")
            family = BLOCK_FAMILIES.get(values.get("block", "mixed"))
            if family is not None:
                values = {**values, "attention": values.get("attention") or family[0],
                          "ffn": values.get("ffn") or family[1]}
        return values

    @model_validator(mode="after")
    def _shapes_fit(self) -> "SwintormerConfig":
        problems = []
        if min(self.num_blocks) < 1 or min(self.heads) < 1:
            problems.append(f"num_blocks {list(self.num_blocks)} and heads {list(self.heads)} must be positive")
        if not all(0 < f <= 1 for f in self.topk_fractions):
            problems.append(f"topk_fractions must be fractions in (0, 1], got {list(self.topk_fractions)}")
        widths = [self.dim, 2 * self.dim, 4 * self.dim, 8 * self.dim]
        for width, heads in [*zip(widths, self.heads), (2 * self.dim, self.heads[0])]:  # + decoder level 1
            branch = width // 2 if self.attention == "mixed" else width
            if heads >= 1 and branch % heads:
                problems.append(f"{branch} attention channels at width {width} do not split into {heads} heads")
        if problems:
            raise ValueError("; ".join(problems))
        return self

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
        return cls.model_validate(values)

    def to_dict(self) -> dict[str, Any]:
        """JSON values (lists for tuples), the family's pieces resolved: ``config.json``'s format."""
        return self.model_dump(mode="json")


def register_preset(name: str, **fields: Any) -> None:
    """Register a named configuration (validated now, so a bad preset fails at import)."""
    SwintormerConfig(**fields)
    SwintormerConfig.PRESETS[name] = fields


register_preset("paper")  # the authors' configuration for DPDD defocus deblurring
# The reference test vector's configuration (../shared/reference/swintormer_tiny_config.json).
register_preset("tiny", dim=8, num_blocks=(1, 2, 2, 2), num_refinement_blocks=2, heads=(1, 2, 2, 4), window_size=8)
# A CPU-trainable configuration: the paper's shape at a third of its width and fewer blocks.
register_preset("small", dim=16, num_blocks=(1, 2, 2, 4), num_refinement_blocks=2, heads=(1, 2, 4, 8), window_size=8)
# The sparse gated family (seed 001) for GoPro motion deblurring, no prior as in the seed paper:
# the paper's U-Net with FFN expansion 2.4, so that its 25.28 M parameters are about the paper
# preset's. The CPU and test sizes lower the expansion to match `small` (1.59 M) and `tiny`.
register_preset("sparse_gated_gopro", block="sparse_gated", ffn_expansion_factor=2.4, in_channels=3)
register_preset("sparse_gated_small", block="sparse_gated", dim=16, num_blocks=(1, 2, 2, 4), num_refinement_blocks=2,
                heads=(1, 2, 4, 8), window_size=8, ffn_expansion_factor=2.1)
register_preset("sparse_gated_tiny", block="sparse_gated", dim=8, num_blocks=(1, 2, 2, 2), num_refinement_blocks=2,
                heads=(1, 2, 2, 4), window_size=8, ffn_expansion_factor=2.0)


# ----------------------------------------------------------------------------- building blocks


def softmax_plus_one(scores: torch.Tensor) -> torch.Tensor:
    """The authors' attention normalisation: ``exp(s − max) / (1 + Σ exp(s − max))`` per row.

    The extra one lets a row attend to "nothing". Since the row maximum contributes exp(0) = 1
    to the sum, ``Σ = 1 / max(softmax(s))``, so this equals ``softmax(s) / (1 + max softmax(s))``,
    which uses PyTorch's fused (and, under autocast, float32) softmax.
    """
    probs = torch.softmax(scores, dim=-1)
    return probs / (1.0 + probs.amax(dim=-1, keepdim=True))


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """N×C×H×W → (N·nH·nW)×C×w×w, windows in row-major order per image.

    Cut on the N×H×W×C view (as Swin does), so the windows come out in channels-last memory,
    the network's layout, in which PyTorch runs the 1×1 convolutions as oneDNN GEMMs.
    """
    n, c, h, w = x.shape
    x = x.permute(0, 2, 3, 1).reshape(n, h // window, window, w // window, window, c)
    return x.transpose(2, 3).reshape(-1, window, window, c).permute(0, 3, 1, 2)


def window_reverse(windows: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`window_partition`: (N·nH·nW)×C×w×w → N×C×H×W (channels-last)."""
    c, window = windows.shape[1], windows.shape[-1]
    x = windows.permute(0, 2, 3, 1).reshape(-1, height // window, width // window, window, window, c)
    return x.transpose(2, 3).reshape(-1, height, width, c).permute(0, 3, 1, 2)


def shifted_window_mask(height: int, width: int, window: int, shift: int, device=None) -> torch.Tensor:
    """Swin's mask for an H×W map rolled by −shift: nW×w²×w², 0 within a region, −100 across."""
    region = torch.zeros(1, 1, height, width, device=device)
    bands = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for label, (rows, cols) in enumerate((rows, cols) for rows in bands for cols in bands):
        region[:, :, rows, cols] = label
    labels = window_partition(region, window).flatten(1)  # nW × w²
    different = labels.unsqueeze(1) != labels.unsqueeze(2)
    return torch.zeros(different.shape, device=device).masked_fill_(different, -100.0)


def log_spaced_relative_coords(window: int) -> torch.Tensor:
    """Swin V2's continuous position-bias input: (2w−1)×(2w−1)×2 log-spaced relative offsets."""
    offsets = torch.arange(-(window - 1), window, dtype=torch.float32)
    table = torch.stack(torch.meshgrid(offsets, offsets, indexing="ij"), dim=-1)
    table = table / (window - 1) * 8
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)


def relative_position_index(window: int) -> torch.Tensor:
    """w²×w² index into the (2w−1)² offset table for every pair of tokens in a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return relative[..., 0] * (2 * window - 1) + relative[..., 1]


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of an N×C×H×W map, with bias (the authors' ``norm.body``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.body = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GatedFeedForward(nn.Module):
    """1×1 conv to two halves of ``int(dim·factor)`` channels, their product, 1×1 conv back
    (Restormer's GDFN without its depth-wise conv and GELU: the gate is the plain product)."""

    def __init__(self, dim: int, ffn_expansion_factor: float, bias: bool) -> None:
        super().__init__()
        hidden = int(dim * ffn_expansion_factor)
        self.project_in = nn.Conv2d(dim, 2 * hidden, kernel_size=1, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.project_in(x).chunk(2, dim=1)
        return self.project_out(x1 * x2)


class MixedWindowAttention(nn.Module):
    """Shifted-window attention with a spatial and a channel branch ("SWDA + MDTA").

    Windows are cut first; q/k/v come from a 1×1 then a 3×3 depth-wise conv *per window*.
    With ``attention="mixed"`` the first 3c/2 q/k/v channels (q, k, v in thirds) feed the window
    branch and the last 3c/2 the channel branch, both with ``num_heads`` heads; ``window`` or
    ``channel`` give all 3c to one branch.
    """

    def __init__(self, dim: int, num_heads: int, bias: bool, window_size: int, shift_size: int,
                 attention: str = "mixed") -> None:
        super().__init__()
        self.num_heads, self.window_size, self.shift_size, self.attention = num_heads, window_size, shift_size, attention
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 512), nn.ReLU(inplace=True), nn.Linear(512, num_heads, bias=False))
        self.register_buffer("relative_coords_table", log_spaced_relative_coords(window_size), persistent=False)
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=False)
        self.qkv = nn.Conv2d(dim, 3 * dim, kernel_size=1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(3 * dim, 3 * dim, kernel_size=3, padding=1, groups=3 * dim, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)

    def position_bias(self) -> torch.Tensor:
        """``16·sigmoid(cpb_mlp(coords))`` for every pair of tokens in a window: heads×w²×w²."""
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        tokens = self.window_size**2
        bias = table[self.relative_position_index.view(-1)].view(tokens, tokens, -1).permute(2, 0, 1)
        return 16 * torch.sigmoid(bias)

    def window_attention(self, qkv: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Cosine attention among a window's tokens (Swin V2): B×w²×3c' q/k/v → B×w²×c'."""
        b, tokens, _ = qkv.shape
        q, k, v = qkv.view(b, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # B×heads×w²×d each
        scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        scores = scores * torch.clamp(self.logit_scale, max=math.log(100.0)).exp() + self.position_bias()
        if mask is not None:  # nW×w²×w², the same for every image of the batch
            scores = (scores.view(-1, mask.shape[0], *scores.shape[1:]) + mask.unsqueeze(1)).view_as(scores)
        out = softmax_plus_one(scores) @ v  # B×heads×w²×d
        return out.transpose(1, 2).reshape(b, tokens, -1)

    def channel_attention(self, qkv: torch.Tensor) -> torch.Tensor:
        """Transposed attention (MDTA) among a window's channels: B×w²×3c' q/k/v → B×w²×c'.

        q and k are normalised along the token axis; the per-head d×d map has no temperature.
        """
        b, tokens, _ = qkv.shape
        q, k, v = qkv.view(b, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 4, 1)  # B×heads×d×w² each
        scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        out = softmax_plus_one(scores) @ v  # B×heads×d×w²
        return out.permute(0, 3, 1, 2).reshape(b, tokens, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, height, width = x.shape
        window, shift = self.window_size, self.shift_size
        if shift > 0:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(2, 3))
        windows = window_partition(x, window)
        # Zero padding of the depth-wise conv happens at each window's border, as in the reference.
        qkv = self.qkv_dwconv(self.qkv(windows)).flatten(2).transpose(1, 2)  # (N·nW)×w²×3c
        mask = shifted_window_mask(height, width, window, shift, x.device) if shift > 0 else None
        if self.attention == "mixed":
            spatial, channel = qkv.chunk(2, dim=-1)
            out = torch.cat([self.window_attention(spatial, mask), self.channel_attention(channel)], dim=-1)
        elif self.attention == "window":
            out = self.window_attention(qkv, mask)
        else:
            out = self.channel_attention(qkv)
        out = self.project_out(out.transpose(1, 2).reshape(-1, c, window, window))
        out = window_reverse(out, height, width)
        if shift > 0:
            out = torch.roll(out, shifts=(shift, shift), dims=(2, 3))
        return out


class TransformerBlock(nn.Module):
    """``x + attn(LN(x))`` then ``x + ffn(LN(x))``, the pieces named by the config. Within a
    stage, blocks at odd index shift their windows by half a window (windowed attention only)."""

    def __init__(self, config: SwintormerConfig, dim: int, num_heads: int, shift_size: int = 0) -> None:
        super().__init__()
        self.norm1 = ChannelLayerNorm(dim)
        if config.attention == "topk":
            self.attn: nn.Module = TopKChannelAttention(dim, num_heads, config.bias, config.topk_fractions,
                                                        activation=config.attention_activation)
        else:
            self.attn = MixedWindowAttention(dim, num_heads, config.bias, config.window_size, shift_size, config.attention)
        self.norm2 = ChannelLayerNorm(dim)
        if config.ffn == "frequency_gated":
            self.ffn: nn.Module = FrequencyGatedFeedForward(dim, config.ffn_expansion_factor, config.bias,
                                                            patch_size=config.fft_patch_size)
        else:
            self.ffn = GatedFeedForward(dim, config.ffn_expansion_factor, config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class PatchEmbed(nn.Module):
    """Pixel-unshuffle by 2 (C → 4C channels), then a 3×3 conv to ``dim``."""

    def __init__(self, in_channels: int, dim: int, bias: bool) -> None:
        super().__init__()
        self.proj = nn.PixelUnshuffle(2)
        self.proj2 = nn.Conv2d(4 * in_channels, dim, kernel_size=3, padding=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj2(self.proj(x))


class Downsample(nn.Module):
    """3×3 conv c → c/2, then pixel-unshuffle 2: half the resolution, twice the channels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels // 2, 3, padding=1, bias=False), nn.PixelUnshuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Upsample(nn.Module):
    """3×3 conv c → 2c, then pixel-shuffle 2: twice the resolution, half the channels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, 2 * channels, 3, padding=1, bias=False), nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


# ----------------------------------------------------------------------------- the network


class Swintormer(PretrainedMixin, nn.Module):
    """The Swintormer U-Net. ``model(x)``: N×C×H×W in [0, 1] (C = ``config.in_channels``:
    blurry RGB first, then the prior) → N×3×H×W deblurred RGB, for any H and W.
    ``save_pretrained`` / ``from_pretrained`` write and read a model folder (``pretrained.py``)."""

    config_class, model_type = SwintormerConfig, "swintormer"

    # Stages the authors wrap in activation checkpointing (all but encoder level 1).
    CHECKPOINTED_STAGES = ("encoder_level2", "encoder_level3", "latent", "decoder_level3", "decoder_level2",
                           "decoder_level1", "refinement")

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
        self.reduce_chan_level3 = nn.Conv2d(8 * dim, 4 * dim, kernel_size=1, bias=config.bias)
        self.decoder_level3 = stage(4 * dim, heads[2], config.num_blocks[2])
        self.up3_2 = Upsample(4 * dim)
        self.reduce_chan_level2 = nn.Conv2d(4 * dim, 2 * dim, kernel_size=1, bias=config.bias)
        self.decoder_level2 = stage(2 * dim, heads[1], config.num_blocks[1])
        self.up2_1 = Upsample(2 * dim)
        # Level 1 keeps the concatenated 2·dim channels: no reduction conv.
        self.decoder_level1 = stage(2 * dim, heads[0], config.num_blocks[0])
        self.refinement = stage(2 * dim, heads[0], config.num_refinement_blocks)
        self.skip_conv = nn.Conv2d(dim, 2 * dim, kernel_size=1, bias=config.bias)
        self.apply(_init_weights)
        # Created after the init above, as in the reference, so it keeps PyTorch's default init.
        self.output = nn.Sequential(nn.Conv2d(2 * dim, 12, kernel_size=3, padding=1, bias=False), nn.PixelShuffle(2))
        channels_last_pointwise_weights(self)

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
            raise ValueError(f"Swintormer expects N×{self.config.in_channels}×H×W input, got shape {tuple(x.shape)}")
        height, width = x.shape[-2:]
        x = pad_to_multiple(2 * x - 1, self.config.size_multiple)
        # Channels-last memory: LayerNorm's N×H×W×C view is contiguous and PyTorch runs the 1×1
        # convolutions as oneDNN GEMMs; the logical shape stays N×C×H×W. The 1×1 and depth-wise
        # weights are channels-last too (channels_last_pointwise_weights), so that their gradients
        # come back with the weights' own strides.
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


def load_config_file(path: str | os.PathLike) -> SwintormerConfig:
    """Read a ``config.json`` written by :meth:`Swintormer.save_pretrained`."""
    return Swintormer.load_config_file(path)


def channels_last_pointwise_weights(module: nn.Module) -> None:
    """Give every convolution weight of ``module`` whose channels-last layout is the same memory
    as its default layout (1×1 kernels, depth-wise kernels: one input channel per group)
    channels-last strides. The values and the memory order do not change; only the strides of
    the size-one dimensions do.

    Why: the network computes in channels-last memory, and with a default-layout weight the
    strides of its gradient depend on the kernel PyTorch picks: oneDNN's (depth-wise always; 1×1
    for many windows or several threads) returns channels-last strides, PyTorch's native 1×1
    kernel default ones. Autograd accepts a gradient whose strides differ in size-one dimensions
    only, but DDP lays its gradient buckets out with the weight's strides and compares all of
    them, and warned "Grad strides do not match bucket view strides" for these weights. With a
    channels-last weight both CPU kernels return channels-last strides, the weight's own, for
    every batch and thread count tried (tests/test_gradient_layout.py); PyTorch chooses the
    memory format of a convolution from its input and weight on the GPU too, so the same is
    expected there (not measured). Larger kernels over several input channels keep the default
    layout: autograd puts their gradients in it, and safetensors and the CPU engine expect
    contiguous weights, which these (unlike a channels-last 3×3 weight) still are.
    """
    with torch.no_grad():
        for conv in module.modules():
            if not isinstance(conv, nn.Conv2d):
                continue
            weight = conv.weight
            channels_last = torch.empty(weight.shape, memory_format=torch.channels_last, device="meta").stride()
            same_memory = weight.is_contiguous() and all(
                ours == theirs for ours, theirs, size in zip(weight.stride(), channels_last, weight.shape) if size != 1)
            if same_memory and weight.stride() != channels_last:
                weight.data = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device,
                                          memory_format=torch.channels_last).copy_(weight)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
