"""Typed YAML configuration shared by every training pipeline.

A run's configuration is a YAML file validated against a pydantic schema whose models all
forbid unknown keys, so a typo is an error that names the key instead of a silently ignored
setting. Command lines may override any leaf with ``key.sub=value`` (the value is parsed as
YAML, so ``train.lr=1e-4``, ``model.in_channels=3`` and ``loss.vgg.layers={conv1_1: 1.0}``
all work). The resolved configuration is written next to every run with :func:`save_config`.

This module also holds the pieces of configuration that are the same for every trainer
(optimizer, learning-rate schedule, EMA, checkpointing, logging, the loop itself) and the
run flags (``--data``, ``--output``, ``--max-steps``, ``--resume``, ``--overwrite``,
``--stop-after-steps``, ``--time-limit``) that every training pipeline accepts, so that
``pipelines.train_swintormer`` and ``pipelines.train_prior`` read them the same way.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from swintormer.core.files import atomic_write_text

__all__ = [
    "ConfigError",
    "StrictModel",
    "OptimizerConfig",
    "SchedulerConfig",
    "EMAConfig",
    "CheckpointConfig",
    "LoggingConfig",
    "TrainingConfig",
    "RunFlags",
    "EXIT_CODES_HELP",
    "add_run_arguments",
    "run_flags_from_args",
    "apply_overrides",
    "load_config",
    "save_config",
]

SchemaT = TypeVar("SchemaT", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration file or override that cannot be used; the message names the culprit."""


