"""Loading an original CompVis latent-diffusion checkpoint (``model.ckpt``) into a :class:`PriorModel`.

The CompVis checkpoint holds the denoiser under ``model.diffusion_model.*`` (the
``openaimodel.UNetModel`` key names) and the VQGAN under ``first_stage_model.*`` (the
taming-transformers ``Encoder``/``Decoder`` key names). :func:`compvis_key_plan` lists, for a
given :class:`PriorConfig`, every original key and the diffusers key(s) it becomes:

* UNet: ``input_blocks.N`` / ``middle_block`` / ``output_blocks.N`` / ``time_embed`` / ``out``
  to ``down_blocks`` / ``mid_block`` / ``up_blocks`` / ``time_embedding`` / ``conv_norm_out``,
  ``conv_out``; residual blocks' ``in_layers.0/2``, ``emb_layers.1``, ``out_layers.0/3``,
  ``skip_connection`` to ``norm1``, ``conv1``, ``time_emb_proj``, ``norm2``, ``conv2``,
  ``conv_shortcut``.
* UNet attention (which diffusers' ``convert_ldm_unet_checkpoint`` does not map to CompVis'
  ``QKVAttentionLegacy``): the fused 1-D conv ``qkv`` is interleaved per head (legacy QKV
  order: for each head, its q, k, v rows), so it is reshaped to heads x 3*head_dim, split, and
  the 1-D conv weights squeezed to linear weights;
  ``norm`` becomes ``group_norm`` and ``proj_out`` becomes ``to_out.0``.
* VQ: ``down.i.block.j`` / ``up.(L-1-k).block.j`` / ``mid.block_1|attn_1|block_2`` /
  ``nin_shortcut`` / ``downsample`` / ``upsample`` to their diffusers names; the 1x1 conv
  ``q``, ``k``, ``v``, ``proj_out`` of the mid attention squeezed to linear weights;
  ``quantize.embedding.weight``, ``quant_conv`` and ``post_quant_conv`` are copied as they are.

The load is strict: every key of both models must be present with the right shape (a clear
error names the first missing or mismatched one). :func:`to_compvis_state_dict` is the inverse
(used to write CompVis-format checkpoints of models built here).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm_prior.model import PriorConfig, PriorModel

UNET_PREFIX = "model.diffusion_model."
VQ_PREFIX = "first_stage_model."


@dataclass(frozen=True)
class KeyMap:
    """One original tensor and the diffusers tensor(s) it becomes.

    ``kind``: ``copy``; ``squeeze`` (1-D or 1x1 conv weight to linear weight); ``qkv`` (fused
    legacy-order attention projection to ``to_q``, ``to_k``, ``to_v``; ``targets`` has three names).
    """

    source: str
    targets: tuple[str, ...]
    kind: str = "copy"
    heads: int = 1


def _pairs(source: str, target: str, names: dict[str, str]) -> list[KeyMap]:
    plan = []
    for old, new in names.items():
        for suffix in ("weight", "bias"):
            plan.append(KeyMap(f"{source}.{old}.{suffix}", (f"{target}.{new}.{suffix}",)))
    return plan


def _unet_resnet(source: str, target: str, has_shortcut: bool) -> list[KeyMap]:
    names = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
             "out_layers.0": "norm2", "out_layers.3": "conv2"}
    if has_shortcut:
        names["skip_connection"] = "conv_shortcut"
    return _pairs(source, target, names)


def _unet_attention(source: str, target: str, heads: int) -> list[KeyMap]:
    plan = _pairs(source, target, {"norm": "group_norm"})
    for suffix in ("weight", "bias"):
        plan.append(KeyMap(f"{source}.qkv.{suffix}", tuple(f"{target}.{name}.{suffix}" for name in ("to_q", "to_k", "to_v")), "qkv", heads))
    plan.append(KeyMap(f"{source}.proj_out.weight", (f"{target}.to_out.0.weight",), "squeeze"))
    plan.append(KeyMap(f"{source}.proj_out.bias", (f"{target}.to_out.0.bias",)))
    return plan


def _unet_plan(config: PriorConfig) -> list[KeyMap]:
    spec = config.unet
    widths, layers, levels = spec.block_out_channels, spec.layers_per_block, len(spec.block_out_channels)
    heads_of = [width // spec.attention_head_dim for width in widths]
    attention_down = ["Attn" in kind for kind in spec.down_block_types]
    attention_up = ["Attn" in kind for kind in spec.up_block_types]
    plan = _pairs("time_embed", "time_embedding", {"0": "linear_1", "2": "linear_2"})
    plan += _pairs("input_blocks.0", "", {"0": "conv_in"})
    index = 1
    channels = widths[0]
    for level in range(levels):
        for layer in range(layers):
            source, target = f"input_blocks.{index}", f"down_blocks.{level}"
            plan += _unet_resnet(f"{source}.0", f"{target}.resnets.{layer}", channels != widths[level])
            if attention_down[level]:
                plan += _unet_attention(f"{source}.1", f"{target}.attentions.{layer}", heads_of[level])
            channels = widths[level]
            index += 1
        if level < levels - 1:
            plan += _pairs(f"input_blocks.{index}.0", f"down_blocks.{level}", {"op": "downsamplers.0.conv"})
            index += 1
    plan += _unet_resnet("middle_block.0", "mid_block.resnets.0", False)
    plan += _unet_attention("middle_block.1", "mid_block.attentions.0", heads_of[-1])
    plan += _unet_resnet("middle_block.2", "mid_block.resnets.1", False)

    # Skip widths in the order the up path consumes them (last pushed, first popped).
    skips = [widths[0]]
    for level in range(levels):
        skips += [widths[level]] * layers
        if level < levels - 1:
            skips.append(widths[level])
    index = 0
    channels = widths[-1]
    for up_level in range(levels):
        width = widths[levels - 1 - up_level]
        for layer in range(layers + 1):
            source, target = f"output_blocks.{index}", f"up_blocks.{up_level}"
            plan += _unet_resnet(f"{source}.0", f"{target}.resnets.{layer}", channels + skips.pop() != width)
            channels = width
            position = 1
            if attention_up[up_level]:
                plan += _unet_attention(f"{source}.1", f"{target}.attentions.{layer}", heads_of[levels - 1 - up_level])
                position = 2
            if layer == layers and up_level < levels - 1:
                plan += _pairs(f"{source}.{position}", target, {"conv": "upsamplers.0.conv"})
            index += 1
    plan += _pairs("out", "", {"0": "conv_norm_out", "2": "conv_out"})
    return [KeyMap(UNET_PREFIX + item.source, tuple(t.lstrip(".") for t in item.targets), item.kind, item.heads) for item in plan]


def _vq_resnet(source: str, target: str, has_shortcut: bool) -> list[KeyMap]:
    names = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2"}
    if has_shortcut:
        names["nin_shortcut"] = "conv_shortcut"
    return _pairs(source, target, names)


def _vq_mid(source: str, target: str) -> list[KeyMap]:
    plan = _vq_resnet(f"{source}.block_1", f"{target}.resnets.0", False)
    plan += _pairs(f"{source}.attn_1", f"{target}.attentions.0", {"norm": "group_norm"})
    for old, new in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        plan.append(KeyMap(f"{source}.attn_1.{old}.weight", (f"{target}.attentions.0.{new}.weight",), "squeeze"))
        plan.append(KeyMap(f"{source}.attn_1.{old}.bias", (f"{target}.attentions.0.{new}.bias",)))
    plan += _vq_resnet(f"{source}.block_2", f"{target}.resnets.1", False)
    return plan


def _vq_plan(config: PriorConfig) -> list[KeyMap]:
    spec = config.vqvae
    widths, layers, levels = spec.block_out_channels, spec.layers_per_block, len(spec.block_out_channels)
    plan = _pairs("encoder", "encoder", {"conv_in": "conv_in", "norm_out": "conv_norm_out", "conv_out": "conv_out"})
    channels = widths[0]
    for level in range(levels):
        for layer in range(layers):
            plan += _vq_resnet(f"encoder.down.{level}.block.{layer}", f"encoder.down_blocks.{level}.resnets.{layer}", channels != widths[level])
            channels = widths[level]
        if level < levels - 1:
            plan += _pairs(f"encoder.down.{level}", f"encoder.down_blocks.{level}", {"downsample.conv": "downsamplers.0.conv"})
    plan += _vq_mid("encoder.mid", "encoder.mid_block")
    plan += _pairs("decoder", "decoder", {"conv_in": "conv_in", "norm_out": "conv_norm_out", "conv_out": "conv_out"})
    plan += _vq_mid("decoder.mid", "decoder.mid_block")
    channels = widths[-1]
    for up_level in range(levels):
        original_level = levels - 1 - up_level
        width = widths[original_level]
        for layer in range(layers + 1):
            plan += _vq_resnet(f"decoder.up.{original_level}.block.{layer}", f"decoder.up_blocks.{up_level}.resnets.{layer}", channels != width)
            channels = width
        if original_level != 0:
            plan += _pairs(f"decoder.up.{original_level}", f"decoder.up_blocks.{up_level}", {"upsample.conv": "upsamplers.0.conv"})
    plan += _pairs("", "", {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"})
    plan.append(KeyMap("quantize.embedding.weight", ("quantize.embedding.weight",)))
    return [KeyMap(VQ_PREFIX + item.source.lstrip("."), tuple(t.lstrip(".") for t in item.targets), item.kind) for item in plan]


def compvis_key_plan(config: PriorConfig) -> tuple[list[KeyMap], list[KeyMap]]:
    """The (UNet, VQ) key plans for ``config``: original names to diffusers names."""
    return _unet_plan(config), _vq_plan(config)


def _split_qkv(fused: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Legacy order: rows are [head0: q k v][head1: q k v]...; a weight is 3C x C x 1.
    channels = fused.shape[0] // 3
    head_dim = channels // heads
    grouped = fused.reshape(heads, 3 * head_dim, *fused.shape[1:])
    parts = grouped.split(head_dim, dim=1)
    return tuple(part.reshape(channels, *fused.shape[1:]).squeeze(-1) if fused.ndim == 3 else part.reshape(channels) for part in parts)


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    channels = q.shape[0]
    head_dim = channels // heads
    grouped = [tensor.reshape(heads, head_dim, *tensor.shape[1:]) for tensor in (q, k, v)]
    fused = torch.cat(grouped, dim=1).reshape(3 * channels, *q.shape[1:])
    return fused.unsqueeze(-1) if q.ndim == 2 else fused


def _apply_plan(plan: list[KeyMap], source: dict[str, torch.Tensor], target: torch.nn.Module, origin: str) -> None:
    expected = target.state_dict()
    converted: dict[str, torch.Tensor] = {}
    for item in plan:
        if item.source not in source:
            raise KeyError(f"{origin}: missing key {item.source!r} (is the checkpoint of another architecture?)")
        tensor = source[item.source]
        if item.kind == "qkv":
            values = _split_qkv(tensor, item.heads)
        elif item.kind == "squeeze":
            values = (tensor.reshape(tensor.shape[0], tensor.shape[1]),)
        else:
            values = (tensor,)
        for name, value in zip(item.targets, values):
            if name not in expected:
                raise KeyError(f"internal key plan names {name!r}, which the diffusers model lacks")
            if tuple(value.shape) != tuple(expected[name].shape):
                raise ValueError(f"{origin}: {item.source} has shape {tuple(tensor.shape)}, which does not fit "
                                 f"{name} {tuple(expected[name].shape)} (another architecture?)")
            converted[name] = value
    missing = sorted(set(expected) - set(converted))
    if missing:
        raise KeyError(f"internal key plan leaves {missing[0]!r} unset")
    target.load_state_dict(converted, strict=True)


def load_compvis_checkpoint(path: str | os.PathLike[str], config: PriorConfig | str = "ldm-sr4x") -> PriorModel:
    """A :class:`PriorModel` of architecture ``config`` with the weights of a CompVis checkpoint.

    Reads with ``torch.load(weights_only=True)``; accepts a Lightning checkpoint (weights under
    ``state_dict``) or a bare state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CompVis checkpoint not found: {path}")
    if isinstance(config, str):
        config = PriorConfig.named(config)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: cannot read as a PyTorch checkpoint ({exc})") from None
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or not any(key.startswith(UNET_PREFIX) for key in state):
        raise ValueError(f"{path}: no '{UNET_PREFIX}*' weights; not a CompVis latent-diffusion checkpoint")
    model = PriorModel(config)
    unet_plan, vq_plan = compvis_key_plan(config)
    _apply_plan(unet_plan, state, model.unet, str(path))
    _apply_plan(vq_plan, state, model.vqvae, str(path))
    return model


def to_compvis_state_dict(model: PriorModel) -> dict[str, torch.Tensor]:
    """The model's weights under the original CompVis key names (the inverse of loading)."""
    unet_plan, vq_plan = compvis_key_plan(model.config)
    result: dict[str, torch.Tensor] = {}
    for plan, module in ((unet_plan, model.unet), (vq_plan, model.vqvae)):
        state = module.state_dict()
        for item in plan:
            tensors = [state[name].detach().clone() for name in item.targets]
            if item.kind == "qkv":
                result[item.source] = _fuse_qkv(*tensors, heads=item.heads)
            elif item.kind == "squeeze":
                weight = tensors[0]
                # UNet attention uses 1-D convs, the VQ attention 1x1 2-D convs.
                result[item.source] = weight[..., None] if item.source.startswith(UNET_PREFIX) else weight[..., None, None]
            else:
                result[item.source] = tensors[0]
    return result
