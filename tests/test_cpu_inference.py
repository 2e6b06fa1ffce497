"""The CPU inference engine computes the reference network's function with the same parameters.

Exact (``torch.equal``) where the engine only reorders or regroups the same products: the
packed convolution against ``nn.Conv2d``, and the cache-blocked block (groups of windows, blocks
of pixels, the zero-padded FFN) against the engine's own unblocked path. Against the reference
code, whose arithmetic differs (normalised q and k, bias added after the product), to 1e-5.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from swintormer.models import Swintormer, SwintormerConfig
from swintormer.models import cpu_inference as engine
from swintormer.models.cpu_inference import is_prepared, prepare_for_inference, restore_reference
from swintormer.models.swintormer import TransformerBlock, window_partition

TOLERANCE = 1e-5


def _perturbed(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Parameters moved off their initial values (LayerNorms off 1/0, biases off 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return module


def _model(preset: str, **overrides) -> Swintormer:
    torch.manual_seed(0)
    return _perturbed(Swintormer(SwintormerConfig.preset(preset, **overrides)).eval())


def _calls(monkeypatch) -> list[str]:
    """Record every call of the engine's CPU-only paths."""
    calls: list[str] = []
    paths = [(engine.CpuMixedWindowAttention, "residual_forward"), (engine.CpuGatedFeedForward, "residual_forward"),
             (engine, "pointwise"), (engine, "packed_weight")]
    for owner, name in paths:
        original = getattr(owner, name)

        def recording(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, recording)
    return calls


