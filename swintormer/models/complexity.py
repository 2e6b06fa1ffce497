"""Multiply-accumulate (MAC) counting for any model, attributed to its top-level stages.

A ``TorchDispatchMode`` sees every ATen op of a forward pass; matrix products and convolutions
are counted with their textbook MAC formulas (element-wise work, normalisation and softmax are
not counted, the convention of the field's MAC tables). Run it on the ``meta`` device and the
forward only propagates shapes, so a 4K image is counted in well under a second.
``tests/test_complexity.py`` checks the totals against ``torch.utils.flop_counter``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


def _numel(shape: torch.Size | tuple[int, ...]) -> int:
    return math.prod(shape)


def op_macs(func, args: tuple, output) -> int:
    """MACs of one ATen op (0 for ops that are not products or convolutions)."""
    packet = getattr(func, "overloadpacket", None)
    if packet in (aten.mm, aten.addmm):
        a, b = (args[0], args[1]) if packet is aten.mm else (args[1], args[2])
        return a.shape[0] * a.shape[1] * b.shape[1]
    if packet in (aten.bmm, aten.baddbmm):
        a, b = (args[0], args[1]) if packet is aten.bmm else (args[1], args[2])
        return a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    if packet is aten.convolution:
        weight, transposed = args[1], args[6]
        if transposed:  # every input element meets every kernel tap of its group
            return _numel(args[0].shape) * _numel(weight.shape[1:])
        # weight: out × in/groups × kh × kw; each output element needs in/groups·kh·kw MACs.
        return _numel(output.shape) * _numel(weight.shape[1:])
    return 0


@dataclass
class MacCount:
    total: int = 0
    by_stage: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    @property
    def gmacs(self) -> float:
        return self.total / 1e9


class _Counter(TorchDispatchMode):
    def __init__(self, result: MacCount, scope: list[str]) -> None:
        super().__init__()
        self.result, self.scope = result, scope

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        macs = op_macs(func, args, output)
        if macs:
            self.result.total += macs
            self.result.by_stage[self.scope[-1] if self.scope else "(top level)"] += macs
        return output


def count_macs(model: nn.Module, *inputs: torch.Tensor) -> MacCount:
    """Run ``model(*inputs)`` and count its MACs per top-level child module.

    The forward runs with autograd enabled, so that even a model converted by
    ``swintormer.models.cpu_inference.prepare_for_inference`` runs the reference code and its
    own products (the engine's oneDNN products, padded to whole vectors in the FFN, would count
    differently). On the ``meta`` device that costs nothing; on real tensors the graph is
    dropped when the call returns.
    """
    result, scope = MacCount(), []

    def enter(name: str):
        def hook(_module, _inputs) -> None:
            scope.append(name)
        return hook

    def leave(_module, _inputs, _output) -> None:  # must return None: a value replaces the output
        scope.pop()

    handles = []
    for name, child in model.named_children():
        handles.append(child.register_forward_pre_hook(enter(name)))
        handles.append(child.register_forward_hook(leave))
    try:
        with torch.enable_grad(), _Counter(result, scope):
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    result.by_stage = dict(result.by_stage)
    return result
