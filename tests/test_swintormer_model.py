"""Behaviour of the Swintormer network beyond the reference vector: sizes, batches, gradients,
variants, configuration, saving and loading. The CPU inference engine is tested in
``test_cpu_inference.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from safetensors.torch import load_file

import swintormer
from swintormer.models import Swintormer, SwintormerConfig
from swintormer.models.swintormer import softmax_plus_one, window_partition, window_reverse
from swintormer.core.padding import pad_to_multiple, reflect_pad


@pytest.fixture(scope="module")
def tiny() -> Swintormer:
    torch.manual_seed(0)
    model = Swintormer(SwintormerConfig.preset("tiny")).eval()
    # Perturb so that LayerNorm and biases are not at their identity initial values.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_softmax_plus_one_matches_its_definition():
    scores = torch.randn(4, 7, 9) * 5
    shifted = scores - scores.amax(-1, keepdim=True)
    expected = shifted.exp() / (1 + shifted.exp().sum(-1, keepdim=True))
    torch.testing.assert_close(softmax_plus_one(scores), expected, rtol=1e-6, atol=1e-7)
    assert (softmax_plus_one(scores).sum(-1) < 1).all()


def test_window_partition_and_reverse():
    x = torch.arange(2 * 3 * 16 * 24, dtype=torch.float32).view(2, 3, 16, 24)
    windows = window_partition(x, 8)
    assert windows.shape == (2 * 2 * 3, 3, 8, 8)
    assert torch.equal(windows[4], x[0, :, 8:16, 8:16])  # row-major per image: image 0, row 1, column 1
    assert torch.equal(windows[7], x[1, :, 0:8, 8:16])  # image 1, row 0, column 1
    assert windows.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(window_reverse(windows, 16, 24), x)


def test_reflect_pad_equals_torch_where_torch_can_and_mirrors_beyond():
    x = torch.arange(2 * 5 * 7, dtype=torch.float32).view(1, 2, 5, 7)
    torch.testing.assert_close(reflect_pad(x, 3, 4), F.pad(x, (0, 4, 0, 3), mode="reflect"))
    row = torch.tensor([[[[0.0, 1.0, 2.0]]]])
    assert reflect_pad(row, 0, 7)[0, 0, 0].tolist() == [0, 1, 2, 1, 0, 1, 2, 1, 0, 1]
    assert pad_to_multiple(torch.zeros(1, 3, 1, 1), 8).shape == (1, 3, 8, 8)


@pytest.mark.parametrize("size", [(37, 53), (128, 128), (129, 200), (8, 300)])
def test_any_size_is_padded_by_reflection_and_cropped_back(tiny, size):
    x = torch.rand(1, 6, *size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        out = tiny(x)
        padded = tiny(pad_to_multiple(x, tiny.config.size_multiple))
    assert out.shape == (1, 3, *size)
    torch.testing.assert_close(out, padded[:, :, : size[0], : size[1]], rtol=0, atol=1e-6)


def test_batch_items_are_independent(tiny):
    x = torch.rand(3, 6, 128, 256, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        batched = tiny(x)
        single = torch.cat([tiny(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-5)


def test_gradients_reach_every_parameter():
    torch.manual_seed(3)
    model = Swintormer(SwintormerConfig.preset("tiny")).train()
    x = torch.rand(2, 6, 128, 128)
    target = torch.rand(2, 3, 128, 128)
    F.l1_loss(model(x), target).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_gradient_checkpointing_gives_identical_gradients():
    torch.manual_seed(4)
    model = Swintormer(SwintormerConfig.preset("tiny")).train()
    x = torch.rand(1, 6, 128, 128)
    grads = []
    for enabled in (False, True):
        model.zero_grad()
        model.set_gradient_checkpointing(enabled)
        model(x).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-8, msg=name)


def test_no_prior_variant_takes_three_channels():
    config = SwintormerConfig.preset("tiny", in_channels=3)
    model = Swintormer(config).eval()
    with6 = Swintormer(SwintormerConfig.preset("tiny"))
    assert model.patch_embed.proj2.weight.shape == (8, 12, 3, 3)
    # Only the patch embedding differs: 3 channels × 4 (unshuffle) × 3 × 3 × dim fewer weights.
    difference = sum(p.numel() for p in with6.parameters()) - sum(p.numel() for p in model.parameters())
    assert difference == 3 * 4 * 9 * 8
    with torch.inference_mode():
        assert model(torch.rand(1, 3, 64, 64)).shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match=r"expects N×3×H×W input, got shape \(1, 6, 64, 64\)"):
        model(torch.rand(1, 6, 64, 64))


def test_identity_at_output_conv_zero_returns_blurry_input():
    # With the last conv zeroed the network returns its first three input channels: the global
    # residual of the reference ((2x−1) + 0 + 1) / 2 = x.
    model = Swintormer(SwintormerConfig.preset("tiny")).eval()
    torch.nn.init.zeros_(model.output[0].weight)
    x = torch.rand(1, 6, 50, 70)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), x[:, :3], rtol=0, atol=1e-6)


@pytest.mark.parametrize("attention", ["window", "channel"])
def test_single_branch_attention_variants(attention):
    torch.manual_seed(5)
    mixed = Swintormer(SwintormerConfig.preset("tiny")).eval()
    variant = Swintormer(SwintormerConfig.preset("tiny", attention=attention)).eval()
    # Same parameter shapes, so the same weights can be loaded: only the routing differs.
    variant.load_state_dict(mixed.state_dict())
    x = torch.rand(1, 6, 128, 128)
    with torch.inference_mode():
        assert (variant(x) - mixed(x)).abs().max() > 1e-4


def test_save_and_load_round_trip(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json", "model.safetensors"]
    loaded = Swintormer.from_pretrained(tmp_path / "model")
    assert loaded.config == tiny.config and not loaded.training
    for (name, a), (_, b) in zip(tiny.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    # Saving over an existing folder replaces it whole.
    Swintormer(SwintormerConfig.preset("tiny", in_channels=3)).save_pretrained(tmp_path / "model")
    assert Swintormer.from_pretrained(tmp_path / "model").config.in_channels == 3
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_shipped_model_folder_loads_and_saves_in_the_same_format(tmp_path):
    shipped = Path(swintormer.__file__).parent / "weights/default"
    model = Swintormer.from_pretrained(shipped)
    model.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again/config.json").read_text()) == json.loads((shipped / "config.json").read_text())
    saved, original = load_file(tmp_path / "again/model.safetensors"), load_file(shipped / "model.safetensors")
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in saved)


def test_from_pretrained_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        Swintormer.from_pretrained(tmp_path / "nothing")
    Swintormer(SwintormerConfig.preset("tiny")).save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="incomplete: missing model.safetensors"):
        Swintormer.from_pretrained(tmp_path / "m")
    Swintormer(SwintormerConfig.preset("tiny")).save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "depth": 3}))
    with pytest.raises(ValueError, match="unknown SwintormerConfig key"):
        Swintormer.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "dim": 16}))
    with pytest.raises(ValueError, match="mis-shaped"):
        Swintormer.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read weights"):
        Swintormer.from_pretrained(tmp_path / "m")


def test_config_validation_and_presets():
    paper = SwintormerConfig.preset("paper")
    assert (paper.dim, paper.num_blocks, paper.heads, paper.window_size, paper.size_multiple) == (
        48, (2, 4, 6, 8), (1, 2, 4, 8), 16, 256)
    assert SwintormerConfig.from_dict(paper.to_dict()) == paper
    assert SwintormerConfig.from_dict(json.loads(json.dumps(paper.to_dict()))) == paper  # lists → tuples
    assert paper.to_dict()["num_blocks"] == [2, 4, 6, 8] and paper.to_dict()["attention"] == "mixed"
    assert SwintormerConfig.preset("paper", in_channels=3).in_channels == 3
    assert hash(paper) == hash(SwintormerConfig())
    with pytest.raises(ValidationError, match="frozen"):
        paper.dim = 32
    with pytest.raises(ValueError, match="unknown Swintormer preset 'huge'"):
        SwintormerConfig.preset("huge")
    with pytest.raises(ValueError, match="24 attention channels at width 48 do not split into 5 heads"):
        SwintormerConfig(dim=48, heads=(5, 2, 4, 8))
    with pytest.raises(ValueError, match=r"unknown SwintormerConfig key\(s\): depth, width"):
        SwintormerConfig.from_dict({"dim": 8, "depth": 3, "width": 1})
    with pytest.raises(ValueError, match=r"attention\n  Input should be 'mixed', 'window', 'channel' or 'topk'"):
        SwintormerConfig(attention="global")
    with pytest.raises(ValueError, match=r"dim\n  Input should be a multiple of 2"):
        SwintormerConfig(dim=47)
    with pytest.raises(ValueError, match=r"num_blocks\n  Tuple should have at most 4 items"):
        SwintormerConfig(num_blocks=(1, 1, 1, 1, 1))


def test_sparse_gated_family_is_a_config_switch(tmp_path):
    from swintormer.models.sparse_gated import FrequencyGatedFeedForward, TopKChannelAttention

    config = SwintormerConfig.preset("sparse_gated_tiny")
    assert (config.block, config.attention, config.ffn, config.size_multiple) == (
        "sparse_gated", "topk", "frequency_gated", 16)
    torch.manual_seed(7)
    model = Swintormer(config)
    blocks = [m for m in model.modules() if m.__class__.__name__ == "TransformerBlock"]
    assert blocks and all(isinstance(b.attn, TopKChannelAttention) for b in blocks)
    assert all(isinstance(b.ffn, FrequencyGatedFeedForward) for b in blocks)
    # Any size multiple of 16 runs unpadded; others are padded and cropped back.
    x = torch.rand(1, 6, 48, 80)
    F.l1_loss(model(x), torch.rand(1, 3, 48, 80)).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0] == []
    model.eval().save_pretrained(tmp_path / "sparse")
    loaded = Swintormer.from_pretrained(tmp_path / "sparse")
    assert loaded.config == config
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x[:, :, :40, :50]), model(x[:, :, :40, :50]), rtol=0, atol=0)


def test_pieces_swap_into_the_mixed_block():
    from swintormer.models.swintormer import GatedFeedForward, MixedWindowAttention
    from swintormer.models.sparse_gated import FrequencyGatedFeedForward, TopKChannelAttention

    with_dffn = Swintormer(SwintormerConfig.preset("tiny", ffn="frequency_gated"))
    block = with_dffn.encoder_level1[0]
    assert isinstance(block.attn, MixedWindowAttention) and isinstance(block.ffn, FrequencyGatedFeedForward)
    with_tksa = Swintormer(SwintormerConfig.preset("tiny", attention="topk"))
    block = with_tksa.encoder_level1[0]
    assert isinstance(block.attn, TopKChannelAttention) and isinstance(block.ffn, GatedFeedForward)
    assert with_tksa.config.size_multiple == 16  # no windows left to cut
    with pytest.raises(ValueError, match=r"block\n  Input should be 'mixed' or 'sparse_gated'"):
        SwintormerConfig(block="dense")
    with pytest.raises(ValueError, match=r"ffn\n  Input should be 'gated' or 'frequency_gated'"):
        SwintormerConfig(ffn="mlp")


def test_sparse_gated_gopro_preset_has_about_the_paper_parameter_count():
    with torch.device("meta"):
        params = sum(p.numel() for p in Swintormer(SwintormerConfig.preset("sparse_gated_gopro")).parameters())
    assert params == 25_276_924
    assert abs(params - 25_177_224) / 25_177_224 < 0.01
