"""Where the processes of a run execute, decided once for every pipeline.

Pipelines never choose a device or a process count themselves: accelerate's launcher does.
One gap needs closing here. On a machine without an accelerator, accelerate (1.15) starts
several processes only through ``accelerate launch --multi_gpu --num_processes N`` (plain
``--cpu --num_processes N`` starts one process unless an MPI host file is given), and each of
those processes must then ask for the CPU explicitly, or it believes it runs alone. So: when no
accelerator is present, every pipeline asks accelerate for the CPU, which gives one process
the CPU as usual and several processes a gloo process group.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator, PartialState


def has_accelerator() -> bool:
    """True when a CUDA, MPS or XPU device is usable by this process."""
    xpu = getattr(torch, "xpu", None)
    return bool(
        torch.cuda.is_available() or torch.backends.mps.is_available() or (xpu is not None and xpu.is_available())
    )


def process_state() -> PartialState:
    """This process's place among the launched processes, and its device."""
    return PartialState(cpu=not has_accelerator())


def make_accelerator(**kwargs: Any) -> Accelerator:
    """An ``Accelerator`` for a training run (kwargs as accelerate's, e.g. ``mixed_precision``)."""
    kwargs.setdefault("cpu", not has_accelerator())
    return Accelerator(**kwargs)
