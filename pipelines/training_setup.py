"""What both training pipelines (stage one and stage two) share around their own set-up: the
command line, the run flags applied to the config, the training and validation splits and their
pairs (every user error a ``ConfigError`` that the pipeline reports in one line), the signal
handling around the whole run, and the hand-over to the training engine."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from collections.abc import Callable
from typing import Any, TypeVar

from swintormer.core.config import EXIT_CODES_HELP, ConfigError, add_run_arguments, load_config, run_flags_from_args

VAL_SPLIT_NAMES = ("test", "val", "validation")
Config = TypeVar("Config")


def training_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A training pipeline's command line: its config, the run flags and ``key=value`` overrides."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=EXIT_CODES_HELP,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_run_arguments(parser)
    return parser


def run_with_stop_signals(body: Callable[[list[str] | None], int], argv: list[str] | None) -> int:
    """Run a pipeline's ``body(argv)`` with SIGTERM/SIGINT/SIGUSR1 turned into a checkpointed
    stop from the start: a signal during set-up stops the run after its first step."""
    from swintormer.core.run_control import stop_signals

    with stop_signals():
        return body(argv)


def start_training(task: Any, config: Any, flags: Any, accelerator: Any, saved: str) -> int:
    """Hand a ``TrainingTask`` to the engine with the run flags' resume, overwrite and stop rules."""
    from swintormer.core.training import StopRules, train_and_report

    return train_and_report(task, config.train, Path(config.output_dir), accelerator=accelerator,
                            resume=flags.resume, overwrite=flags.overwrite, run_config=config, saved=saved,
                            stop=StopRules(after_steps=flags.stop_after_steps, time_limit=flags.time_limit))


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
