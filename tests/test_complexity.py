"""The MAC counter: its formulas against PyTorch's FLOP counter, and the paper's figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from swintormer.models import Swintormer, SwintormerConfig
from swintormer.models.complexity import count_macs

REPO = Path(__file__).resolve().parents[1]


# Both counters run the model with autograd on, so that both see the reference code rather than
# the CPU inference engine's oneDNN ops (and its position-bias cache) even on a converted model.


def _flop_counter_macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    with torch.enable_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2  # PyTorch counts a multiply-accumulate as 2 FLOPs


def test_textbook_layers():
    conv = torch.nn.Conv2d(4, 6, kernel_size=3, padding=1, groups=2)
    assert count_macs(conv, torch.rand(2, 4, 5, 7)).total == 2 * 6 * 5 * 7 * (2 * 9)
    linear = torch.nn.Linear(10, 3)
    assert count_macs(linear, torch.rand(4, 5, 10)).total == 4 * 5 * 10 * 3


@pytest.mark.parametrize("shape", [(2, 6, 128, 256), (1, 6, 77, 131)])
def test_agrees_with_torch_flop_counter_on_a_real_forward(shape):
    model = Swintormer(SwintormerConfig.preset("tiny")).train()
    x = torch.rand(*shape)
    ours = count_macs(model, x)
    assert ours.total == _flop_counter_macs(model, x)
    assert sum(ours.by_stage.values()) == ours.total
    assert set(ours.by_stage) >= {"patch_embed", "encoder_level1", "latent", "refinement", "output"}


def test_paper_preset_at_256_is_about_33_gmacs():
    with torch.device("meta"):
        model = Swintormer(SwintormerConfig.preset("paper")).train()
        x = torch.empty(1, 6, 256, 256)
        ours = count_macs(model, x)
        assert ours.total == _flop_counter_macs(model, x)
    assert ours.gmacs == pytest.approx(33.15, abs=0.01)


def test_command_line_reports_parameters_and_gmacs(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "tools/count_macs.py"), "--config", "paper", "--size", "256", "256",
         "--json", str(tmp_path / "macs.json")],
        capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "25,177,224" in done.stdout
    report = json.loads((tmp_path / "macs.json").read_text())
    assert report["parameters"] == 25_177_224 and report["gmacs"] == pytest.approx(33.15, abs=0.01)

    bad = subprocess.run([sys.executable, str(REPO / "tools/count_macs.py"), "--config", "nope"],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: unknown Swintormer preset 'nope'; known: paper, small,")
    assert bad.stderr.count("\n") == 1
