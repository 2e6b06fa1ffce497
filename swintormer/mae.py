"""The MAE ViT-B/16 encoder used by the MAE perceptual losses (He et al. 2022's encoder, as
Liang et al.'s "Image Deblurring by Exploring In-depth Properties of Transformer" uses it), written out plainly.

The authors' loss builds the encoder of the MAE release (``mae_pretrain_vit_base.pth``) with a
model class that only runs on an old timm. This module is a small pre-norm ViT whose parameter
names are the MAE release's encoder names (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``), so loading the release
is a filter: the decoder (``decoder_*``, ``mask_token``) is dropped and every encoder key must
be present. It runs on any square crop that is a multiple of 16: the 14×14 position grid of
the release is resized bicubically to the crop's grid.

Only what the losses need is here: embed patches, add positions, keep a subset of tokens
(the random mask), prepend CLS, run blocks and return the outputs of the requested blocks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MAEEncoderConfig", "MAEEncoder", "load_mae_encoder", "MissingWeightsError"]


class MissingWeightsError(FileNotFoundError):
    """A pretrained backbone file named in the configuration is not there."""


@dataclass(frozen=True)
class MAEEncoderConfig:
    """ViT-B/16 by default (the MAE release); tests build a narrow, shallow one."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 16
    pretrain_grid: int = 14  # the release was trained at 224 px: a 14×14 position grid


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # N × tokens × dim, row-major grid


class MAEEncoder(nn.Module):
    """The MAE encoder; :meth:`block_features` is what the perceptual losses call."""

    def __init__(self, config: MAEEncoderConfig = MAEEncoderConfig()) -> None:
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.patch_embed = _PatchEmbed(config.patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + config.pretrain_grid**2, dim))
        self.blocks = nn.ModuleList(_Block(dim, config.num_heads, config.mlp_ratio) for _ in range(config.depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)  # loaded for completeness; the losses stop before it
        self._grid_cache: dict[tuple[int, int], torch.Tensor] = {}
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)

    def _load_from_state_dict(self, *args, **kwargs):  # noqa: D401 - keep cache coherent with weights
        self._grid_cache.clear()
        return super()._load_from_state_dict(*args, **kwargs)

    def patch_positions(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Position embedding of the patch tokens for a ``grid_h × grid_w`` grid (bicubic resize)."""
        key = (grid_h, grid_w)
        cached = self._grid_cache.get(key)
        if cached is not None and cached.device == self.pos_embed.device and cached.dtype == self.pos_embed.dtype:
            return cached
        side = self.config.pretrain_grid
        grid = self.pos_embed[:, 1:].detach().reshape(1, side, side, -1).permute(0, 3, 1, 2)
        if (grid_h, grid_w) != (side, side):
            grid = F.interpolate(grid.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        positions = grid.to(self.pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
        self._grid_cache[key] = positions
        return positions

    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised images N×3×H×W (H = W, multiple of the patch) → tokens with positions."""
        _, _, height, width = images.shape
        patch = self.config.patch_size
        if height != width or height % patch:
            raise ValueError(f"MAE features need square crops whose side is a multiple of {patch}, got {height}×{width}")
        return self.patch_embed(images) + self.patch_positions(height // patch, width // patch)

    def block_features(self, tokens: torch.Tensor, blocks: list[int]) -> list[torch.Tensor]:
        """Prepend CLS to (already masked) patch tokens, run the blocks, return the outputs of ``blocks``.

        ``blocks`` are 1-based block numbers; the encoder runs only as deep as the last one.
        """
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1)
        wanted = set(blocks)
        outputs = []
        for number, block in enumerate(self.blocks[: max(blocks)], start=1):
            x = block(x)
            if number in wanted:
                outputs.append(x)
        return outputs


def load_mae_encoder(path: str | os.PathLike[str], config: MAEEncoderConfig = MAEEncoderConfig()) -> MAEEncoder:
    """Build the encoder and load the MAE release file (``{"model": state_dict}``), encoder keys only."""
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(f"MAE weights file not found: {path} (mae_pretrain_vit_base.pth of the MAE release)")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not an MAE checkpoint (expected a dict with key 'model')")
    encoder = MAEEncoder(config)
    wanted = encoder.state_dict()
    encoder_state = {k: v for k, v in state.items() if k in wanted}
    missing = sorted(set(wanted) - set(encoder_state))
    if missing:
        raise ValueError(f"{path}: not an MAE ViT encoder of this size; missing {missing[:4]}")
    for key, value in encoder_state.items():
        if value.shape != wanted[key].shape:
            raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, expected {tuple(wanted[key].shape)}")
    encoder.load_state_dict(encoder_state)
    return encoder
