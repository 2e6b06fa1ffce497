"""The network computes the authors' function: their weights, their input, their output.

Uses ``../shared/reference`` (see its README): the authors' tiny model with perturbed random
weights, and its output on a fixed input, computed with their code.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from swintormer.models import Swintormer, SwintormerConfig
from swintormer.models.reference_checkpoint import (
    config_from_reference_arguments,
    convert_reference_checkpoint,
    load_reference_state_dict,
    read_reference_arguments,
)

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def reference(reference_dir: Path) -> dict:
    return {
        "weights": reference_dir / "swintormer_tiny_official_weights.safetensors",
        "config": reference_dir / "swintormer_tiny_config.json",
        "io": load_file(reference_dir / "swintormer_tiny_io.safetensors"),
        "shapes": reference_dir / "swintormer_paper_state_dict_shapes.txt",
    }


def _max_error(model: Swintormer, io: dict) -> float:
    with torch.inference_mode():
        return (model.eval()(io["input"]) - io["output"]).abs().max().item()


def test_converted_reference_weights_reproduce_reference_output(reference, tmp_path):
    model_dir = tmp_path / "tiny"
    done = subprocess.run(
        [sys.executable, str(REPO / "tools/convert_reference_checkpoint.py"), str(reference["weights"]),
         "--config", str(reference["config"]), "--output", str(model_dir)],
        capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr
    model = Swintormer.from_pretrained(model_dir)
    assert model.config == SwintormerConfig.preset("tiny")
    assert _max_error(model, reference["io"]) < TOLERANCE
    # Training mode (dropout-free) must agree as well.
    model.train()
    with torch.no_grad():
        assert (model(reference["io"]["input"]) - reference["io"]["output"]).abs().max().item() < TOLERANCE

    # …and again after another save/load round trip.
    model.save_pretrained(tmp_path / "again")
    assert _max_error(Swintormer.from_pretrained(tmp_path / "again"), reference["io"]) < TOLERANCE


def test_gradient_checkpointing_keeps_reference_output(reference):
    model = convert_reference_checkpoint(reference["weights"], read_reference_arguments(reference["config"]))
    model.train().set_gradient_checkpointing(True)
    x = reference["io"]["input"][:1].clone().requires_grad_(True)
    out = model(x)
    assert (out - reference["io"]["output"][:1]).abs().max().item() < TOLERANCE
    out.mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_converter_unwraps_basicsr_checkpoints(reference, tmp_path):
    state = load_file(reference["weights"])
    wrapped = {
        "params": {f"module.{k}": torch.zeros_like(v) for k, v in state.items()},
        "params_ema": {f"module.{k}": v for k, v in state.items()},
    }
    torch.save(wrapped, tmp_path / "net_g_latest.pth")
    arguments = read_reference_arguments(reference["config"])
    # Default: the EMA weights, which reproduce the reference output.
    model = convert_reference_checkpoint(tmp_path / "net_g_latest.pth", arguments)
    assert _max_error(model, reference["io"]) < TOLERANCE
    # Explicitly the raw params (all zeros here): a different function.
    zeros = convert_reference_checkpoint(tmp_path / "net_g_latest.pth", arguments, key="params")
    assert all(p.abs().sum() == 0 for p in zeros.parameters())


def test_every_paper_parameter_maps_through_the_converter(reference, tmp_path):
    lines = [l.split("\t") for l in reference["shapes"].read_text().splitlines() if l and not l.startswith("#")]
    shapes = {name: tuple(int(d) for d in dims.strip("[]").split(",")) for name, dims in lines}
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 25_177_224
    # A checkpoint as the authors' trainer writes it, wrapped and with the fairscale prefix.
    torch.save({"params": {k: torch.zeros(s) for k, s in shapes.items()}}, tmp_path / "paper.pth")
    state = load_reference_state_dict(tmp_path / "paper.pth")
    model = Swintormer(SwintormerConfig.preset("paper"))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in state.items()} == ours
    assert sum(p.numel() for p in model.parameters()) == 25_177_224
    arguments = {
        "inp_channels": 6, "dim": 48, "num_blocks": [2, 4, 6, 8], "num_refinement_blocks": 4,
        "heads": [1, 2, 4, 8], "ffn_expansion_factor": 2.66, "bias": False, "window_size": 16,
        "LayerNorm_type": "WithBias",
    }
    assert config_from_reference_arguments(arguments) == SwintormerConfig.preset("paper")


def test_converter_lists_unknown_missing_and_misshaped_keys(reference, tmp_path):
    state = load_file(reference["weights"])
    broken = dict(state)
    del broken["latent.0.attn.qkv.weight"]
    broken["encoder_level1.0.attn.extra"] = torch.zeros(3)
    broken["output.0.weight"] = torch.zeros(12, 15, 3, 3)
    save_file(broken, tmp_path / "broken.safetensors")
    arguments = read_reference_arguments(reference["config"])
    with pytest.raises(ValueError) as error:
        convert_reference_checkpoint(tmp_path / "broken.safetensors", arguments)
    message = str(error.value)
    assert "1 missing: latent.0.attn.qkv.weight" in message
    assert "1 unexpected: encoder_level1.0.attn.extra" in message
    assert "output.0.weight [12, 15, 3, 3] (expected [12, 16, 3, 3])" in message

    # The command line reports it in one line on stderr, exit code 2, and writes nothing.
    done = subprocess.run(
        [sys.executable, str(REPO / "tools/convert_reference_checkpoint.py"), str(tmp_path / "broken.safetensors"),
         "--config", str(reference["config"]), "--output", str(tmp_path / "out")],
        capture_output=True, text=True,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("error: weights in") and done.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "arguments, message",
    [({"dim": 8, "colour": 1}, "unknown reference constructor argument(s): colour"),
     ({"LayerNorm_type": "BiasFree"}, "LayerNorm_type 'BiasFree' is not supported")],
)
def test_converter_rejects_bad_constructor_arguments(arguments, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_reference_arguments(arguments)


def test_converter_rejects_unreadable_files(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_reference_state_dict(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="cannot read .*empty.pth"):
        load_reference_state_dict(tmp_path / "empty.pth")
    with pytest.raises(ValueError, match="unsupported checkpoint extension '.npz'"):
        load_reference_state_dict(tmp_path / "weights.npz")