class StrictModel(BaseModel):
    """Base of every config schema: unknown keys are errors, values are re-checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- shared schemas


class OptimizerConfig(StrictModel):
    """AdamW, the optimizer of both stages (the authors' setting for DPDD is the default)."""

    name: Literal["adamw", "adam"] = "adamw"
    lr: float = Field(3e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = Field(1e-4, ge=0)
    eps: float = Field(1e-8, gt=0)


class SchedulerConfig(StrictModel):
    """Learning-rate schedule as a function of the optimizer step.

    ``cosine_restarts`` follows the cyclic cosine schedule of the Restormer code base that
    Swintormer's authors trained with: the run is cut into ``periods`` (in steps); in period
    ``i`` the rate falls by a half cosine from ``lr * restart_weights[i]`` to ``eta_mins[i]``.
    ``cosine`` is one period over ``train.max_steps`` down to ``eta_mins[0]``.
    """

    name: Literal["constant", "cosine", "cosine_restarts"] = "cosine_restarts"
    warmup_steps: int = Field(0, ge=0)
    periods: list[int] = Field(default_factory=lambda: [92_000, 208_000])
    restart_weights: list[float] = Field(default_factory=lambda: [1.0, 1.0])
    eta_mins: list[float] = Field(default_factory=lambda: [3e-4, 1e-6])

    @model_validator(mode="after")
    def _lists_match(self) -> "SchedulerConfig":
        if self.name == "cosine_restarts":
            if not self.periods or any(p <= 0 for p in self.periods):
                raise ValueError("scheduler.periods must be a non-empty list of positive step counts")
            if not (len(self.periods) == len(self.restart_weights) == len(self.eta_mins)):
                raise ValueError(
                    "scheduler.periods, scheduler.restart_weights and scheduler.eta_mins must have the same length"
                )
        if not self.eta_mins:
            raise ValueError("scheduler.eta_mins must not be empty")
        return self


class EMAConfig(StrictModel):
    """Exponential moving average of the trained weights (the authors use 0.999)."""

    enabled: bool = True
    decay: float = Field(0.999, ge=0.0, lt=1.0)
    start_step: int = Field(0, ge=0)  # before this step the average simply copies the weights
    use_for_validation: bool = True
    use_for_export: bool = True  # the final save_pretrained model holds the EMA weights


class CheckpointConfig(StrictModel):
    every_steps: int = Field(5000, gt=0)
    keep_last: int = Field(3, ge=1)


class LoggingConfig(StrictModel):
    every_steps: int = Field(50, gt=0)
    tensorboard: bool = True  # used only when the tensorboard package is installed
    progress_bar: bool = True


class TrainingConfig(StrictModel):
    """The loop: how many steps, how big a batch, precision, clipping and the sub-configs above.

    ``batch_size`` is per process; the effective batch is ``batch_size * processes *
    grad_accum_steps``. A step is one optimizer update.
    """

    max_steps: int = Field(300_000, gt=0)
    batch_size: int = Field(8, gt=0)
    grad_accum_steps: int = Field(1, gt=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    grad_clip_norm: float | None = Field(0.01, gt=0)
    gradient_checkpointing: bool = False
    seed: int = 0
    num_workers: int = Field(0, ge=0)
    validate_every_steps: int = Field(5000, gt=0)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    ema: EMAConfig = Field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)


# --------------------------------------------------------------------------- run flags


class RunFlags(BaseModel):
    """The flags every training pipeline takes besides its config file and overrides."""

    model_config = ConfigDict(extra="forbid")

    config: Path
    overrides: list[str] = Field(default_factory=list)
    data: Path | None = None
    output: Path | None = None
    max_steps: int | None = None
    resume: str | None = None  # "auto", "latest" or a checkpoint folder
    overwrite: bool = False
    stop_after_steps: int | None = None
    time_limit: float | None = None  # seconds from the start of the process


#: The exit codes of a training pipeline, for ``--help`` (the numbers are
#: ``swintormer.core.run_control``'s).
EXIT_CODES_HELP = (
    "Exit codes: 0 the run reached train.max_steps, or --stop-after-steps (a checkpoint to resume "
    "from, no model/ yet); 75 stopped by SIGTERM, SIGINT or SIGUSR1 (after the optimizer step in "
    "progress) or by --time-limit, with a checkpoint: requeue the same command with --resume auto; "
    "1 non-finite loss; 2 bad settings, data or run folder; 130 aborted by a second SIGINT. "
    "Under 'accelerate launch' or torchrun the launcher exits 1 for any non-zero code of its "
    "processes: read RUN_DIR/status.json (state finished/stopped/failed, exit_code) instead."
)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config``, ``--data``, ``--output``, ``--max-steps``, ``--resume``, ``--overwrite``,
    ``--stop-after-steps``, ``--time-limit`` and ``key=value``."""
    parser.add_argument("--config", required=True, type=Path, help="YAML configuration file")
    parser.add_argument("--data", type=Path, default=None,
                        help="dataset root in any supported layout (overrides data.root)")
    parser.add_argument("--output", type=Path, default=None,
                        help="run folder: checkpoints, logs, config.yaml and the final model/")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="length of the run in optimizer steps (sets train.max_steps, and with it the "
                             "learning-rate schedule); a checkpoint is resumed only with the value it was "
                             "made for. To stop earlier use --stop-after-steps or --time-limit")
    parser.add_argument("--stop-after-steps", type=int, default=None, metavar="N",
                        help="stop at step N with a checkpoint (exit code 0); the recipe does not change, "
                             "so --resume auto later continues exactly as if the run had not stopped")
    parser.add_argument("--time-limit", default=None, metavar="DURATION",
                        help="checkpoint and stop (exit code 75) before this much time has passed since the "
                             "process started, e.g. 3h50m, 90m, 45s; the margin is the measured time of a "
                             "step and of the checkpoint and validation writes that follow it")
    folder = parser.add_mutually_exclusive_group()
    folder.add_argument("--resume", default=None, metavar="auto|latest|PATH",
                        help="continue exactly: 'auto' from the newest checkpoint of --output, or start the "
                             "run when there is none (for requeued jobs); 'latest' likewise but a checkpoint "
                             "must exist; PATH from that checkpoint folder. Without --resume or --overwrite, "
                             "a non-empty --output is refused")
    folder.add_argument("--overwrite", action="store_true",
                        help="start over in a used --output: first delete the previous run's checkpoints/, "
                             "logs/, validation/, model/, debug/, config.yaml and status.json (other files in the folder "
                             "are kept)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="override a config value; the value is parsed as YAML")


def run_flags_from_args(args: argparse.Namespace) -> RunFlags:
    from swintormer.core.run_control import parse_duration

    if args.max_steps is not None and args.max_steps <= 0:
        raise ConfigError(f"--max-steps must be positive, got {args.max_steps}")
    if args.stop_after_steps is not None and args.stop_after_steps <= 0:
        raise ConfigError(f"--stop-after-steps must be positive, got {args.stop_after_steps}")
    time_limit = None
    if args.time_limit is not None:
        try:
            time_limit = parse_duration(args.time_limit)
        except ValueError as exc:
            raise ConfigError(f"--time-limit: {exc}") from None
    return RunFlags(config=args.config, overrides=list(args.overrides), data=args.data,
                    output=args.output, max_steps=args.max_steps, resume=args.resume,
                    overwrite=args.overwrite, stop_after_steps=args.stop_after_steps, time_limit=time_limit)


# --------------------------------------------------------------------------- load / save


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``a.b.c=value`` applied (value parsed as YAML)."""
    result = _deep_copy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {key}: value {text!r} is not valid YAML ({exc})") from None
        node = result
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {key}: {'.'.join(parts[: depth + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return result


def load_config(schema_cls: type[SchemaT], path: str | os.PathLike[str] | None,
                overrides: list[str] | None = None) -> SchemaT:
    """Read YAML from ``path`` (or start empty when None), apply overrides, validate.

    Raises :class:`ConfigError` with a one-line message naming the offending key and where its
    value came from (the file, or a command-line override).
    """
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})".replace("\n", " ")) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
        raw = loaded
    overrides = list(overrides or [])
    raw = apply_overrides(raw, overrides)
    try:
        return schema_cls.model_validate(raw)
    except ValidationError as exc:
        overridden = [item.partition("=")[0].strip() for item in overrides]
        raise ConfigError(_describe_validation_error(exc, source, overridden)) from None


def save_config(config: BaseModel, path: str | os.PathLike[str]) -> None:
    """Write the resolved config as YAML, atomically (temporary file, then ``os.replace``)."""
    data = config.model_dump(mode="json")
    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=None)
    atomic_write_text(path, text)


def _describe_validation_error(exc: ValidationError, source: str, overridden: list[str]) -> str:
    """One line: each problem names its dotted key, and where the bad value came from (the
    config file, or the command-line override that set the key or a section above it)."""
    messages = []
    for error in exc.errors():
        location = ".".join(str(part) for part in error["loc"]) or "<top level>"
        setter = next((key for key in overridden if location == key or location.startswith(key + ".")), None)
        origin = f"command-line override {setter}=..." if setter else source
        if error["type"] == "extra_forbidden":
            messages.append(f"{origin}: unknown key {location!r}")
        elif error["type"] == "missing":
            messages.append(f"{origin}: missing required key {location!r}")
        else:
            got = repr(error.get("input"))
            got = got if len(got) <= 80 else got[:77] + "..."
            messages.append(f"{origin}: key {location!r}: {error['msg']} (got {got})")
    return "; ".join(messages)


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value
