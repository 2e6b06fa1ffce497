"""Reading checkpoints made with the authors' Swintormer code.

The authors train with BasicSR: a checkpoint is a ``.pth`` holding a raw state dict or one
wrapped under ``params`` / ``params_ema``, with names possibly prefixed by ``module.`` (DDP) or
``_checkpoint_wrapped_module.`` (activation-checkpoint wrappers). Our parameter names are theirs,
so conversion is: unwrap, strip prefixes, check every name and shape against our model, save.
Their constructor arguments (``inp_channels``, ``dim``, …) map to :class:`SwintormerConfig`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from swintormer.models.pretrained import check_state_dict
from swintormer.models.swintormer import Swintormer, SwintormerConfig

# Authors' constructor argument → our config field.
REFERENCE_ARGUMENTS = {
    "inp_channels": "in_channels",
    "dim": "dim",
    "num_blocks": "num_blocks",
    "num_refinement_blocks": "num_refinement_blocks",
    "heads": "heads",
    "ffn_expansion_factor": "ffn_expansion_factor",
    "bias": "bias",
    "window_size": "window_size",
}
WRAPPER_PREFIXES = ("module.", "_checkpoint_wrapped_module.", "_orig_mod.")
# Buffers that older versions of the reference stored persistently; they are recomputed here.
DERIVED_BUFFERS = ("relative_coords_table", "relative_position_index", "attn_mask")


def config_from_reference_arguments(arguments: dict[str, Any]) -> SwintormerConfig:
    """Map the authors' constructor arguments to a :class:`SwintormerConfig`."""
    arguments = dict(arguments)
    layer_norm = arguments.pop("LayerNorm_type", "WithBias")
    if layer_norm != "WithBias":
        # The reference ignores this argument and always builds a LayerNorm with bias.
        raise ValueError(f"LayerNorm_type {layer_norm!r} is not supported (the reference always uses 'WithBias')")
    unknown = sorted(set(arguments) - set(REFERENCE_ARGUMENTS))
    if unknown:
        raise ValueError(f"unknown reference constructor argument(s): {', '.join(unknown)}")
    return SwintormerConfig.from_dict({REFERENCE_ARGUMENTS[k]: v for k, v in arguments.items()})


def read_reference_arguments(path: str | Path) -> dict[str, Any]:
    """Read a JSON file of the authors' constructor arguments."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        arguments = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(arguments, dict):
        raise ValueError(f"{path} must hold a JSON object of constructor arguments")
    return arguments


def load_reference_state_dict(path: str | Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """Load a reference checkpoint's tensors with our parameter names.

    ``key`` picks the wrapper entry (``params`` or ``params_ema``); by default ``params_ema`` when
    present (BasicSR's EMA weights, the ones the authors evaluate), else ``params``, else the file
    is taken as a raw state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            loaded: Any = load_file(path)
        except Exception as error:  # safetensors raises several types for damaged files
            raise ValueError(f"cannot read {path}: {error}") from None
    elif path.suffix in (".pth", ".pt", ".ckpt", ".bin"):
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(f"cannot read {path} as a weights-only PyTorch checkpoint: {error}") from None
    else:
        raise ValueError(f"unsupported checkpoint extension {path.suffix!r} for {path} (.safetensors, .pth, .pt)")

    if not isinstance(loaded, dict):
        raise ValueError(f"{path} does not hold a state dict")
    wrappers = [k for k in ("params_ema", "params") if isinstance(loaded.get(k), dict)]
    if key is not None:
        if key not in wrappers:
            raise ValueError(f"{path} has no {key!r} entry (found: {', '.join(wrappers) or 'a raw state dict'})")
        loaded = loaded[key]
    elif wrappers:
        loaded = loaded[wrappers[0]]

    state: dict[str, torch.Tensor] = {}
    for name, value in loaded.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: entry {name!r} is not a tensor")
        for prefix in WRAPPER_PREFIXES:
            name = name.replace(prefix, "")
        if name.rsplit(".", 1)[-1] in DERIVED_BUFFERS:
            continue
        state[name] = value.float()
    return state


def convert_reference_checkpoint(
    weights: str | Path, arguments: dict[str, Any], key: str | None = None
) -> Swintormer:
    """Build our model from the authors' constructor arguments and load their weights strictly."""
    model = Swintormer(config_from_reference_arguments(arguments))
    state = load_reference_state_dict(weights, key=key)
    check_state_dict(model, state, source=str(weights))
    model.load_state_dict(state)
    return model.eval()
