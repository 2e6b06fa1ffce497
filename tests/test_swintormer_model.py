"""Behaviour of the Swintormer network beyond the reference vector: sizes, batches, gradients,
variants, configuration, saving and loading."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from swintormer.models import Swintormer, SwintormerConfig
from swintormer.models.swintormer import l2_norms, softmax_plus_one, window_group_pieces, window_partition, window_piece
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


@pytest.mark.parametrize("shift", [0, 4])
@pytest.mark.parametrize("group", [1, 2, 3])
def test_window_group_pieces_cut_the_windows_torch_roll_brings(shift, group):
    """A shifted block's groups of windows are cut from the unrolled map, wrapping around its
    edges: the pieces must assemble exactly the windows of the map rolled by −shift, and cover
    every pixel of the map once."""
    window, height, width = 8, 24, 48
    image_map = torch.randn(height, width, 5)
    rolled = window_partition(torch.roll(image_map, (-shift, -shift), (0, 1)).permute(2, 0, 1)[None], window)
    rolled = rolled.view(height // window, width // window, 5, window, window).permute(0, 1, 3, 4, 2)
    covered = torch.zeros(height, width, dtype=torch.int64)
    for row in range(height // window):
        for col in range(0, width // window, group):
            buffer = torch.full((group, window, window, 5), float("nan"))
            for group_index, map_index, whole in window_group_pieces(
                window, group, row * window + shift, col * window + shift, height, width
            ):
                buffer[group_index] = window_piece(image_map, map_index, whole)
                covered[map_index] += 1
            assert torch.equal(buffer, rolled[row, col : col + group])
    assert (covered == 1).all()


def test_l2_norms_equal_vector_norm_clamped_like_normalize():
    x = torch.randn(3, 40, 12)
    x[0, :, 2] = 0  # a zero column: F.normalize's eps applies
    for dim in (1, -1):
        expected = torch.linalg.vector_norm(x, dim=dim, keepdim=True).clamp_min(1e-12)
        torch.testing.assert_close(l2_norms(x, dim, keepdim=True), expected)
        torch.testing.assert_close(x / l2_norms(x, dim, keepdim=True), F.normalize(x, dim=dim))
    assert l2_norms(x.bfloat16(), dim=1).dtype == torch.bfloat16


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


def test_inference_cache_follows_new_weights(tiny):
    x = torch.rand(1, 6, 128, 128, generator=torch.Generator().manual_seed(6))
    model = Swintormer(SwintormerConfig.preset("tiny")).eval()
    with torch.inference_mode():
        model(x)  # fills the position-bias cache with the initial weights
    model.load_state_dict(tiny.state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(model(x), tiny(x), rtol=0, atol=1e-6)


def test_a_model_built_under_inference_mode_runs_and_follows_weight_updates(tiny):
    """Weights made under torch.inference_mode carry no version counter, so in-place updates to
    them cannot be seen: nothing derived from them (packed weights, position biases) may be
    cached, and a weight update must show in the next forward."""
    x = torch.rand(1, 6, 64, 64, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        model = Swintormer(SwintormerConfig.preset("tiny")).eval()
        model(x)
        model.load_state_dict(tiny.state_dict())  # in-place copies into the inference tensors
        torch.testing.assert_close(model(x), tiny(x), rtol=0, atol=1e-6)


def test_packed_pointwise_matches_linear_and_follows_every_weight_change():
    """fp32 CPU inference runs 1×1 convs on oneDNN with a packed copy of the weight; the copy
    must be remade whenever the weight changes, however it changes."""
    from swintormer.models import layers

    if not layers._ONEDNN_LINEAR:
        pytest.skip("this PyTorch build has no oneDNN linear")
    generator = torch.Generator().manual_seed(3)
    conv = torch.nn.Conv2d(24, 40, kernel_size=1, bias=True)
    tokens = torch.randn(3, 7, 5, 24, generator=generator)  # an odd …×C token tensor

    def expected() -> torch.Tensor:
        return F.linear(tokens, conv.weight.flatten(1), conv.bias)

    with torch.inference_mode():
        assert layers.uses_packed_weights(tokens)
        torch.testing.assert_close(layers.pointwise(conv, tokens), expected(), rtol=0, atol=1e-5)
        packed = layers.packed_weight(conv, "linear", layers.pack_linear_weight)
        assert layers.packed_weight(conv, "linear", layers.pack_linear_weight) is packed  # packed once, reused
    with torch.no_grad():
        conv.weight.mul_(-2.0)  # an in-place update, as an optimiser step or EMA copy makes
    with torch.inference_mode():
        torch.testing.assert_close(layers.pointwise(conv, tokens), expected(), rtol=0, atol=1e-5)
    conv.load_state_dict(torch.nn.Conv2d(24, 40, kernel_size=1, bias=True).state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(layers.pointwise(conv, tokens), expected(), rtol=0, atol=1e-5)
    conv.weight = torch.nn.Parameter(torch.randn(40, 24, 1, 1, generator=generator))
    with torch.inference_mode():
        torch.testing.assert_close(layers.pointwise(conv, tokens), expected(), rtol=0, atol=1e-5)
    # Training and autocast keep PyTorch's own linear: it has gradients and casts its operands.
    assert not layers.uses_packed_weights(tokens)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert not layers.uses_packed_weights(tokens)
        assert layers.pointwise(conv, tokens).dtype == torch.bfloat16


def test_packed_conv2d_matches_the_conv_and_follows_weight_changes():
    """fp32 CPU inference runs the dense convs on oneDNN with a weight packed per input size;
    the results must be nn.Conv2d's, for every input size and after a weight update."""
    from swintormer.models import layers

    if not layers._ONEDNN_CONV:
        pytest.skip("this PyTorch build has no oneDNN convolution")
    generator = torch.Generator().manual_seed(4)
    packed = layers.PackedConv2d(12, 20, kernel_size=3, padding=1, bias=True)
    plain = torch.nn.Conv2d(12, 20, kernel_size=3, padding=1, bias=True)
    plain.load_state_dict(packed.state_dict())
    for shape in ((1, 12, 16, 24), (2, 12, 9, 7)):
        x = torch.randn(shape, generator=generator).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            torch.testing.assert_close(packed(x), plain(x), rtol=0, atol=1e-5)
            assert ("conv", shape) in layers._packed_weights[packed]
    with torch.no_grad():
        packed.weight.mul_(-2.0)
        plain.weight.mul_(-2.0)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), plain(x), rtol=0, atol=1e-5)
    x.requires_grad_(True)
    assert packed(x).grad_fn is not None  # training: PyTorch's own conv, with gradients


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
    assert dataclasses.replace(paper, in_channels=3).in_channels == 3
    with pytest.raises(ValueError, match="unknown Swintormer preset 'huge'"):
        SwintormerConfig.preset("huge")
    with pytest.raises(ValueError, match="24 attention channels at width 48 do not split into 5 heads"):
        SwintormerConfig(dim=48, heads=(5, 2, 4, 8))
    with pytest.raises(ValueError, match="attention must be one of"):
        SwintormerConfig(attention="global")


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
    with pytest.raises(ValueError, match="block must be one of"):
        SwintormerConfig(block="dense")
    with pytest.raises(ValueError, match="ffn must be one of"):
        SwintormerConfig(ffn="mlp")


