"""Stage-two training losses (L1, VGG perceptual, and the MAE perceptual losses of Liang et al.,
"Image Deblurring by Exploring In-depth Properties of Transformer"), combinable with weights from the config.

- ``l1``: mean absolute error on pixels (the paper's loss).
- ``vgg``: VGG-19 perceptual loss: weighted L1 between VGG-19 feature maps of output and
  target at named layers (``conv1_1`` … ``conv5_4``; the conv outputs, before their ReLU),
  inputs normalised with the ImageNet mean and std. Weights come from torchvision's
  ``vgg19-dcbbe01f.pth`` layout (``features.N.weight``); torchvision itself is not needed.
- ``mae_local`` and ``mae_distribution``: the MAE perceptual losses of seed 000, computed from
  one pass of the frozen MAE encoder over output and target (:class:`MAEPerceptualLoss`).

Backbones load only from local files named in the config; :func:`build_loss` checks them all
before training starts and raises :class:`MissingWeightsError` naming the missing file. The
``allow_random_weights`` switch builds random backbones (for tests and smoke runs only).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from swintormer.core.config import StrictModel
from swintormer.mae import MAEEncoder, MAEEncoderConfig, MissingWeightsError, load_mae_encoder

__all__ = [
    "MissingWeightsError",
    "VGG19Features",
    "VGG_LAYER_NAMES",
    "load_vgg19",
    "VGGPerceptualLoss",
    "token_wasserstein",
    "sliced_wasserstein",
    "MAEPerceptualLoss",
    "VGGLossConfig",
    "MAELossConfig",
    "LossConfig",
    "CombinedLoss",
    "build_loss",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_normalize(images: torch.Tensor) -> torch.Tensor:
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


# --------------------------------------------------------------------------- VGG-19

_VGG19_PLAN = [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]]


def _vgg_layer_names() -> list[str]:
    """Names of ``features`` children in torchvision's order: conv, relu per conv, pool per stage."""
    names = []
    for stage, convs in enumerate(_VGG19_PLAN, start=1):
        for index in range(1, len(convs) + 1):
            names += [f"conv{stage}_{index}", f"relu{stage}_{index}"]
        names.append(f"pool{stage}")
    return names


VGG_LAYER_NAMES: list[str] = _vgg_layer_names()


