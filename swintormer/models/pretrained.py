"""Saving and loading a network as a folder: ``config.json`` (its configuration, tagged with a
``model_type``) and ``model.safetensors`` (its state dict), in the manner of Hugging Face's
``save_pretrained`` / ``from_pretrained``. Every problem with a folder is one clear error."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from swintormer.core.files import atomic_folder

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "PretrainedMixin", "check_state_dict"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class PretrainedMixin:
    """``save_pretrained`` / ``from_pretrained`` for an ``nn.Module`` built from one ``config``
    object (``config_class``: ``from_dict`` and ``to_dict``)."""

    config_class: ClassVar[Any]
    model_type: ClassVar[str]
    config: Any

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` to ``directory`` atomically.

        Both files are written to a temporary folder beside ``directory``, which then replaces it:
        a reader never sees a half-written model, and an interrupted save leaves the old one.
        """
        directory = Path(directory)
        with atomic_folder(directory) as staging:
            state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
            save_file(state, staging / WEIGHTS_NAME, metadata={"format": "pt", "model": self.model_type})
            config = {"model_type": self.model_type, **self.config.to_dict()}
            (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu"):
        """Load a model saved by :meth:`save_pretrained`, in eval mode."""
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"model folder not found: {directory}")
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"model folder {directory} is incomplete: missing {path.name}")
        model = cls(cls.load_config_file(config_path))
        try:
            state = load_file(weights_path, device=str(map_location))
        except Exception as error:  # safetensors raises several types for damaged files
            raise ValueError(f"cannot read weights {weights_path}: {error}") from None
        check_state_dict(model, state, source=str(weights_path))
        model.load_state_dict(state)
        return model.eval()

    @classmethod
    def load_config_file(cls, path: str | os.PathLike):
        """Read a ``config.json`` written by :meth:`save_pretrained`."""
        try:
            values = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read model config {path}: {error}") from None
        if not isinstance(values, dict) or values.pop("model_type", None) != cls.model_type:
            raise ValueError(f"{path} is not a {cls.__name__} config (model_type must be {cls.model_type!r})")
        try:
            return cls.config_class.from_dict(values)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise one error listing every missing, unexpected or mis-shaped key of ``state``."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(f"{k} {list(state[k].shape)} (expected {list(expected[k].shape)})"
                       for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    parts = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if names:
            shown = ", ".join(names[:20]) + (f", … ({len(names) - 20} more)" if len(names) > 20 else "")
            parts.append(f"{len(names)} {label}: {shown}")
    if parts:
        raise ValueError(f"weights in {source} do not fit the model: " + "; ".join(parts))
