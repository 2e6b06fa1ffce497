"""The training engine shared by every training pipeline (stage one and stage two).

A pipeline describes *what* to train in a :class:`TrainingTask` (the model, the trainable
parameters, a loss step, the training set, optionally a validation hook and a final export)
and calls :func:`run_training`; the engine does the rest, the same way for every pipeline:

- accelerate for devices, processes, mixed precision and DDP gradient synchronisation;
  gradient accumulation by hand (``no_sync`` on all but the last micro-batch) so the step
  count is always optimizer steps;
- data order from :class:`EpochShardSampler`: the permutation of epoch ``e`` depends on
  ``(seed, e)`` only and each process takes its own slice, so every process sees different
  samples and a resumed run sees exactly the samples the uninterrupted run would have seen;
- a learning-rate schedule that is a pure function of the optimizer step (not prepared by
  accelerate, whose scheduler wrapper would step once per process);
- EMA weights (:class:`ExponentialMovingAverage`);
- checkpoints every N steps and always at the end, written by the main process only into a
  temporary folder that is renamed into place (a checkpoint folder that exists is complete):
  tensors in safetensors, small state in JSON: model, EMA, optimizer, scheduler, gradient
  scaler, step, and the RNG state of every process. Model and optimizer states are taken from
  the main process, which is right for DDP (accelerate's multi-process default); sharded
  optimizers (FSDP, DeepSpeed ZeRO) are not supported by this format;
- exact resume from ``latest`` / ``auto`` or a checkpoint folder, under the run-folder rules
  of :func:`swintormer.core.run_control.prepare_run_folder` (a used folder is never started
  over silently, nor one another run is writing; on resume the metrics log is cut back to the
  checkpoint's step). The run's length ``max_steps`` is part of the recipe (it sets the
  schedule), so a checkpoint is resumed only with the ``max_steps`` it was made for;
- early stops that do not change the recipe (:class:`StopRules`): at a given step, before a
  time limit (the margin is estimated from the measured step, checkpoint and validation
  times), or on SIGTERM / SIGINT / SIGUSR1 (after the optimizer step in progress). Every step
  the processes agree on stopping (one all-reduce of a small integer), so a signal to any of
  them stops all at the same step with one checkpoint. The run then reports why it stopped
  (:class:`TrainingResult`, ``RUN_DIR/status.json``) and does not export ``model/``;
- a NaN/inf guard: a non-finite loss or gradient norm stops every process with
  :class:`NonFiniteLossError` naming the step; the last good checkpoint is left untouched;
- progress bar with loss and speed, a JSON-lines log and TensorBoard when installed,
  validation every N steps on the main process (EMA weights by default; the other processes
  wait at a barrier, so keep validation well under the process group's timeout). A validation
  hook may return a :class:`~swintormer.core.validation_images.ValidationReport`: its images
  (panels side by side) are written to ``RUN_DIR/validation/step_XXXXXXXX/`` and TensorBoard;
- what the run will do, printed at its start by the main process: the steps, and the effective
  batch (per-process batch x processes x accumulation steps); after its first few steps (or
  half a minute) an estimate of the time left and of when it ends, from the measured step,
  checkpoint and (once one has run) validation times, and again after its first validation.

A pipeline's use, in full::

    accelerator = make_accelerator(config.train)           # before anything prints or writes
    task = TrainingTask(model=net, loss_step=lambda m, b: loss(m(b["input"]), b["target"]),
                        train_dataset=patches, aux_modules=[loss], validate=validate,
                        save_final=lambda m, folder: m.save_pretrained(folder))
    result = run_training(task, config.train, run_dir, accelerator=accelerator, resume="latest")

The run folder then holds ``checkpoints/step_XXXXXXXX/`` (``model.safetensors``,
``ema.safetensors``, ``optimizer.safetensors`` + ``optimizer.json``, ``scheduler.json``,
``rng.safetensors``, ``grad_scaler.json`` with fp16, and ``trainer_state.json`` written last),
``logs/metrics.jsonl``, ``logs/tensorboard/``, ``validation/step_XXXXXXXX/*.png`` (when the
hook returns images), ``status.json``, ``config.yaml`` (the ``run_config`` given to
:func:`run_training`) and ``model/`` (from ``save_final``, when the run reaches ``max_steps``).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm.auto import tqdm

from swintormer.core import distributed
from swintormer.core.config import ConfigError, SchedulerConfig, TrainingConfig, save_config
from swintormer.core.files import atomic_folder, atomic_write_text, remove_stale_temporaries
from swintormer.core.run_control import (
    CHECKPOINT_DIR,
    CHECKPOINT_PREFIX,
    EXIT_ABORTED,
    EXIT_STOPPED,
    STATE_FILE,
    RunFolderLock,
    StopSignals,
    answer_from_main_process,
    check_max_steps,
    cut_metrics_log,
    prepare_run_folder,
    seconds_since_process_start,
    signal_name,
    stop_signals,
    write_status,
)
from swintormer.core.validation_images import (
    ValidationImage,
    ValidationReport,
    remove_later_steps,
    side_by_side,
    write_validation_images,
)

__all__ = [
    "LossStep",
    "TrainingTask",
    "TrainingResult",
    "StopRules",
    "NonFiniteLossError",
    "ExponentialMovingAverage",
    "EpochShardSampler",
    "make_accelerator",
    "lr_factor_fn",
    "find_checkpoint",
    "run_training",
    "plan_line",
    "remaining_time",
    "format_duration",
]

# Checkpoints are CHECKPOINT_DIR/CHECKPOINT_PREFIX<step>/, with STATE_FILE written last: its
# presence marks a complete checkpoint (the names live with the run-folder rules, run_control).

#: ``loss_step(model, batch) -> (loss, logs)``; ``model`` is the prepared (maybe DDP) model,
#: ``batch`` the collated batch already on the right device; ``logs`` maps names to floats or
#: scalar tensors (e.g. the parts of a combined loss) and may be empty.
LossStep = Callable[[nn.Module, Any], "tuple[torch.Tensor, dict[str, Any]]"]


@dataclass
class TrainingTask:
    """What a pipeline hands to :func:`run_training`.

    ``model`` is trained, averaged (EMA) and checkpointed. ``parameters`` are the ones the
    optimizer updates (default: every parameter of ``model`` that requires grad), so a
    pipeline can freeze part of its model. ``aux_modules`` are moved to the device but not
    trained nor saved (loss networks). ``validate(model, step)`` runs on the main process under
    ``torch.no_grad`` with the model in eval mode (EMA weights applied unless
    ``ema.use_for_validation`` is off) and returns metrics to log, or a
    :class:`~swintormer.core.validation_images.ValidationReport` of metrics and images to write.
    ``save_final(model, folder)`` exports the final model (EMA weights unless
    ``ema.use_for_export`` is off).
    """

    model: nn.Module
    loss_step: LossStep
    train_dataset: Dataset
    parameters: Sequence[nn.Parameter] | None = None
    aux_modules: Sequence[nn.Module] = ()
    validate: Callable[[nn.Module, int], "dict[str, float] | ValidationReport"] | None = None
    save_final: Callable[[nn.Module, Path], None] | None = None
    collate_fn: Callable[[list[Any]], Any] = default_collate


@dataclass
class StopRules:
    """When a run stops before ``max_steps``, with a checkpoint; none of it changes the recipe.

    ``after_steps``: stop at this step. ``time_limit``: seconds, counted from the start of the
    process (:func:`~swintormer.core.run_control.seconds_since_process_start`); the run stops
    when the next step and the writes it leads to (checkpoints as long as the slowest one so
    far, validation as long as the last one), counted 25 % longer, would end past the limit. ``signals``: SIGTERM, SIGINT and
    SIGUSR1 stop the run after the optimizer step in progress.
    """

    after_steps: int | None = None
    time_limit: float | None = None
    signals: bool = True


@dataclass
class TrainingResult:
    step: int
    last_checkpoint: Path | None
    final_model_dir: Path | None
    validation: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # per-step loss of this process
    #: None when the run reached ``max_steps``; else why it stopped early: a signal's name
    #: ("SIGTERM"), "time limit" or "stop after steps".
    stop_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.stop_reason is None


class NonFiniteLossError(RuntimeError):
    """The loss (or the gradient norm) became NaN or infinite; the run stopped before applying it."""

    def __init__(self, step: int, what: str, last_checkpoint: Path | None) -> None:
        kept = f"last good checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
        super().__init__(f"{what} became non-finite at step {step}; training stopped ({kept})")
        self.step = step
        self.last_checkpoint = last_checkpoint


# --------------------------------------------------------------------------- EMA


class ExponentialMovingAverage:
    """Float32 shadow copy of a model's trained parameters and floating buffers.

    ``shadow = decay * shadow + (1 - decay) * weights`` after every optimizer step; before
    ``start_step`` the shadow just copies the weights. ``parameter_names`` limits the average
    to the trained parameters (frozen ones never change, so averaging them would only cost
    memory); by default every parameter is averaged.
    """

    def __init__(self, model: nn.Module, decay: float, start_step: int = 0,
                 parameter_names: set[str] | None = None) -> None:
        self.decay = decay
        self.start_step = start_step
        self.parameter_names = parameter_names
        self.shadow: dict[str, torch.Tensor] = {
            name: tensor.detach().to(torch.float32).clone() for name, tensor in self._tensors(model)
        }

    def _tensors(self, model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        for name, param in model.named_parameters():
            if self.parameter_names is None or name in self.parameter_names:
                yield name, param
        for name, buffer in model.named_buffers():
            if buffer.is_floating_point():
                yield name, buffer

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        weight = 1.0 if step <= self.start_step else 1.0 - self.decay
        for name, tensor in self._tensors(model):
            self.shadow[name].lerp_(tensor.detach().to(torch.float32), weight)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for name, tensor in self._tensors(model):
            tensor.copy_(self.shadow[name].to(tensor.dtype))

    @contextmanager
    def applied_to(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily put the averaged weights into ``model``; the trained ones come back after."""
        backup = {name: tensor.detach().clone() for name, tensor in self._tensors(model)}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, tensor in self._tensors(model):
                    tensor.copy_(backup[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:3]}...")
        for name in self.shadow:
            self.shadow[name].copy_(state[name])