@pytest.mark.parametrize("preset", ["tiny", "small", "sparse_gated_tiny"])
def test_converted_model_equals_the_reference_model(preset):
    reference = _model(preset)
    converted = prepare_for_inference(copy.deepcopy(reference))
    x = torch.rand(2, 6, 128, 192, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(converted(x), reference(x), rtol=0, atol=TOLERANCE)


def test_converted_model_reproduces_the_reference_vector(reference_dir):
    model = Swintormer(SwintormerConfig.preset("tiny"))
    model.load_state_dict(load_file(reference_dir / "swintormer_tiny_official_weights.safetensors"))
    io = load_file(reference_dir / "swintormer_tiny_io.safetensors")
    prepare_for_inference(model.eval())
    with torch.inference_mode():
        assert (model(io["input"]) - io["output"]).abs().max().item() < TOLERANCE


@pytest.mark.parametrize(
    ("preset", "attention", "shift", "bias"),
    [("tiny", "mixed", 0, False), ("tiny", "mixed", 4, True), ("small", "mixed", 4, False),
     ("small", "mixed", 0, True), ("tiny", "window", 4, False), ("tiny", "channel", 4, True)],
)
def test_blocked_block_equals_the_unblocked_path_exactly_and_the_reference_closely(
    monkeypatch, preset, attention, shift, bias
):
    """The blocked block (groups of 2 of a row's 6 windows, so that groups inside the map and
    at its wrapped edges both occur; the FFN's hidden width padded) gives the very bits of the
    engine's unblocked token path, and the reference block's output to 1e-5, leaving its input
    untouched."""
    monkeypatch.setattr(engine.CpuMixedWindowAttention, "GROUP_BYTES", 2 * 3 * 16 * 8 * 8 * 4)
    torch.manual_seed(0)
    config = SwintormerConfig.preset(preset, bias=bias, attention=attention)
    reference = _perturbed(TransformerBlock(config, dim=16, num_heads=2, shift_size=shift).eval())
    block = prepare_for_inference(copy.deepcopy(reference))
    x = torch.rand(2, 16, 32, 48).contiguous(memory_format=torch.channels_last)
    original = x.clone()
    calls = _calls(monkeypatch)
    with torch.no_grad():
        blocked = block(x)
        assert calls.count("residual_forward") == 2
        unblocked = x + block.attn(block.norm1(x))
        unblocked = unblocked + block.ffn(block.norm2(unblocked))
        expected = reference(x)
    assert torch.equal(x, original)
    assert torch.equal(blocked, unblocked)
    torch.testing.assert_close(blocked, expected, rtol=0, atol=TOLERANCE)


def test_packed_conv_equals_nn_conv2d_exactly_and_follows_weight_changes():
    if not engine.onednn_conv_available():
        pytest.skip("this PyTorch build has no oneDNN convolution")
    generator = torch.Generator().manual_seed(4)
    conv = torch.nn.Conv2d(12, 20, kernel_size=3, padding=1, bias=True)
    plain = copy.deepcopy(conv)
    prepare_for_inference(conv)
    assert type(conv) is engine.CpuConv2d
    for shape in ((1, 12, 16, 24), (2, 12, 9, 7)):
        x = torch.randn(shape, generator=generator).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            assert torch.equal(conv(x), plain(x))
            assert ("packed", ("conv", shape)) in engine._caches[conv]
    with torch.no_grad():
        conv.weight.mul_(-2.0)
        plain.weight.mul_(-2.0)
    with torch.inference_mode():
        assert torch.equal(conv(x), plain(x))
    x.requires_grad_(True)
    assert conv(x).grad_fn is not None  # autograd: PyTorch's own conv, with gradients


def test_packed_pointwise_follows_every_weight_change():
    """A packed copy of a weight must be remade whenever the weight changes, however it changes."""
    if not engine.onednn_linear_available():
        pytest.skip("this PyTorch build has no oneDNN linear")
    generator = torch.Generator().manual_seed(3)
    conv = torch.nn.Conv2d(24, 40, kernel_size=1, bias=True)
    tokens = torch.randn(3, 7, 5, 24, generator=generator)  # an odd …×C token tensor

    def expected() -> torch.Tensor:
        return F.linear(tokens, conv.weight.flatten(1), conv.bias)

    with torch.inference_mode():
        assert engine.packs_linear(tokens)
        torch.testing.assert_close(engine.pointwise(conv, tokens), expected(), rtol=0, atol=TOLERANCE)
        packed = engine.packed_weight(conv, "linear", engine.pack_linear_weight)
        assert engine.packed_weight(conv, "linear", engine.pack_linear_weight) is packed  # packed once, reused
    with torch.no_grad():
        conv.weight.mul_(-2.0)  # an in-place update, as an optimiser step or EMA copy makes
    with torch.inference_mode():
        torch.testing.assert_close(engine.pointwise(conv, tokens), expected(), rtol=0, atol=TOLERANCE)
    conv.load_state_dict(torch.nn.Conv2d(24, 40, kernel_size=1, bias=True).state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(engine.pointwise(conv, tokens), expected(), rtol=0, atol=TOLERANCE)
    conv.weight = torch.nn.Parameter(torch.randn(40, 24, 1, 1, generator=generator))
    with torch.inference_mode():
        torch.testing.assert_close(engine.pointwise(conv, tokens), expected(), rtol=0, atol=TOLERANCE)
    # Autograd and autocast keep PyTorch's own linear: it has gradients and casts its operands.
    assert not engine.packs_linear(tokens)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert not engine.packs_linear(tokens)
        assert engine.pointwise(conv, tokens).dtype == torch.bfloat16


def test_conversion_keeps_state_dict_names_is_idempotent_and_reversible(tmp_path):
    reference = _model("tiny")
    names = {k: v.shape for k, v in reference.state_dict().items()}
    model = prepare_for_inference(copy.deepcopy(reference))
    assert prepare_for_inference(model) is model and is_prepared(model)
    assert {k: v.shape for k, v in model.state_dict().items()} == names
    assert type(model.encoder_level2[1].attn) is engine.CpuMixedWindowAttention
    assert type(model.encoder_level2[1].attn.qkv_dwconv) is torch.nn.Conv2d  # depth-wise: PyTorch's path
    x = torch.rand(1, 6, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        model(x)  # packs weights and caches the position bias
    assert {k: v.shape for k, v in model.state_dict().items()} == names
    model.load_state_dict(reference.state_dict())
    model.save_pretrained(tmp_path / "converted")
    assert Swintormer.from_pretrained(tmp_path / "converted").state_dict().keys() == names.keys()
    assert copy.deepcopy(model).state_dict().keys() == names.keys()
    restore_reference(model)
    assert not is_prepared(model) and not any(m in engine._caches for m in model.modules())
    with torch.inference_mode():
        assert torch.equal(model(x), reference(x))


def test_converted_model_trains_on_the_reference_path(monkeypatch):
    """Under autograd a converted model runs the reference code: the same gradients, bit for
    bit, and none of the engine's CPU-only paths."""
    reference = _model("tiny").train()
    model = prepare_for_inference(copy.deepcopy(reference))
    calls = _calls(monkeypatch)
    x, target = torch.rand(2, 6, 64, 64), torch.rand(2, 3, 64, 64)
    for net in (reference, model):
        F.l1_loss(net(x), target).backward()
    assert calls == []
    for (name, a), (_, b) in zip(reference.named_parameters(), model.named_parameters()):
        assert torch.equal(a.grad, b.grad), name


def test_other_devices_and_autocast_take_no_blocked_path(monkeypatch):
    """On another device (the meta device stands in for a GPU here) a converted model runs the
    reference code, one batched operation per step; CPU autocast runs the unblocked token paths
    (no packed weights), close to the reference under the same autocast."""
    reference = _model("small")
    calls = _calls(monkeypatch)
    on_meta = prepare_for_inference(copy.deepcopy(reference).to("meta"))
    with torch.no_grad():
        assert on_meta(torch.empty(1, 6, 128, 128, device="meta")).shape == (1, 3, 128, 128)
    assert calls == []
    model = prepare_for_inference(copy.deepcopy(reference))
    x = torch.rand(1, 6, 128, 128, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast, plain = model(x), reference(x)
    assert "residual_forward" not in calls and "packed_weight" not in calls and "pointwise" in calls
    with torch.inference_mode():
        exact = reference(x)
    assert (fast.float() - exact).abs().max() < 2 * (plain.float() - exact).abs().max() + 1e-3


def test_fallback_without_the_private_ops(monkeypatch):
    """Where the oneDNN ops are missing, the engine's paths run PyTorch's public ops."""
    monkeypatch.setattr(engine, "onednn_linear_available", lambda: False)
    monkeypatch.setattr(engine, "onednn_conv_available", lambda: False)
    for preset in ("tiny", "sparse_gated_tiny"):
        reference = _model(preset)
        model = prepare_for_inference(copy.deepcopy(reference))
        x = torch.rand(1, 6, 128, 128, generator=torch.Generator().manual_seed(4))
        with torch.inference_mode():
            torch.testing.assert_close(model(x), reference(x), rtol=0, atol=TOLERANCE)
        assert not any(isinstance(key, tuple) and key[0] == "packed"
                       for m in model.modules() for key in engine._caches.get(m, {}))


def test_probes_are_cached_booleans():
    assert isinstance(engine.onednn_linear_available(), bool) and isinstance(engine.onednn_conv_available(), bool)
    assert engine.onednn_linear_available.cache_info().currsize == 1


def test_position_bias_cache_follows_new_weights():
    target = _model("tiny")
    model = prepare_for_inference(Swintormer(SwintormerConfig.preset("tiny")).eval())
    x = torch.rand(1, 6, 128, 128, generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        model(x)  # fills the position-bias cache with the initial weights
    model.load_state_dict(target.state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(model(x), target(x), rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("convert", [False, True])
def test_a_model_built_under_inference_mode_runs_and_follows_weight_updates(convert):
    """Weights made under torch.inference_mode carry no version counter, so in-place updates to
    them cannot be seen: nothing derived from them (packed weights, position biases) may be
    cached, and a weight update must show in the next forward."""
    target = _model("tiny")
    x = torch.rand(1, 6, 64, 64, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        model = Swintormer(SwintormerConfig.preset("tiny")).eval()
        if convert:
            prepare_for_inference(model)
        model(x)
        model.load_state_dict(target.state_dict())  # in-place copies into the inference tensors
        torch.testing.assert_close(model(x), target(x), rtol=0, atol=TOLERANCE)


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
            for group_index, map_index, whole in engine.window_group_pieces(
                window, group, row * window + shift, col * window + shift, height, width
            ):
                buffer[group_index] = engine.window_piece(image_map, map_index, whole)
                covered[map_index] += 1
            assert torch.equal(buffer, rolled[row, col : col + group])
    assert (covered == 1).all()


def test_l2_norms_equal_vector_norm_clamped_like_normalize():
    x = torch.randn(3, 40, 12)
    x[0, :, 2] = 0  # a zero column: F.normalize's eps applies
    for dim in (1, -1):
        expected = torch.linalg.vector_norm(x, dim=dim, keepdim=True).clamp_min(1e-12)
        torch.testing.assert_close(engine.l2_norms(x, dim, keepdim=True), expected)
        torch.testing.assert_close(x / engine.l2_norms(x, dim, keepdim=True), F.normalize(x, dim=dim))
    assert engine.l2_norms(x.bfloat16(), dim=1).dtype == torch.bfloat16
