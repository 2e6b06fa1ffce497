"""Every trained parameter's gradient comes back with the parameter's own strides.

DDP lays each gradient bucket out with the parameter's strides and compares them, all of them,
with the gradient's after every backward pass; a difference (even in a size-one dimension, which
autograd itself ignores) makes it warn "Grad strides do not match bucket view strides" and copy.
These checks ask the same question without a process group, for the networks both trainings
wrap in DDP.
"""

from __future__ import annotations

import pytest
import torch

from ldm_prior.finetune import select_for_objective
from ldm_prior.model import PriorModel
from ldm_prior.trainer import PriorTrainer
from swintormer.models import Swintormer, SwintormerConfig


def mismatched_gradients(module: torch.nn.Module) -> list[str]:
    """The parameters whose gradient's strides differ from the parameter's (or that lack one)."""
    return [f"{name} {tuple(p.shape)}: parameter {p.stride()}, gradient {None if p.grad is None else p.grad.stride()}"
            for name, p in module.named_parameters()
            if p.requires_grad and (p.grad is None or p.grad.stride() != p.stride())]


# Which kernel runs a 1×1 convolution (oneDNN, whose weight gradients come back in channels-last
# strides, or PyTorch's native one) depends on the number of windows and threads: one batch of
# each kind.
SHAPES = [(2, 3, 32, 32), (1, 3, 24, 40)]


@pytest.mark.parametrize("overrides", [{"window_size": 2}, {}, {"attention": "topk", "ffn": "frequency_gated"}],
                         ids=["window2", "default", "sparse_gated"])
def test_swintormer_gradients_have_their_parameters_strides(overrides) -> None:
    torch.manual_seed(0)
    model = Swintormer(SwintormerConfig.preset("tiny", in_channels=3, **overrides))
    for shape in SHAPES:
        model.zero_grad(set_to_none=True)
        model(torch.rand(shape)).square().mean().backward()
        assert mismatched_gradients(model) == [], shape


def test_swintormer_weights_keep_their_strides_through_saving_loading_and_copying(model_dir, tmp_path) -> None:
    """The 1×1 and depth-wise weights' strides survive what a training run does to a model."""
    import copy

    loaded = Swintormer.from_pretrained(model_dir)
    qkv = loaded.encoder_level1[0].attn.qkv.weight  # 1×1: channels-last strides, still contiguous
    assert qkv.stride() == torch.empty(qkv.shape, memory_format=torch.channels_last).stride()
    assert qkv.is_contiguous()
    for model in (loaded, copy.deepcopy(loaded), loaded.to(torch.float64).to(torch.float32)):
        model.zero_grad(set_to_none=True)
        model(torch.rand(2, 3, 32, 32)).mean().backward()
        assert mismatched_gradients(model) == []
    loaded.save_pretrained(tmp_path / "again")
    again = Swintormer.from_pretrained(tmp_path / "again")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), again.state_dict().values()))


@pytest.mark.parametrize("objective,mode", [("noise", "quarter"), ("noise", "full"), ("vq_decoder", "full"),
                                            ("vq_autoencoder", "full")])
def test_prior_gradients_have_their_parameters_strides(objective, mode) -> None:
    prior = PriorModel.from_config("tiny", seed=0)
    select_for_objective(prior, objective, ["unet.*"] if objective == "noise" else None, objective == "noise")
    trainer = PriorTrainer(prior, objective, mode)
    generator = torch.Generator().manual_seed(0)
    sharp = torch.rand(2, 3, 32, 32, generator=generator)
    torch.manual_seed(0)
    loss, _ = trainer(sharp.roll(1, -1), sharp)
    loss.backward()
    assert mismatched_gradients(trainer) == []