# --------------------------------------------------------------------------- data order


class EpochShardSampler:
    """Sample indices for one process: the epoch's order depends on ``(seed, epoch)`` only.

    The permutation of all ``num_items`` is padded (by wrapping) to a multiple of
    ``num_processes`` and process ``rank`` takes every ``num_processes``-th index from
    ``rank``, so processes see disjoint samples (up to the padding) and together cover the set.
    """

    def __init__(self, num_items: int, seed: int, rank: int = 0, num_processes: int = 1,
                 shuffle: bool = True) -> None:
        if num_items <= 0:
            raise ValueError("the training set is empty")
        self.num_items = num_items
        self.seed = seed
        self.rank = rank
        self.num_processes = num_processes
        self.shuffle = shuffle

    def indices(self, epoch: int) -> list[int]:
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_items).tolist()
        else:
            order = list(range(self.num_items))
        padded_len = math.ceil(self.num_items / self.num_processes) * self.num_processes
        order = (order * math.ceil(padded_len / self.num_items))[:padded_len]
        return order[self.rank::self.num_processes]

    def __len__(self) -> int:
        return math.ceil(self.num_items / self.num_processes)


def _batches(dataset: Dataset, sampler: EpochShardSampler, batch_size: int, start_batch: int,
             num_workers: int, collate_fn: Callable[[list[Any]], Any], seed: int
             ) -> Iterator[Any]:
    """Endless stream of batches for this process, starting at global batch ``start_batch``.

    Batches never straddle epochs (the last incomplete batch of an epoch is dropped), so the
    position of batch ``k`` is ``divmod(k, batches_per_epoch)`` and resuming needs only ``k``.
    A dataset with ``set_epoch(epoch)`` is told the epoch before its samples are drawn, so it
    can make its random crops a function of (seed, epoch, index).
    """
    per_epoch = len(sampler) // batch_size
    if per_epoch == 0:
        raise ConfigError(
            f"train.batch_size={batch_size} is larger than this process's share of the training "
            f"set ({len(sampler)} of {sampler.num_items} samples); use a smaller batch or more data"
        )
    epoch, offset = divmod(start_batch, per_epoch)
    while True:
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        order = sampler.indices(epoch)[offset * batch_size: per_epoch * batch_size]
        generator = torch.Generator().manual_seed(hash((seed, epoch, sampler.rank)) & 0x7FFF_FFFF)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=order, num_workers=num_workers,
                            collate_fn=collate_fn, drop_last=True, generator=generator)
        yield from loader
        epoch, offset = epoch + 1, 0


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {key: _to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(value, device) for value in batch)
    return batch


