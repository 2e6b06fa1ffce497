"""What both training pipelines (stage one and stage two) do before training: apply the run
flags to the config, find the training and validation splits, and discover their pairs, with
every user error as a ``ConfigError`` that the pipeline reports in one line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TypeVar

from swintormer.core.config import ConfigError, load_config, run_flags_from_args

VAL_SPLIT_NAMES = ("test", "val", "validation")
Config = TypeVar("Config")


def load_run_config(schema: type[Config], parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[Config, Any]:
    """Parse the command line, load the YAML config with its overrides, and apply ``--data``,
    ``--output`` and ``--max-steps`` (which win over the file). Returns (config, flags).

    Options and ``key=value`` overrides may come in any order (``parse_intermixed_args``), so a
    job script can append ``--resume auto`` or more overrides to a command line."""
    flags = run_flags_from_args(parser.parse_intermixed_args(argv))
    config: Any = load_config(schema, flags.config, flags.overrides)
    if flags.data is not None:
        config.data.root = flags.data
    if flags.output is not None:
        config.output_dir = flags.output
    if flags.max_steps is not None:
        config.train.max_steps = flags.max_steps
    if config.output_dir is None:
        raise ConfigError("no run folder: pass --output RUN_DIR (or set output_dir)")
    return config, flags


def resolve_splits(root: Path | None, val_root: Path | None) -> tuple[Path, Path | None]:
    """Training and validation folders: ``root/train`` and its sibling ``test``/``val``/
    ``validation`` when ``root`` holds splits, else ``root`` itself; ``val_root`` wins."""
    if root is None:
        raise ConfigError("no training data: pass --data DIR (or set data.root)")
    if not root.is_dir():
        raise ConfigError(f"--data {root}: folder not found")
    if (root / "train").is_dir():
        if val_root is None:
            val_root = next((root / name for name in VAL_SPLIT_NAMES if (root / name).is_dir()), None)
        return root / "train", val_root
    return root, val_root


def discover_training_pairs(split: Path, layout: str, what: str) -> list:
    """The image pairs of a split; unmatched files are reported as a warning, none at all is an error."""
    from swintormer.core.data.paired import discover_pairs

    try:
        found = discover_pairs(split, layout)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"{what}: {exc}") from None
    if found.problems:
        print(f"warning: {what} {split}: {len(found.problems)} problem(s), first: {found.problems[0]}", file=sys.stderr)
    if not found.pairs:
        raise ConfigError(f"{what} {split}: no image pairs found (layout {layout!r})")
    return found.pairs