def test_sparse_gated_gopro_preset_has_about_the_paper_parameter_count():
    with torch.device("meta"):
        params = sum(p.numel() for p in Swintormer(SwintormerConfig.preset("sparse_gated_gopro")).parameters())
    assert params == 25_276_924
    assert abs(params - 25_177_224) / 25_177_224 < 0.01


@pytest.mark.parametrize(("shift", "bias"), [(0, False), (4, True)])
def test_cache_blocked_inference_paths_run_on_cpu_only(monkeypatch, shift, bias):
    """CPU inference runs the blocks a group of windows / pixels at a time (for CPU caches), with
    the same numbers as the plain path and without touching the block's input; training,
    autocast and other devices (a GPU: here the meta device) take the plain path, one batched
    operation per step."""
    import copy

    from swintormer.models.swintormer import GatedFeedForward, MixedWindowAttention, TransformerBlock

    calls = []

    def recording(cls):
        blocked_forward = cls.residual_forward

        def residual_forward(self, *args, **kwargs):
            calls.append(cls)
            return blocked_forward(self, *args, **kwargs)

        return residual_forward

    for cls in (MixedWindowAttention, GatedFeedForward):
        monkeypatch.setattr(cls, "residual_forward", recording(cls))
    # Groups of 2 of a row's 6 windows, so that groups inside the map and at its edges both occur.
    monkeypatch.setattr(MixedWindowAttention, "GROUP_BYTES", 2 * 3 * 16 * 8 * 8 * 4)
    torch.manual_seed(0)
    config = SwintormerConfig.preset("tiny", bias=bias)  # with biases, the padded FFN pads them too
    block = TransformerBlock(config, dim=16, num_heads=2, shift_size=shift).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.rand(2, 16, 32, 48).contiguous(memory_format=torch.channels_last)
    original = x.clone()
    with torch.no_grad():
        blocked = block(x)
    assert calls == [MixedWindowAttention, GatedFeedForward]
    assert torch.equal(x, original)
    calls.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        block(x)
    on_meta = copy.deepcopy(block).to("meta")
    with torch.no_grad():
        assert on_meta(x.to("meta")).shape == x.shape
    assert calls == []
    torch.testing.assert_close(block(x), blocked, rtol=0, atol=1e-5)  # the plain (grad-enabled) path
    assert calls == []