class VGG19Features(nn.Module):
    """The convolutional part of VGG-19; ``features.N`` matches torchvision's state-dict keys."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for convs in _VGG19_PLAN:
            for width in convs:
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=False)]
                channels = width
            layers.append(nn.MaxPool2d(2, 2))
        self.features = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor, layers: list[str]) -> dict[str, torch.Tensor]:
        """Feature maps of the named layers for already-normalised images (runs only as deep as needed)."""
        wanted = set(layers)
        last = max(VGG_LAYER_NAMES.index(name) for name in wanted)
        outputs = {}
        x = images
        for index in range(last + 1):
            x = self.features[index](x)
            if VGG_LAYER_NAMES[index] in wanted:
                outputs[VGG_LAYER_NAMES[index]] = x
        return outputs


def load_vgg19(path: str | os.PathLike[str]) -> VGG19Features:
    """VGG-19 features from torchvision's ImageNet file (``features.*`` keys; the classifier is dropped)."""
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(f"VGG-19 weights file not found: {path} (torchvision's vgg19-dcbbe01f.pth)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = VGG19Features()
    wanted = model.state_dict()
    features = {k: v for k, v in state.items() if k in wanted}
    missing = sorted(set(wanted) - set(features))
    if missing:
        raise ValueError(f"{path}: not a VGG-19 state dict; missing {missing[:4]}")
    model.load_state_dict(features)
    return model


class VGGPerceptualLoss(nn.Module):
    """``Σ_layers weight · mean|φ_l(output) − φ_l(target)|`` (or squared with ``criterion="l2"``)."""

    def __init__(self, features: VGG19Features, layer_weights: dict[str, float],
                 criterion: Literal["l1", "l2"] = "l1") -> None:
        super().__init__()
        unknown = [name for name in layer_weights if name not in VGG_LAYER_NAMES]
        if unknown:
            raise ValueError(f"unknown VGG-19 layer(s) {unknown}; names look like conv3_1 or relu4_2")
        self.features = features.eval().requires_grad_(False)
        self.layer_weights = dict(layer_weights)
        self.criterion = criterion

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        layers = list(self.layer_weights)
        out_features = self.features(imagenet_normalize(output), layers)
        with torch.no_grad():
            target_features = self.features(imagenet_normalize(target), layers)
        total = output.new_zeros(())
        for name, weight in self.layer_weights.items():
            diff = out_features[name] - target_features[name]
            total = total + weight * (diff.abs().mean() if self.criterion == "l1" else diff.pow(2).mean())
        return total

    def train(self, mode: bool = True) -> "VGGPerceptualLoss":
        super().train(mode)
        self.features.eval()  # frozen backbone: always in eval mode
        return self


# --------------------------------------------------------------------------- Wasserstein


def _root(mean_power: torch.Tensor, p: float) -> torch.Tensor:
    """``mean_power ** (1/p)`` with a zero (not NaN) gradient where ``mean_power`` is 0."""
    positive = mean_power > 0
    safe = torch.where(positive, mean_power, torch.ones_like(mean_power))
    return torch.where(positive, safe.pow(1.0 / p), torch.zeros_like(mean_power))


def token_wasserstein(output: torch.Tensor, target: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Per-token p-Wasserstein distance between channel-value distributions, summed over tokens.

    ``output`` and ``target`` are N×T×C token features. For token position ``t`` the C channel
    values are sorted in both (two equal-size 1-D samples; the sorted difference is their
    optimal transport) and ``(mean |Δ|^p)^(1/p)`` is taken, the mean running over the channels
    and, as in the authors' code (``F.mse_loss`` over the N×C values of one token position),
    over the batch; the results are summed over the T positions. With p = 2 and N = 1 this is
    as in the authors' published code: the square root of the mean squared difference of the sorted vectors.
    """
    if output.shape != target.shape or output.dim() != 3:
        raise ValueError(f"expected two N×T×C tensors of one shape, got {tuple(output.shape)} and {tuple(target.shape)}")
    diff = (torch.sort(output, dim=-1).values - torch.sort(target, dim=-1).values).abs()
    return _root(diff.pow(p).mean(dim=(0, 2)), p).sum()


def sliced_wasserstein(output: torch.Tensor, target: torch.Tensor, p: float = 2.0,
                       num_projections: int = 128, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sliced p-Wasserstein distance between the *sets of tokens* of output and target.

    Each image's T tokens are points in R^C; both sets are projected on the same
    ``num_projections`` random unit directions, each 1-D projection is sorted across tokens and
    ``(mean_t |Δ|^p)^(1/p)`` is taken; the result is averaged over directions and images.
    """
    if output.shape != target.shape or output.dim() != 3:
        raise ValueError(f"expected two N×T×C tensors of one shape, got {tuple(output.shape)} and {tuple(target.shape)}")
    directions = torch.randn(output.shape[-1], num_projections, generator=generator,
                             dtype=torch.float32, device="cpu").to(device=output.device, dtype=output.dtype)
    directions = directions / directions.norm(dim=0, keepdim=True)
    out_proj = torch.sort(output @ directions, dim=1).values
    target_proj = torch.sort(target @ directions, dim=1).values
    return _root((out_proj - target_proj).abs().pow(p).mean(dim=1), p).mean()


# --------------------------------------------------------------------------- MAE losses


class MAEPerceptualLoss(nn.Module):
    """MAE local (Euclidean) and distribution (Wasserstein) losses from one encoder pass.

    As the authors' code: ImageNet-normalised inputs at the crop size; patch tokens with positions; one
    random mask keeping ``1 − mask_ratio`` of the tokens, shared by output and target; CLS
    prepended; features = outputs of encoder blocks ``blocks`` (1-based; default 1–6).
    ``local`` = Σ_blocks mean|f_out − f_target|; ``distribution`` = Σ_blocks
    :func:`token_wasserstein` (or :func:`sliced_wasserstein` with ``sliced=True``).
    The weights (authors: 0.1 local, 1e-4 distribution) are applied by :class:`CombinedLoss`.
    """

    def __init__(self, encoder: MAEEncoder, blocks: list[int], mask_ratio: float = 0.5, p: float = 2.0,
                 sliced: bool = False, num_projections: int = 128, compute_local: bool = True,
                 compute_distribution: bool = True) -> None:
        super().__init__()
        if not blocks or min(blocks) < 1 or max(blocks) > len(encoder.blocks):
            raise ValueError(f"MAE blocks must be in 1..{len(encoder.blocks)}, got {blocks}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.encoder = encoder.eval().requires_grad_(False)
        self.blocks = sorted(set(blocks))
        self.mask_ratio = mask_ratio
        self.p = p
        self.sliced = sliced
        self.num_projections = num_projections
        self.compute_local = compute_local
        self.compute_distribution = compute_distribution

    def train(self, mode: bool = True) -> "MAEPerceptualLoss":
        super().train(mode)
        self.encoder.eval()
        return self

    def keep_indices(self, batch: int, tokens: int, device: torch.device) -> torch.Tensor | None:
        """Random token positions to keep (as MAE's random masking: argsort of uniform noise)."""
        if self.mask_ratio == 0.0:
            return None
        keep = int(tokens * (1.0 - self.mask_ratio))
        noise = torch.rand(batch, tokens, device=device)
        return torch.argsort(noise, dim=1)[:, :keep]

    def features(self, output: torch.Tensor, target: torch.Tensor,
                 keep: torch.Tensor | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Block features of output (with grad) and target (without), same kept positions in both."""

        def encode(images: torch.Tensor) -> list[torch.Tensor]:
            tokens = self.encoder.patch_tokens(imagenet_normalize(images))
            if keep is not None:
                tokens = torch.gather(tokens, 1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
            return self.encoder.block_features(tokens, self.blocks)

        out_features = encode(output)
        with torch.no_grad():
            target_features = encode(target)
        return out_features, target_features

    def forward(self, output: torch.Tensor, target: torch.Tensor,
                keep: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if keep is None:
            patch = self.encoder.config.patch_size
            tokens = (output.shape[-2] // patch) * (output.shape[-1] // patch)
            keep = self.keep_indices(output.shape[0], tokens, output.device)
        out_features, target_features = self.features(output, target, keep)
        parts: dict[str, torch.Tensor] = {}
        if self.compute_local:
            parts["mae_local"] = sum((a - b).abs().mean() for a, b in zip(out_features, target_features))
        if self.compute_distribution:
            if self.sliced:
                parts["mae_distribution"] = sum(sliced_wasserstein(a, b, self.p, self.num_projections)
                                                for a, b in zip(out_features, target_features))
            else:
                parts["mae_distribution"] = sum(token_wasserstein(a, b, self.p)
                                                for a, b in zip(out_features, target_features))
        return parts


# --------------------------------------------------------------------------- config + combination


class VGGLossConfig(StrictModel):
    weight: float = Field(1.0, ge=0)
    weights_path: Path | None = None  # torchvision's vgg19-dcbbe01f.pth
    layers: dict[str, float] = Field(default_factory=lambda: {
        "conv1_1": 1.0, "conv2_1": 1.0, "conv3_1": 1.0, "conv4_1": 1.0, "conv5_4": 1.0})
    criterion: Literal["l1", "l2"] = "l1"

    @field_validator("layers")
    @classmethod
    def _known_layers(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = [name for name in value if name not in VGG_LAYER_NAMES]
        if unknown:
            raise ValueError(f"unknown VGG-19 layer(s) {unknown}")
        if not value:
            raise ValueError("at least one layer is needed")
        return value


class MAEEncoderSettings(StrictModel):
    embed_dim: int = Field(768, gt=0)
    depth: int = Field(12, gt=0)
    num_heads: int = Field(12, gt=0)


class MAELossConfig(StrictModel):
    """Both MAE losses; the authors' final setting is local 0.1, distribution 0 (or 1e-4 alone)."""

    weights_path: Path | None = None  # mae_pretrain_vit_base.pth
    local_weight: float = Field(0.1, ge=0)
    distribution_weight: float = Field(0.0, ge=0)
    blocks: list[int] = Field(default_factory=lambda: [1, 2, 3, 4, 5, 6])
    mask_ratio: float = Field(0.5, ge=0, lt=1)
    p: float = Field(2.0, ge=1)
    sliced: bool = False
    num_projections: int = Field(128, gt=0)
    encoder: MAEEncoderSettings = Field(default_factory=MAEEncoderSettings)


class LossConfig(StrictModel):
    l1: float = Field(1.0, ge=0)
    vgg: VGGLossConfig | None = None
    mae: MAELossConfig | None = None
    allow_random_weights: bool = False  # tests / smoke runs only: random backbones when no file is given


class CombinedLoss(nn.Module):
    """``l1·L1 + vgg.weight·VGG + mae.local_weight·local + mae.distribution_weight·distribution``.

    ``forward`` returns the total and the weighted parts (detached) for logging.
    """

    def __init__(self, l1_weight: float, vgg: VGGPerceptualLoss | None = None, vgg_weight: float = 0.0,
                 mae: MAEPerceptualLoss | None = None, mae_local_weight: float = 0.0,
                 mae_distribution_weight: float = 0.0) -> None:
        super().__init__()
        self.l1_weight = l1_weight
        self.vgg = vgg
        self.vgg_weight = vgg_weight
        self.mae = mae
        self.mae_local_weight = mae_local_weight
        self.mae_distribution_weight = mae_distribution_weight

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts: dict[str, torch.Tensor] = {}
        if self.l1_weight:
            parts["l1"] = self.l1_weight * F.l1_loss(output, target)
        if self.vgg is not None and self.vgg_weight:
            parts["vgg"] = self.vgg_weight * self.vgg(output, target)
        if self.mae is not None:
            weights = {"mae_local": self.mae_local_weight, "mae_distribution": self.mae_distribution_weight}
            for name, value in self.mae(output, target).items():
                parts[name] = weights[name] * value
        if not parts:
            raise ValueError("every loss weight is zero")
        total = sum(parts.values())
        return total, {name: value.detach() for name, value in parts.items()}


def build_loss(config: LossConfig) -> CombinedLoss:
    """Build the configured loss; missing backbone files fail here, before any training."""
    vgg = None
    if config.vgg is not None and config.vgg.weight > 0:
        features = _backbone(config.vgg.weights_path, "loss.vgg.weights_path", load_vgg19, VGG19Features,
                             config.allow_random_weights)
        vgg = VGGPerceptualLoss(features, config.vgg.layers, config.vgg.criterion)
    mae = None
    settings = config.mae
    if settings is not None and (settings.local_weight > 0 or settings.distribution_weight > 0):
        encoder_config = MAEEncoderConfig(embed_dim=settings.encoder.embed_dim, depth=settings.encoder.depth,
                                          num_heads=settings.encoder.num_heads)
        encoder = _backbone(settings.weights_path, "loss.mae.weights_path",
                            lambda path: load_mae_encoder(path, encoder_config),
                            lambda: MAEEncoder(encoder_config), config.allow_random_weights)
        mae = MAEPerceptualLoss(encoder, settings.blocks, settings.mask_ratio, settings.p, settings.sliced,
                                settings.num_projections, compute_local=settings.local_weight > 0,
                                compute_distribution=settings.distribution_weight > 0)
    return CombinedLoss(config.l1, vgg, config.vgg.weight if config.vgg else 0.0, mae,
                        settings.local_weight if settings else 0.0, settings.distribution_weight if settings else 0.0)


def _backbone(path: Path | None, key: str, load, build_random, allow_random: bool) -> nn.Module:
    if path is not None:
        return load(path)
    if allow_random:
        return build_random()
    raise MissingWeightsError(f"{key} is not set: the pretrained backbone file is needed "
                              "(loss.allow_random_weights=true builds random weights, for tests only)")
