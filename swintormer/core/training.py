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
- exact resume from ``latest`` or a checkpoint folder;
- a NaN/inf guard: a non-finite loss or gradient norm stops every process with
  :class:`NonFiniteLossError` naming the step; the last good checkpoint is left untouched;
- progress bar with loss and speed, a JSON-lines log and TensorBoard when installed,
  validation every N steps on the main process (EMA weights by default; the other processes
  wait at a barrier, so keep validation well under the process group's timeout).

A pipeline's use, in full::

    accelerator = make_accelerator(config.train)           # before anything prints or writes
    task = TrainingTask(model=net, loss_step=lambda m, b: loss(m(b["input"]), b["target"]),
                        train_dataset=patches, aux_modules=[loss], validate=validate,
                        save_final=lambda m, folder: m.save_pretrained(folder))
    result = run_training(task, config.train, run_dir, accelerator=accelerator, resume="latest")

The run folder then holds ``checkpoints/step_XXXXXXXX/`` (``model.safetensors``,
``ema.safetensors``, ``optimizer.safetensors`` + ``optimizer.json``, ``scheduler.json``,
``rng.safetensors``, ``grad_scaler.json`` with fp16, and ``trainer_state.json`` written last),
``logs/metrics.jsonl``, ``logs/tensorboard/`` and ``model/`` (from ``save_final``).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
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
from swintormer.core.config import ConfigError, SchedulerConfig, TrainingConfig
from swintormer.core.files import atomic_folder, atomic_write_text, remove_stale_temporaries

__all__ = [
    "LossStep",
    "TrainingTask",
    "TrainingResult",
    "NonFiniteLossError",
    "ExponentialMovingAverage",
    "EpochShardSampler",
    "make_accelerator",
    "lr_factor_fn",
    "find_checkpoint",
    "run_training",
]

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step_"
STATE_FILE = "trainer_state.json"  # written last inside a checkpoint: marks it complete

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
    ``ema.use_for_validation`` is off) and returns metrics to log. ``save_final(model, folder)``
    exports the final model (EMA weights unless ``ema.use_for_export`` is off).
    """

    model: nn.Module
    loss_step: LossStep
    train_dataset: Dataset
    parameters: Sequence[nn.Parameter] | None = None
    aux_modules: Sequence[nn.Module] = ()
    validate: Callable[[nn.Module, int], dict[str, float]] | None = None
    save_final: Callable[[nn.Module, Path], None] | None = None
    collate_fn: Callable[[list[Any]], Any] = default_collate


@dataclass
class TrainingResult:
    step: int
    last_checkpoint: Path | None
    final_model_dir: Path | None
    validation: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # per-step loss of this process


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
    """Resolve ``--resume``: ``latest`` = newest complete checkpoint of ``output_dir`` (None if
    there is none yet); otherwise a checkpoint folder that must exist and be complete."""
    if resume == "latest":
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
                 accelerator: Accelerator, max_steps: int) -> None:
        self.task = task
        self.config = config
        self.output_dir = Path(output_dir)
        self.accelerator = accelerator
        self.max_steps = max_steps
        self.step = 0
        self.last_checkpoint: Path | None = None

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

    # ---- checkpoints

    def save_checkpoint(self) -> Path:
        """Write checkpoint ``step_<step>``; every process must call this (RNG states are gathered)."""
        acc = self.accelerator
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
                state = {"step": self.step, "num_processes": acc.num_processes,
                         "batch_size": self.config.batch_size,
                         "grad_accum_steps": self.config.grad_accum_steps, "seed": self.config.seed,
                         "rng": {str(rank): small for rank, small, _ in all_rng}}
                _write_json(tmp / STATE_FILE, state)  # last: its presence marks a complete checkpoint
            self._prune_checkpoints()
        acc.wait_for_everyone()
        self.last_checkpoint = folder
        return folder

    def _prune_checkpoints(self) -> None:
        folder = self.output_dir / CHECKPOINT_DIR
        complete = sorted(p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_FILE).is_file())
        for old in complete[: -self.config.checkpoint.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, folder: Path) -> None:
        acc = self.accelerator
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        load_model(self.unwrapped, str(folder / "model.safetensors"), device=str(acc.device))
        if self.ema is not None:
            ema_file = folder / "ema.safetensors"
            if ema_file.is_file():
                self.ema.load_state_dict(load_file(str(ema_file), device=str(acc.device)))
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
        if state["num_processes"] != acc.num_processes or state["batch_size"] != self.config.batch_size:
            acc.print(f"warning: resuming with {acc.num_processes} processes × batch {self.config.batch_size} "
                      f"from a checkpoint made with {state['num_processes']} × {state['batch_size']}: "
                      "weights and optimizer are restored but the data order differs from an uninterrupted run")
        if rank in state["rng"]:
            rng_tensors = load_file(str(folder / "rng.safetensors"))
            prefix = f"rank{rank}."
            _set_rng_state(state["rng"][rank],
                           {k[len(prefix):]: v for k, v in rng_tensors.items() if k.startswith(prefix)})
        else:
            _seed_everything(self.config.seed + 1000 * acc.process_index + self.step)
        self.last_checkpoint = folder

    # ---- loop

    def _check_finite(self, value: torch.Tensor, what: str) -> None:
        bad = (~torch.isfinite(value.detach().float())).float().reshape(1)
        if self.accelerator.num_processes > 1:  # every process must stop together
            bad = self.accelerator.reduce(bad, reduction="sum")
        if bad.item() > 0:
            raise NonFiniteLossError(self.step + 1, what, self.last_checkpoint)

    def run(self, validate_at_end: bool = True) -> TrainingResult:
        acc, cfg, task = self.accelerator, self.config, self.task
        result = TrainingResult(step=self.step, last_checkpoint=self.last_checkpoint, final_model_dir=None)
        logger = _RunLogger(self.output_dir / "logs", acc.is_main_process, cfg.logging.tensorboard)
        batches = _batches(task.train_dataset, self.sampler, cfg.batch_size, self.step * cfg.grad_accum_steps,
                           cfg.num_workers, task.collate_fn, cfg.seed)
        progress = tqdm(total=self.max_steps, initial=self.step, unit="step", dynamic_ncols=True,
                        disable=not (acc.is_main_process and cfg.logging.progress_bar))
        self.model.train()
        images_per_step = cfg.batch_size * cfg.grad_accum_steps * acc.num_processes
        window_start, window_steps, window_loss = time.perf_counter(), 0, 0.0
        part_logs: dict[str, float] = {}  # sums over the logging window of the loss_step's logs
        try:
            while self.step < self.max_steps:
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

                window_steps += 1
                window_loss += step_loss
                progress.update(1)
                if self.step % cfg.logging.every_steps == 0 or self.step == self.max_steps:
                    elapsed = max(time.perf_counter() - window_start, 1e-9)
                    mean_loss = self._mean_across_processes(window_loss / window_steps)
                    scalars = {"loss": mean_loss, "lr": self.scheduler.get_last_lr()[0],
                               "steps_per_s": window_steps / elapsed,
                               "images_per_s": window_steps * images_per_step / elapsed}
                    scalars.update({f"loss/{k}": self._mean_across_processes(v / window_steps)
                                    for k, v in sorted(part_logs.items())})
                    logger.log(self.step, scalars)
                    progress.set_postfix(loss=f"{mean_loss:.4g}", img_s=f"{scalars['images_per_s']:.2f}")
                    window_start, window_steps, window_loss = time.perf_counter(), 0, 0.0
                    part_logs = {}
                finished = self.step == self.max_steps
                if self.step % cfg.checkpoint.every_steps == 0 or finished:
                    self.save_checkpoint()
                if task.validate is not None and (self.step % cfg.validate_every_steps == 0
                                                  or (finished and validate_at_end)):
                    metrics = self.validate()
                    if metrics is not None:
                        result.validation.append((self.step, metrics))
                        logger.log(self.step, {f"val/{k}": v for k, v in metrics.items()})
                        progress.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        finally:
            progress.close()
            logger.close()
        if self.step >= self.max_steps and (self.last_checkpoint is None or
                                            not self.last_checkpoint.name.endswith(f"{self.step:08d}")):
            self.save_checkpoint()  # resumed at/after max_steps: still leave a checkpoint of the stop
        result.step = self.step
        result.last_checkpoint = self.last_checkpoint
        if task.save_final is not None:
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

    def validate(self) -> dict[str, float] | None:
        acc = self.accelerator
        metrics = None
        if acc.is_main_process:
            model = self.unwrapped
            was_training = model.training
            model.eval()
            use_ema = self.ema is not None and self.config.ema.use_for_validation
            with torch.no_grad(), (self.ema.applied_to(model) if use_ema else nullcontext()):  # type: ignore[union-attr]
                metrics = {k: float(v) for k, v in self.task.validate(model, self.step).items()}  # type: ignore[misc]
            model.train(was_training)
        acc.wait_for_everyone()
        return metrics


def run_training(task: TrainingTask, config: TrainingConfig, output_dir: str | os.PathLike[str], *,
                 accelerator: Accelerator | None = None, max_steps: int | None = None,
                 resume: str | None = None) -> TrainingResult:
    """Train ``task`` for ``max_steps`` (default ``config.max_steps``) optimizer steps.

    ``resume`` is ``"latest"`` (newest checkpoint in ``output_dir``; a fresh start when there
    is none) or a checkpoint folder. Raises :class:`NonFiniteLossError` on NaN/inf (no
    checkpoint is written for the bad step) and :class:`~swintormer.core.config.ConfigError` for
    unusable settings.
    """
    accelerator = accelerator or make_accelerator(config)
    steps = max_steps if max_steps is not None else config.max_steps
    _seed_everything(config.seed + 1000 * accelerator.process_index)
    engine = _Engine(task, config, Path(output_dir), accelerator, steps)
    if resume is not None:
        checkpoint = find_checkpoint(Path(output_dir), resume)
        if checkpoint is None:
            accelerator.print(f"no checkpoint in {Path(output_dir) / CHECKPOINT_DIR}; starting at step 0")
        else:
            engine.load_checkpoint(checkpoint)
            accelerator.print(f"resumed from {checkpoint} at step {engine.step}")
    return engine.run()


def train_and_report(task: TrainingTask, config: TrainingConfig, output_dir: str | os.PathLike[str], *,
                     accelerator: Accelerator, resume: str | None, saved: str = "model") -> int:
    """:func:`run_training` for a pipeline's ``main``: one ``error:`` line and an exit code
    (1 for a non-finite loss, 2 for unusable settings) instead of a traceback, and a closing
    line naming the saved ``saved`` and the last validation scores. Returns the exit code."""
    try:
        result = run_training(task, config, output_dir, accelerator=accelerator, resume=resume)
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
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
    """JSON lines in ``logs/metrics.jsonl`` and TensorBoard scalars, main process only."""

    def __init__(self, folder: Path, enabled: bool, tensorboard: bool) -> None:
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
                self.writer = SummaryWriter(log_dir=str(folder / "tensorboard"))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.folder / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **scalars}) + "\n")
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def write_json_atomic(path: Path, data: Any) -> None:
    """Small JSON state written atomically (used by pipelines for run metadata)."""
    atomic_write_text(path, json.dumps(data, indent=1))