# --------------------------------------------------------------------------- schedule


def _scheduler_lambda(config: SchedulerConfig, base_lr: float, max_steps: int) -> Callable[[int], float]:
    warmup = config.warmup_steps

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        t = step - warmup
        if config.name == "constant":
            return 1.0
        if config.name == "cosine":
            periods, weights, minima = [max(max_steps - warmup, 1)], [1.0], [config.eta_mins[0]]
        else:
            periods, weights, minima = config.periods, config.restart_weights, config.eta_mins
        start = 0
        for period, weight, eta_min in zip(periods, weights, minima):
            if t < start + period:
                progress = (t - start) / period
                lr = eta_min + 0.5 * (base_lr * weight - eta_min) * (1.0 + math.cos(math.pi * progress))
                return lr / base_lr
            start += period
        return minima[-1] / base_lr

    return factor


def lr_factor_fn(config: SchedulerConfig, max_steps: int, base_lr: float) -> Callable[[int], float]:
    """Multiplier of ``base_lr`` after ``step`` optimizer steps (``eta_mins`` are absolute rates)."""
    return _scheduler_lambda(config, base_lr, max_steps)


# --------------------------------------------------------------------------- accelerator


def make_accelerator(config: TrainingConfig, **kwargs: Any) -> Accelerator:
    """The run's Accelerator; device, process count and precision come from the launcher + config
    (see ``swintormer.core.distributed`` for machines without an accelerator)."""
    return distributed.make_accelerator(mixed_precision=config.mixed_precision, **kwargs)


# --------------------------------------------------------------------------- checkpoints


def find_checkpoint(output_dir: Path, resume: str) -> Path | None:
    """Resolve ``--resume``: ``latest`` / ``auto`` = newest complete checkpoint of ``output_dir``
    (None if there is none yet); otherwise a checkpoint folder that must exist and be complete."""
    if resume in ("latest", "auto"):
        folder = Path(output_dir) / CHECKPOINT_DIR
        complete = sorted(p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_FILE).is_file())
        return complete[-1] if complete else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"--resume {resume}: not a complete checkpoint folder (no {STATE_FILE})")
    return path


def _rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    version, words, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    small = {"python": [version, list(words), gauss],
             "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{index}"] = state
    return small, tensors


def _set_rng_state(small: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    version, words, gauss = small["python"]
    random.setstate((version, tuple(words), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = small["numpy"]
    np.random.set_state((np_name, np.asarray(np_keys, dtype=np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        states = [tensors[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in tensors]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def _split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    tensors: dict[str, torch.Tensor] = {}
    small_state: dict[str, dict[str, Any]] = {}
    for param_id, values in state["state"].items():
        small_state[str(param_id)] = {}
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param_id}.{name}"] = value.detach().cpu().contiguous()
            else:
                small_state[str(param_id)][name] = value
    return {"state": small_state, "param_groups": state["param_groups"]}, tensors


def _join_optimizer_state(small: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(k): dict(v) for k, v in small["state"].items()}
    for key, value in tensors.items():
        param_id, name = key.split(".", 1)
        state.setdefault(int(param_id), {})[name] = value
    groups = []
    for group in small["param_groups"]:
        group = dict(group)
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")


# --------------------------------------------------------------------------- the loop


class _Engine:
    """State of one run; see :func:`run_training`. Kept private: the public surface is the function."""

    def __init__(self, task: TrainingTask, config: TrainingConfig, output_dir: Path,
                 accelerator: Accelerator, max_steps: int, stop: StopRules | None = None) -> None:
        self.task = task
        self.config = config
        self.output_dir = Path(output_dir)
        self.accelerator = accelerator
        self.max_steps = max_steps
        self.stop = stop or StopRules()
        self.step = 0
        self.last_checkpoint: Path | None = None
        # Measured durations (seconds) that the time limit's margin is estimated from.
        self._step_seconds: deque[float] = deque(maxlen=20)  # the last steps' times
        self._checkpoint_seconds: float | None = None
        self._validation_seconds = 0.0
        self._validation_measured = False

        model = task.model
        if config.gradient_checkpointing:
            _enable_gradient_checkpointing(model)
        device = accelerator.device
        model.to(device)
        for module in task.aux_modules:
            module.to(device)
        parameters = list(task.parameters) if task.parameters is not None else \
            [p for p in model.parameters() if p.requires_grad]
        if not parameters:
            raise ConfigError("the task has no trainable parameters")
        self.parameters = parameters
        opt = config.optimizer
        optimizer_cls = torch.optim.AdamW if opt.name == "adamw" else torch.optim.Adam
        optimizer = optimizer_cls(parameters, lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay,
                                  eps=opt.eps)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer.optimizer, _scheduler_lambda(config.scheduler, opt.lr, max_steps))
        trained_ids = {id(p) for p in parameters}
        self.trained_names = {name for name, p in self.unwrapped.named_parameters() if id(p) in trained_ids}
        self.ema = self._new_ema() if config.ema.enabled else None
        self.sampler = EpochShardSampler(len(task.train_dataset), config.seed,  # type: ignore[arg-type]
                                         accelerator.process_index, accelerator.num_processes)

    def _new_ema(self) -> ExponentialMovingAverage:
        return ExponentialMovingAverage(self.unwrapped, self.config.ema.decay, self.config.ema.start_step,
                                        self.trained_names)

    @property
    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    @property
    def global_batch(self) -> int:
        return self.config.batch_size * self.config.grad_accum_steps * self.accelerator.num_processes

    # ---- checkpoints

    def save_checkpoint(self) -> Path:
        """Write checkpoint ``step_<step>``; every process must call this (RNG states are gathered)."""
        acc = self.accelerator
        started = _clock()
        small_rng, tensor_rng = _rng_state()
        all_rng = gather_object([(acc.process_index, small_rng, tensor_rng)])
        folder = self.output_dir / CHECKPOINT_DIR / f"{CHECKPOINT_PREFIX}{self.step:08d}"
        if acc.is_main_process:
            folder.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(folder.parent)  # left by a killed run (one writer)
            with atomic_folder(folder) as tmp:
                save_model(self.unwrapped, str(tmp / "model.safetensors"))
                if self.ema is not None:
                    save_file({k: v.contiguous().cpu() for k, v in self.ema.state_dict().items()},
                              str(tmp / "ema.safetensors"))
                opt_small, opt_tensors = _split_optimizer_state(self.optimizer.state_dict())
                save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
                _write_json(tmp / "optimizer.json", opt_small)
                _write_json(tmp / "scheduler.json", self.scheduler.state_dict())
                if acc.scaler is not None:
                    _write_json(tmp / "grad_scaler.json", acc.scaler.state_dict())
                rng_tensors = {f"rank{rank}.{k}": v.cpu() for rank, _, tensors in all_rng for k, v in tensors.items()}
                save_file(rng_tensors, str(tmp / "rng.safetensors"))
                state = {"step": self.step, "max_steps": self.max_steps, "num_processes": acc.num_processes,
                         "batch_size": self.config.batch_size,
                         "grad_accum_steps": self.config.grad_accum_steps, "seed": self.config.seed,
                         "rng": {str(rank): small for rank, small, _ in all_rng}}
                _write_json(tmp / STATE_FILE, state)  # last: its presence marks a complete checkpoint
            self._prune_checkpoints()
        acc.wait_for_everyone()
        self.last_checkpoint = folder
        self._checkpoint_seconds = max(self._checkpoint_seconds or 0.0, _clock() - started)
        return folder

    def _prune_checkpoints(self) -> None:
        folder = self.output_dir / CHECKPOINT_DIR
        complete = sorted(p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_FILE).is_file())
        for old in complete[: -self.config.checkpoint.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, folder: Path) -> None:
        acc = self.accelerator
        check_max_steps(folder, self.max_steps)
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        # safetensors names devices its own way: "cpu" (not the "cpu:0" of a gloo process), "cuda:N".
        device = "cpu" if acc.device.type == "cpu" else str(acc.device)
        load_model(self.unwrapped, str(folder / "model.safetensors"), device=device)
        if self.ema is not None:
            ema_file = folder / "ema.safetensors"
            if ema_file.is_file():
                self.ema.load_state_dict(load_file(str(ema_file), device=device))
            else:  # EMA switched on after the checkpoint: start the average from the weights
                self.ema = self._new_ema()
        opt_small = json.loads((folder / "optimizer.json").read_text(encoding="utf-8"))
        opt_tensors = load_file(str(folder / "optimizer.safetensors"))
        self.optimizer.load_state_dict(_join_optimizer_state(opt_small, opt_tensors))
        self.scheduler.load_state_dict(json.loads((folder / "scheduler.json").read_text(encoding="utf-8")))
        if acc.scaler is not None and (folder / "grad_scaler.json").is_file():
            acc.scaler.load_state_dict(json.loads((folder / "grad_scaler.json").read_text(encoding="utf-8")))
        self.step = int(state["step"])
        rank = str(acc.process_index)
        note = _layout_change_note(state, acc.num_processes, self.config)
        if note:
            acc.print(note)
        if rank in state["rng"]:
            rng_tensors = load_file(str(folder / "rng.safetensors"))
            prefix = f"rank{rank}."
            _set_rng_state(state["rng"][rank],
                           {k[len(prefix):]: v for k, v in rng_tensors.items() if k.startswith(prefix)})
        else:
            _seed_everything(self.config.seed + 1000 * acc.process_index + self.step)
        self.last_checkpoint = folder

    # ---- stopping early

    def _checkpoint_estimate(self) -> float:
        """Seconds one checkpoint write takes: the slowest measured, or before any, the state's
        size (weights, EMA, Adam's two moments) at 50 MB/s plus a second."""
        if self._checkpoint_seconds is not None:
            return self._checkpoint_seconds
        weights = sum(t.numel() * t.element_size() for t in self.unwrapped.state_dict().values())
        trained = sum(p.numel() * 4 for p in self.parameters)
        return 1.0 + (weights + 3 * trained) / 50e6

    def _time_limit_reached(self) -> bool:
        """Whether step ``step + 1`` and the writes it leads to might end past the time limit."""
        limit = self.stop.time_limit
        if limit is None or not self._step_seconds:
            return False
        cfg = self.config
        checkpoint = self._checkpoint_estimate()
        now, following = self.step, self.step + 1

        def validates(step: int) -> bool:
            return self.task.validate is not None and step % cfg.validate_every_steps == 0

        needed = max(self._step_seconds)
        needed += checkpoint if now % cfg.checkpoint.every_steps == 0 else 0.0  # still to write for this step
        needed += self._validation_seconds * (validates(now) + validates(following))
        needed += checkpoint * (2 if following == self.max_steps else 1)  # checkpoint after it (+ export)
        return seconds_since_process_start() + 1.25 * needed > limit

    def _stop_reason(self, signals: StopSignals) -> str | None:
        """Why every process stops after this step, or None; the same answer on every process."""
        code = 0
        if self.stop.signals and signals.requested is not None:
            code = int(signals.requested)
        elif self._time_limit_reached():
            code = _STOP_FOR_TIME
        if self.accelerator.num_processes > 1:  # one all-reduce: a request of any process stops all
            flag = torch.tensor([code], dtype=torch.int64, device=self.accelerator.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            code = int(flag.item())
        if code == _STOP_FOR_TIME:
            return "time limit"
        if code:
            if signals.requested is None:  # another process's signal: remember it, as if received here
                signals.request(code)
            return signal_name(code)
        if self.stop.after_steps is not None and self.step >= self.stop.after_steps:
            return "stop after steps"
        return None

    # ---- loop

    def _check_finite(self, value: torch.Tensor, what: str) -> None:
        bad = (~torch.isfinite(value.detach().float())).float().reshape(1)
        if self.accelerator.num_processes > 1:  # every process must stop together
            bad = self.accelerator.reduce(bad, reduction="sum")
        if bad.item() > 0:
            raise NonFiniteLossError(self.step + 1, what, self.last_checkpoint)

    def run(self, signals: StopSignals, validate_at_end: bool = True) -> TrainingResult:
        acc, cfg, task = self.accelerator, self.config, self.task
        result = TrainingResult(step=self.step, last_checkpoint=self.last_checkpoint, final_model_dir=None)
        logger = _RunLogger(self.output_dir / "logs", acc.is_main_process, cfg.logging.tensorboard,
                            purge_step=self.step + 1 if self.step else None)
        batches = _batches(task.train_dataset, self.sampler, cfg.batch_size, self.step * cfg.grad_accum_steps,
                           cfg.num_workers, task.collate_fn, cfg.seed)
        if acc.is_main_process and self.step < self.max_steps:
            print(plan_line(self.max_steps, self.step, cfg.batch_size, acc.num_processes, cfg.grad_accum_steps,
                            checkpoint_every=cfg.checkpoint.every_steps,
                            validate_every=cfg.validate_every_steps if task.validate is not None else None),
                  flush=True)
        progress = tqdm(total=self.max_steps, initial=self.step, unit="step", dynamic_ncols=True,
                        disable=not (acc.is_main_process and cfg.logging.progress_bar))
        self.model.train()
        images_per_step = self.global_batch
        window_start, window_steps, window_loss = _clock(), 0, 0.0
        loop_start, first_step = _clock(), self.step
        estimates_shown = 0  # 1 after the first few steps, 2 after the first validation
        part_logs: dict[str, float] = {}  # sums over the logging window of the loss_step's logs

        def log_window() -> None:
            nonlocal window_start, window_steps, window_loss, part_logs
            elapsed = max(_clock() - window_start, 1e-9)
            mean_loss = self._mean_across_processes(window_loss / window_steps)
            scalars = {"loss": mean_loss, "lr": self.scheduler.get_last_lr()[0],
                       "steps_per_s": window_steps / elapsed,
                       "images_per_s": window_steps * images_per_step / elapsed}
            scalars.update({f"loss/{k}": self._mean_across_processes(v / window_steps)
                            for k, v in sorted(part_logs.items())})
            logger.log(self.step, scalars)
            progress.set_postfix(loss=f"{mean_loss:.4g}", img_s=f"{scalars['images_per_s']:.2f}")
            window_start, window_steps, window_loss = _clock(), 0, 0.0
            part_logs = {}

        def validate_and_log() -> None:
            nonlocal estimates_shown
            started = _clock()
            report = self.validate()
            if report is not None:
                metrics, images = report
                written = write_validation_images(self.output_dir, self.step, images)
                logger.log_images(self.step, images)
                result.validation.append((self.step, metrics))
                logger.log(self.step, {f"val/{k}": v for k, v in metrics.items()})
                progress.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                               + (f" ({len(written)} images in {written[0].parent})" if written else ""))
            self._validation_seconds = _clock() - started
            self._validation_measured = True
            if acc.is_main_process and estimates_shown == 1 and self.step < self.max_steps:
                progress.write(self._estimate_line(validate_at_end))  # now with the validation's time
                estimates_shown = 2

        def maybe_estimate() -> None:
            nonlocal estimates_shown
            if (acc.is_main_process and estimates_shown == 0 and self.step < self.max_steps
                    and (self.step - first_step >= ESTIMATE_AFTER_STEPS or _clock() - loop_start >= ESTIMATE_AFTER_S)):
                progress.write(self._estimate_line(validate_at_end))
                estimates_shown = 1

        if self.stop.after_steps is not None and self.max_steps > self.step >= self.stop.after_steps:
            result.stop_reason = "stop after steps"  # resumed at or after the requested stop: no step to take
        try:
            while self.step < self.max_steps and result.stop_reason is None:
                step_started = _clock()
                step_loss = 0.0
                for micro in range(cfg.grad_accum_steps):
                    batch = _to_device(next(batches), acc.device)
                    last_micro = micro == cfg.grad_accum_steps - 1
                    sync = nullcontext() if last_micro else acc.no_sync(self.model)
                    with sync:
                        loss, logs = task.loss_step(self.model, batch)
                        self._check_finite(loss, "the loss")
                        acc.backward(loss / cfg.grad_accum_steps)
                    step_loss += float(loss.detach()) / cfg.grad_accum_steps
                    for key, value in logs.items():
                        part_logs[key] = part_logs.get(key, 0.0) + float(value) / cfg.grad_accum_steps
                if cfg.grad_clip_norm is not None:
                    grad_norm = acc.clip_grad_norm_(self.parameters, cfg.grad_clip_norm)
                    if cfg.mixed_precision != "fp16":  # fp16: the scaler skips overflowing steps itself
                        self._check_finite(torch.as_tensor(grad_norm), "the gradient norm")
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                if self.ema is not None:
                    self.ema.update(self.unwrapped, self.step)
                result.losses.append(step_loss)
                self._step_seconds.append(_clock() - step_started)

                window_steps += 1
                window_loss += step_loss
                progress.update(1)
                maybe_estimate()
                finished = self.step == self.max_steps
                if self.step % cfg.logging.every_steps == 0 or finished:
                    log_window()
                checkpoint_due = self.step % cfg.checkpoint.every_steps == 0 or finished
                validation_due = task.validate is not None and (self.step % cfg.validate_every_steps == 0
                                                                or (finished and validate_at_end))
                validated = False
                # Two decision points: after the step, and after the writes that follow it (so a
                # signal that comes during a checkpoint or a validation stops before the next step).
                # Both depend on the step only, so every process takes part in the same all-reduces.
                stop_reason = None if finished else self._stop_reason(signals)
                if stop_reason is None:
                    if checkpoint_due:
                        self.save_checkpoint()
                    if validation_due:
                        validate_and_log()
                        validated = True
                    if (checkpoint_due or validation_due) and not finished:
                        stop_reason = self._stop_reason(signals)
                if stop_reason is not None:
                    if window_steps:
                        log_window()  # the steps since the last log line are not trained again
                    if self.last_checkpoint is None or self.last_checkpoint.name != _checkpoint_name(self.step):
                        self.save_checkpoint()
                    # A planned stop still validates when due; a signal or the clock skips it.
                    if stop_reason == "stop after steps" and validation_due and not validated:
                        validate_and_log()
                    result.stop_reason = stop_reason
                    break
        finally:
            progress.close()
            logger.close()
        if result.stop_reason is None and (self.last_checkpoint is None or
                                           self.last_checkpoint.name != _checkpoint_name(self.step)):
            self.save_checkpoint()  # resumed at/after max_steps: still leave a checkpoint of the stop
        result.step = self.step
        result.last_checkpoint = self.last_checkpoint
        if task.save_final is not None and result.stop_reason is None:
            final_dir = self.output_dir / "model"
            if acc.is_main_process:
                model = self.unwrapped
                context = self.ema.applied_to(model) if (self.ema is not None and cfg.ema.use_for_export) else nullcontext()
                with context:
                    task.save_final(model, final_dir)
            acc.wait_for_everyone()
            result.final_model_dir = final_dir
        return result

    def _mean_across_processes(self, value: float) -> float:
        if self.accelerator.num_processes == 1:
            return value
        tensor = torch.tensor([value], device=self.accelerator.device)
        return float(self.accelerator.reduce(tensor, reduction="mean").item())

    def validate(self) -> tuple[dict[str, float], list[ValidationImage]] | None:
        """The task's validation on the main process: its metrics and images (None on the other
        processes). The random number generators are put back afterwards, so that a hook that
        draws from them cannot make a resumed run (which does not repeat the validation of its
        checkpoint's step) differ from an uninterrupted one."""
        acc = self.accelerator
        report = None
        if acc.is_main_process:
            model = self.unwrapped
            was_training = model.training
            model.eval()
            use_ema = self.ema is not None and self.config.ema.use_for_validation
            rng_small, rng_tensors = _rng_state()
            try:
                with torch.no_grad(), (self.ema.applied_to(model) if use_ema else nullcontext()):  # type: ignore[union-attr]
                    returned = self.task.validate(model, self.step)  # type: ignore[misc]
            finally:
                _set_rng_state(rng_small, rng_tensors)
            model.train(was_training)
            if isinstance(returned, ValidationReport):
                report = ({k: float(v) for k, v in returned.metrics.items()}, list(returned.images))
            else:
                report = ({k: float(v) for k, v in returned.items()}, [])
        acc.wait_for_everyone()
        return report

    def _estimate_line(self, validate_at_end: bool) -> str:
        """The time the rest of the run will take and when it will end, in one line."""
        measured = list(self._step_seconds)
        # The first step of a process also builds kernels and fills caches: leave it out once there are others.
        step_seconds = statistics.median(measured[1:] if len(measured) > 1 else measured)
        cfg = self.config
        validate_every = cfg.validate_every_steps if self.task.validate is not None else None
        seconds, validations, checkpoints = remaining_time(
            self.step, self.max_steps, step_seconds, checkpoint_every=cfg.checkpoint.every_steps,
            checkpoint_seconds=self._checkpoint_estimate(), validate_every=validate_every,
            validation_seconds=self._validation_seconds if self._validation_measured else None,
            validate_at_end=validate_at_end)
        remaining = self.max_steps - self.step
        parts = [f"{format_duration(step_seconds)} a step"]
        if checkpoints:
            parts.append(f"{_plural(checkpoints, 'checkpoint')} of ~{format_duration(self._checkpoint_estimate())}")
        if validations:
            each = (f"~{format_duration(self._validation_seconds)} each" if self._validation_measured
                    else "not timed yet, left out")
            parts.append(f"{_plural(validations, 'validation')}, {each}")
        finish = time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(time.time() + seconds))
        return (f"step {self.step} of {self.max_steps}: about {format_duration(seconds)} left for the remaining "
                f"{_plural(remaining, 'step')} ({'; '.join(parts)}), done around {finish}")


_clock = time.perf_counter  # the timer of steps, checkpoints and validation (tests replace it)
_STOP_FOR_TIME = 1_000  # above every signal number, so the all-reduce's maximum names the clock first


def _checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


#: The first time estimate comes after this many steps of the run, or this many seconds,
#: whichever comes first.
ESTIMATE_AFTER_STEPS = 5
ESTIMATE_AFTER_S = 30.0


def _plural(count: int, word: str, plural: str | None = None) -> str:
    return f"{count} {word if count == 1 else (plural or word + 's')}"


def plan_line(max_steps: int, step: int, batch_size: int, num_processes: int, grad_accum_steps: int, *,
              checkpoint_every: int, validate_every: int | None) -> str:
    """What a run is about to do, in one line: its steps and its effective batch (the samples one
    optimizer step averages: per-process batch x processes x accumulation steps)."""
    effective = batch_size * num_processes * grad_accum_steps
    cadence = f"checkpoint every {_plural(checkpoint_every, 'step')}"
    cadence += f", validation every {_plural(validate_every, 'step')}" if validate_every is not None else ", no validation"
    return (f"training {_plural(max_steps, 'step')} (from step {step}), batch {batch_size} per process x "
            f"{_plural(num_processes, 'process', 'processes')} x {_plural(grad_accum_steps, 'accumulation step')} "
            f"= effective batch {effective}; {cadence}")


def _due_after(step: int, max_steps: int, every: int | None, at_end: bool) -> int:
    """How many of the steps ``step + 1 .. max_steps`` are multiples of ``every``, plus the last
    step when ``at_end`` and it is not one."""
    if every is None or step >= max_steps:
        return 0
    count = max_steps // every - step // every
    return count + (1 if at_end and max_steps % every else 0)


def remaining_time(step: int, max_steps: int, step_seconds: float, *, checkpoint_every: int,
                   checkpoint_seconds: float, validate_every: int | None, validation_seconds: float | None,
                   validate_at_end: bool = True) -> tuple[float, int, int]:
    """Seconds the steps after ``step`` take with the checkpoints and validations they lead to
    (the engine writes one of each at the last step too); returns (seconds, validations,
    checkpoints). An unmeasured validation (``validation_seconds`` None) counts as no time."""
    checkpoints = _due_after(step, max_steps, checkpoint_every, at_end=True)
    validations = _due_after(step, max_steps, validate_every, at_end=validate_at_end)
    seconds = (max_steps - step) * step_seconds + checkpoints * checkpoint_seconds
    seconds += validations * (validation_seconds or 0.0)
    return seconds, validations, checkpoints


def format_duration(seconds: float) -> str:
    """``0.42 s``, ``12 s``, ``4 min 05 s``, ``3 h 07 min``, ``2 d 03 h``."""
    if seconds < 10:
        return f"{seconds:.2g} s" if seconds < 1 else f"{seconds:.1f} s"
    whole = int(round(seconds))
    if whole < 60:
        return f"{whole} s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes:02d} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours:02d} h"


def _layout_change_note(state: dict[str, Any], num_processes: int, config: TrainingConfig) -> str | None:
    """What resuming with another process count or batch changes, in one line (None: nothing)."""
    saved = (state["num_processes"], state["batch_size"], state.get("grad_accum_steps", 1))
    now = (num_processes, config.batch_size, config.grad_accum_steps)
    if saved == now:
        return None
    before, after = saved[0] * saved[1] * saved[2], now[0] * now[1] * now[2]
    describe = "{} process(es) x batch {} x {} accumulation step(s)".format
    if before == after:
        change = (f"the global batch stays {after}, so each step draws the same samples of the same epoch "
                  "(while the training set is a multiple of the global batch), summed in another order: "
                  "close to, not bit-identical with, an uninterrupted run")
    else:
        change = (f"the global batch changes from {before} to {after}, so the steps from here on draw other "
                  "samples than an uninterrupted run would")
    return (f"note: resuming a checkpoint of {describe(*saved)} with {describe(*now)}: weights, EMA, optimizer, "
            f"schedule and step are restored; {change}")


def run_training(task: TrainingTask, config: TrainingConfig, output_dir: str | os.PathLike[str], *,
                 accelerator: Accelerator | None = None, max_steps: int | None = None,
                 resume: str | None = None, overwrite: bool = False, stop: StopRules | None = None,
                 run_config: Any = None) -> TrainingResult:
    """Train ``task`` for ``max_steps`` (default ``config.max_steps``) optimizer steps, or until a
    :class:`StopRules` stop (``result.stop_reason``).

    ``resume``: None (``output_dir`` must be empty), ``"auto"`` (newest checkpoint of
    ``output_dir``, a fresh start when there is none), ``"latest"`` (newest checkpoint, which must
    exist) or a checkpoint folder; ``overwrite`` deletes a previous run in ``output_dir`` first
    (:func:`~swintormer.core.run_control.prepare_run_folder`); a folder another run is writing is
    refused (:class:`~swintormer.core.run_control.RunFolderLock`). ``run_config`` (a pydantic model)
    is saved as ``config.yaml`` once the folder is ready. Raises :class:`NonFiniteLossError` on
    NaN/inf (no checkpoint is written for the bad step) and
    :class:`~swintormer.core.config.ConfigError` for unusable settings or folders.
    """
    accelerator = accelerator or make_accelerator(config)
    steps = max_steps if max_steps is not None else config.max_steps
    output_dir = Path(output_dir)
    folder_lock = RunFolderLock(output_dir)  # held by the main process until the run ends
    try:
        checkpoint = _prepare_folder(accelerator, output_dir, resume, overwrite, steps, folder_lock)
        return _train_in_folder(task, config, output_dir, accelerator, checkpoint, steps, stop, run_config)
    finally:
        folder_lock.release()


def _train_in_folder(task: TrainingTask, config: TrainingConfig, output_dir: Path, accelerator: Accelerator,
                     checkpoint: Path | None, steps: int, stop: StopRules | None, run_config: Any) -> TrainingResult:
    _seed_everything(config.seed + 1000 * accelerator.process_index)
    engine = _Engine(task, config, output_dir, accelerator, steps, stop)
    with stop_signals() as signals:
        if checkpoint is not None:
            engine.load_checkpoint(checkpoint)
            accelerator.print(f"resumed from {checkpoint} at step {engine.step}")
        if accelerator.is_main_process:
            output_dir.mkdir(parents=True, exist_ok=True)
            if checkpoint is not None:
                cut_metrics_log(output_dir / "logs" / "metrics.jsonl", engine.step)
                remove_later_steps(output_dir, engine.step)
            if run_config is not None:
                save_config(run_config, output_dir / "config.yaml")
            write_status(output_dir, "running", step=engine.step, max_steps=steps)
        accelerator.wait_for_everyone()
        try:
            result = engine.run(signals)
        except NonFiniteLossError as exc:
            _final_status(accelerator, output_dir, "failed", engine, steps, reason=str(exc), exit_code=1)
            raise
        except KeyboardInterrupt:
            _final_status(accelerator, output_dir, "aborted", engine, steps, reason="second SIGINT",
                          exit_code=EXIT_ABORTED, wait=False)
            raise
        if result.stop_reason is None:
            _final_status(accelerator, output_dir, "finished", engine, steps, exit_code=0)
        else:
            code = 0 if result.stop_reason == "stop after steps" else EXIT_STOPPED
            _final_status(accelerator, output_dir, "stopped", engine, steps, reason=result.stop_reason, exit_code=code)
    return result


def _prepare_folder(accelerator: Accelerator, output_dir: Path, resume: str | None, overwrite: bool,
                    max_steps: int, lock: RunFolderLock) -> Path | None:
    """The main process takes the folder's lock and applies :func:`prepare_run_folder`; its
    answer (or error) reaches every process."""
    def take_folder() -> str | None:
        lock.acquire()
        checkpoint, lines = prepare_run_folder(output_dir, resume, overwrite, max_steps)
        for line in lines:
            print(line)
        return str(checkpoint) if checkpoint is not None else None

    checkpoint, error = answer_from_main_process(accelerator, take_folder, catch=(ConfigError,))
    if error is not None:
        raise ConfigError(error)
    return Path(checkpoint) if checkpoint is not None else None


def _final_status(accelerator: Accelerator, output_dir: Path, state: str, engine: _Engine, max_steps: int,
                  wait: bool = True, **fields: Any) -> None:
    """``status.json`` by the main process; the other processes wait for it, so that a launcher
    that stops them when one exits cannot interrupt its writing."""
    if accelerator.is_main_process:
        last = engine.last_checkpoint
        write_status(output_dir, state, step=engine.step, max_steps=max_steps,
                     checkpoint=str(last.relative_to(output_dir)) if last is not None and last.is_relative_to(output_dir)
                     else (str(last) if last else None), **fields)
    if wait and accelerator.num_processes > 1:
        accelerator.wait_for_everyone()


def train_and_report(task: TrainingTask, config: TrainingConfig, output_dir: str | os.PathLike[str], *,
                     accelerator: Accelerator, resume: str | None, saved: str = "model",
                     overwrite: bool = False, stop: StopRules | None = None, run_config: Any = None) -> int:
    """:func:`run_training` for a pipeline's ``main``: one line and an exit code instead of a
    traceback, and a closing line naming the saved ``saved`` and the last validation scores.

    Exit codes: 0 the run reached ``max_steps`` (or ``stop.after_steps``); 75
    (:data:`~swintormer.core.run_control.EXIT_STOPPED`) stopped by a signal or the time limit,
    with a checkpoint to resume; 1 non-finite loss; 2 unusable settings or run folder; 130
    aborted by a second SIGINT.
    """
    try:
        result = run_training(task, config, output_dir, accelerator=accelerator, resume=resume,
                              overwrite=overwrite, stop=stop, run_config=run_config)
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aborted by a second SIGINT; no checkpoint was written for the step in progress", file=sys.stderr)
        return EXIT_ABORTED
    if result.stop_reason is not None:
        code = 0 if result.stop_reason == "stop after steps" else EXIT_STOPPED
        if accelerator.is_main_process:
            print(f"stopped at step {result.step} of {config.max_steps} ({result.stop_reason}); checkpoint "
                  f"{result.last_checkpoint}; continue with --resume auto (exit code {code})", file=sys.stderr)
        return code
    if accelerator.is_main_process:
        last = result.validation[-1] if result.validation else None
        scores = f"; validation at step {last[0]}: " + ", ".join(f"{k} {v:.4f}" for k, v in last[1].items()) if last else ""
        print(f"trained {result.step} steps; {saved} saved to {result.final_model_dir}{scores}")
    return 0


# --------------------------------------------------------------------------- helpers


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _enable_gradient_checkpointing(model: nn.Module) -> None:
    if hasattr(model, "set_gradient_checkpointing"):
        model.set_gradient_checkpointing(True)
    elif hasattr(model, "enable_gradient_checkpointing"):
        model.enable_gradient_checkpointing()
    else:
        raise ConfigError(f"train.gradient_checkpointing: {type(model).__name__} has no activation checkpointing switch")


class _RunLogger:
    """JSON lines in ``logs/metrics.jsonl`` and TensorBoard scalars, main process only.

    A resumed run passes ``purge_step`` (its first step): TensorBoard then hides the events a
    stopped run logged from that step on, as the JSON log is cut back to the checkpoint."""

    def __init__(self, folder: Path, enabled: bool, tensorboard: bool, purge_step: int | None = None) -> None:
        self.enabled = enabled
        self.writer = None
        self.folder = folder
        if not enabled:
            return
        folder.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None  # type: ignore[assignment,misc]
            if SummaryWriter is not None:
                self.writer = SummaryWriter(log_dir=str(folder / "tensorboard"), purge_step=purge_step)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.folder / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **scalars}) + "\n")
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)

    def log_images(self, step: int, images: Sequence[ValidationImage]) -> None:
        """Validation images as TensorBoard images tagged ``validation/<name>`` (when TensorBoard logs)."""
        if self.writer is None:
            return
        for image in images:
            self.writer.add_image(f"validation/{image.name}", side_by_side(image.panels), step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def write_json_atomic(path: Path, data: Any) -> None:
    """Small JSON state written atomically (used by pipelines for run metadata)."""
    atomic_write_text(path, json.dumps(data, indent=1))
