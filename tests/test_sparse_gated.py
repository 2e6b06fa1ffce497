"""Tests of the sparse gated block family (seed 001): top-k selection, the activations, the
equivalence with dense transposed attention, the frequency gating and its padding rule, and
gradient flow through the block."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from swintormer.models.swintormer import ChannelLayerNorm
from swintormer.models.sparse_gated import (
    DRSFORMER_TOPK_FRACTIONS,
    RELU2_EPS,
    FrequencyGatedFeedForward,
    TopKChannelAttention,
    sparse_attention_weights,
    topk_counts,
)
from swintormer.models.swintormer import SwintormerConfig, TransformerBlock


def SparseGatedBlock(  # noqa: N802 - reads like the block class it builds
    dim: int,
    num_heads: int,
    ffn_expansion_factor: float,
    bias: bool = False,
    topk_fractions: tuple[float, ...] | None = DRSFORMER_TOPK_FRACTIONS,
    activation: str = "softmax",
) -> TransformerBlock:
    """The network's block with the sparse gated pieces, as ``block: sparse_gated`` builds it."""
    config = SwintormerConfig(
        block="sparse_gated", ffn_expansion_factor=ffn_expansion_factor, bias=bias,
        topk_fractions=topk_fractions or DRSFORMER_TOPK_FRACTIONS, attention_activation=activation,
    )
    block = TransformerBlock(config, dim, num_heads)
    if topk_fractions is None:  # dense mode is an ablation of the piece, not a config value
        block.attn = TopKChannelAttention(dim, num_heads, bias, topk_fractions=None, activation=activation)
    return block


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


def _randomise_parameters(module: torch.nn.Module, scale: float = 0.3) -> None:
    """Move every parameter away from its initial value so that no test passes by an
    initialisation coincidence (temperatures of one, combining scalars all equal, ...)."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(scale * torch.randn_like(parameter))


def test_topk_counts_follow_the_floor_rule() -> None:
    assert topk_counts(48, DRSFORMER_TOPK_FRACTIONS) == [24, 32, 36, 38]
    assert topk_counts(12, DRSFORMER_TOPK_FRACTIONS) == [6, 8, 9, 9]  # 12·(2/3) must not give 7
    assert topk_counts(1, DRSFORMER_TOPK_FRACTIONS) == [1, 1, 1, 1]
    assert topk_counts(10, (1.0,)) == [10]
    with pytest.raises(ValueError, match="fraction"):
        topk_counts(8, (0.0,))
    with pytest.raises(ValueError, match="fraction"):
        topk_counts(8, (1.5,))


@pytest.mark.parametrize("activation", ["softmax", "mixed"])
def test_topk_keeps_exactly_the_k_largest_scores_of_each_row(activation: str) -> None:
    attention = TopKChannelAttention(24, 2, bias=True, activation=activation)
    _randomise_parameters(attention)
    x = torch.randn(2, 24, 9, 11)
    with torch.no_grad():
        scores = attention.attention_scores(x)
        maps = attention.attention_maps(x)
    assert attention.keep_counts == [6, 8, 9, 9]
    assert len(maps) == 4
    for keep_count, weights in zip(attention.keep_counts, maps):
        assert weights.shape == (2, 2, 12, 12)
        kept = weights > 0
        assert torch.all(kept.sum(dim=-1) == keep_count)
        top_indices = scores.topk(keep_count, dim=-1).indices
        expected_kept = torch.zeros_like(kept).scatter_(-1, top_indices, True)
        assert torch.equal(kept, expected_kept)
        if activation == "softmax":
            expected = scores.masked_fill(~expected_kept, float("-inf")).softmax(dim=-1)
            torch.testing.assert_close(weights, expected)
            torch.testing.assert_close(weights.sum(dim=-1), torch.ones(2, 2, 12), atol=1e-5, rtol=0)


def test_topk_with_relu2_keeps_only_top_k_entries() -> None:
    attention = TopKChannelAttention(16, 1, activation="relu2")
    _randomise_parameters(attention)
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        scores = attention.attention_scores(x)
        maps = attention.attention_maps(x)
    for keep_count, weights in zip(attention.keep_counts, maps):
        top_indices = scores.topk(keep_count, dim=-1).indices
        in_top = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top_indices, True)
        assert torch.all(weights[~in_top] == 0)
        expected = F.relu(scores).square() * in_top
        expected = expected / (expected.sum(dim=-1, keepdim=True) + RELU2_EPS)
        torch.testing.assert_close(weights, expected)


def test_tied_scores_still_keep_exactly_k_entries() -> None:
    scores = torch.zeros(3, 10)
    weights = sparse_attention_weights(scores, keep_count=4, activation="softmax")
    assert torch.all((weights > 0).sum(dim=-1) == 4)
    torch.testing.assert_close(weights[weights > 0], torch.full((12,), 0.25))


def test_relu2_normalisation_choices_and_all_negative_rows() -> None:
    scores = torch.tensor(
        [
            [0.5, -0.2, 0.3, 0.1],  # top 3: 0.5, 0.3, 0.1
            [-0.4, -0.1, -0.3, -0.2],  # every kept score negative: a zero row
        ],
        requires_grad=True,
    )
    row_sum = sparse_attention_weights(scores, keep_count=3, activation="relu2")
    kept_squares = torch.tensor([0.25, 0.0, 0.09, 0.01])
    torch.testing.assert_close(row_sum[0], kept_squares / (kept_squares.sum() + RELU2_EPS))
    assert torch.all(row_sum[1] == 0)
    row_sum.sum().backward()
    assert torch.isfinite(scores.grad).all()

    raw = sparse_attention_weights(scores.detach(), keep_count=3, activation="relu2", relu2_normalization="none")
    torch.testing.assert_close(raw[0], kept_squares)

    # The dropped entry must get zero weight even when its ReLU² would be positive.
    dropped_positive = sparse_attention_weights(torch.tensor([[0.9, 0.8, 0.7]]), 2, "relu2", "none")
    torch.testing.assert_close(dropped_positive, torch.tensor([[0.81, 0.64, 0.0]]))


def test_mixed_activation_is_the_softmax_weighted_sum_of_softmax_and_relu2() -> None:
    scores = torch.randn(2, 3, 6, 6)
    mix_logits = torch.tensor([0.3, -0.8])
    mixed = sparse_attention_weights(scores, 4, "mixed", mix_logits=mix_logits)
    mix = mix_logits.softmax(dim=0)
    expected = mix[0] * sparse_attention_weights(scores, 4, "softmax") + mix[1] * sparse_attention_weights(
        scores, 4, "relu2"
    )
    torch.testing.assert_close(mixed, expected)
    with pytest.raises(ValueError, match="mix_logits"):
        sparse_attention_weights(scores, 4, "mixed")


def _dense_transposed_attention(attention: TopKChannelAttention, x: torch.Tensor) -> torch.Tensor:
    """Restormer's MDTA written out directly from the module's convolution weights."""
    dim, heads = attention.dim, attention.num_heads
    qkv = F.conv2d(x, attention.qkv.weight, attention.qkv.bias)
    qkv = F.conv2d(qkv, attention.qkv_dwconv.weight, attention.qkv_dwconv.bias, padding=1, groups=3 * dim)
    batch, _, height, width = x.shape
    q, k, v = (part.reshape(batch, heads, dim // heads, height * width) for part in qkv.split(dim, dim=1))
    q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    k = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    scores = torch.einsum("bhcn,bhdn->bhcd", q, k) * attention.temperature
    out = torch.einsum("bhcd,bhdn->bhcn", scores.softmax(dim=-1), v).reshape(batch, dim, height, width)
    return F.conv2d(out, attention.project_out.weight, attention.project_out.bias)


def test_full_row_softmax_topk_equals_dense_transposed_attention() -> None:
    sparse = TopKChannelAttention(16, 2, bias=True, topk_fractions=(1.0,), activation="softmax")
    _randomise_parameters(sparse)
    with torch.no_grad():
        sparse.topk_weights.fill_(1.0)
    x = torch.randn(2, 16, 10, 7)
    with torch.no_grad():
        expected = _dense_transposed_attention(sparse, x)
        torch.testing.assert_close(sparse(x), expected, atol=1e-5, rtol=1e-5)

        dense = TopKChannelAttention(16, 2, bias=True, topk_fractions=None)
        dense.load_state_dict({k: v for k, v in sparse.state_dict().items() if k != "topk_weights"})
        assert dense.topk_weights is None
        torch.testing.assert_close(dense(x), expected, atol=1e-5, rtol=1e-5)


def test_forward_sums_the_masked_maps_with_the_learned_scalars() -> None:
    attention = TopKChannelAttention(12, 1, bias=False, activation="softmax")
    _randomise_parameters(attention)
    x = torch.randn(1, 12, 6, 5)
    with torch.no_grad():
        maps = attention.attention_maps(x)
        qkv = attention.qkv_dwconv(attention.qkv(x))
        v = qkv[:, 24:].reshape(1, 1, 12, 30)
        per_map = [weight * (attention_map @ v) for weight, attention_map in zip(attention.topk_weights, maps)]
        out = torch.stack(per_map).sum(dim=0).reshape(1, 12, 6, 5)
        expected = attention.project_out(out)
        torch.testing.assert_close(attention(x), expected, atol=1e-5, rtol=1e-5)
        # The four sparse maps differ, so the scalars matter: the sparse output is not the dense one.
        assert not torch.allclose(attention(x), _dense_transposed_attention(attention, x), atol=1e-3)


@pytest.mark.parametrize("size", [(16, 24), (13, 21), (5, 3)])
def test_frequency_gating_at_one_equals_the_layer_without_it(size: tuple[int, int]) -> None:
    gated = FrequencyGatedFeedForward(8, 2.66, bias=True)
    assert torch.all(gated.frequency_weight == 1)
    assert gated.frequency_weight.shape == (2 * 21, 8, 5)
    plain = FrequencyGatedFeedForward(8, 2.66, bias=True, frequency_gating=False)
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if k != "frequency_weight"})
    x = torch.randn(2, 8, *size)
    with torch.no_grad():
        torch.testing.assert_close(gated(x), plain(x), atol=1e-5, rtol=1e-5)
        # And once the weights move off one, the frequency step does change the output.
        gated.frequency_weight.mul_(torch.rand_like(gated.frequency_weight))
        assert not torch.allclose(gated(x), plain(x), atol=1e-4)


def _patchwise_gate_reference(features: np.ndarray, weight: np.ndarray, patch: int) -> np.ndarray:
    """The documented rule, patch by patch in NumPy: pad bottom/right by reflection (edge
    replication when a side is too short), filter each patch on its own, crop back."""
    _, _, height, width = features.shape
    pad_bottom, pad_right = (-height) % patch, (-width) % patch
    mode = "reflect" if pad_bottom < height and pad_right < width else "edge"
    padded = np.pad(features, ((0, 0), (0, 0), (0, pad_bottom), (0, pad_right)), mode=mode)
    out = np.empty_like(padded)
    for top in range(0, padded.shape[2], patch):
        for left in range(0, padded.shape[3], patch):
            block = padded[:, :, top : top + patch, left : left + patch]
            spectrum = np.fft.rfft2(block) * weight[None]
            out[:, :, top : top + patch, left : left + patch] = np.fft.irfft2(spectrum, s=(patch, patch))
    return out[:, :, :height, :width]


@pytest.mark.parametrize("size", [(16, 24), (13, 21), (3, 5)])
def test_frequency_gate_filters_each_patch_and_pads_by_the_documented_rule(size: tuple[int, int]) -> None:
    ffn = FrequencyGatedFeedForward(4, 1.0, patch_size=8)
    with torch.no_grad():
        ffn.frequency_weight.copy_(torch.rand_like(ffn.frequency_weight) * 2)
        features = torch.randn(2, 8, *size)
        gated = ffn.frequency_gate(features)
    expected = _patchwise_gate_reference(features.double().numpy(), ffn.frequency_weight.detach().double().numpy(), 8)
    assert gated.shape == features.shape
    np.testing.assert_allclose(gated.numpy(), expected, atol=1e-5)


def test_frequency_step_runs_in_float32_for_bfloat16_features() -> None:
    ffn = FrequencyGatedFeedForward(4, 1.0).to(torch.bfloat16)
    with torch.no_grad():
        ffn.frequency_weight.copy_(torch.rand_like(ffn.frequency_weight) * 2)
        reference = FrequencyGatedFeedForward(4, 1.0)
        reference.load_state_dict({k: v.float() for k, v in ffn.state_dict().items()})
        features = torch.randn(1, 8, 12, 16).to(torch.bfloat16)
        gated = ffn.frequency_gate(features)
        assert gated.dtype == torch.bfloat16
        assert torch.equal(gated, reference.frequency_gate(features.float()).to(torch.bfloat16))


def test_channel_layer_norm_normalises_each_pixel_over_channels() -> None:
    norm = ChannelLayerNorm(6)
    _randomise_parameters(norm)
    x = torch.randn(2, 6, 4, 5) * 3 + 1
    mean = x.mean(dim=1, keepdim=True)
    variance = x.var(dim=1, keepdim=True, unbiased=False)
    expected = (x - mean) / torch.sqrt(variance + 1e-5) * norm.body.weight.view(1, 6, 1, 1) + norm.body.bias.view(1, 6, 1, 1)
    torch.testing.assert_close(norm(x), expected, atol=1e-5, rtol=1e-5)


def test_block_is_a_pre_norm_residual_of_attention_then_ffn() -> None:
    block = SparseGatedBlock(8, 2, 2.0, bias=False)
    _randomise_parameters(block)
    x = torch.randn(1, 8, 10, 9)
    with torch.no_grad():
        after_attention = x + block.attn(block.norm1(x))
        expected = after_attention + block.ffn(block.norm2(after_attention))
        torch.testing.assert_close(block(x), expected)
        block.attn.project_out.weight.zero_()
        block.ffn.project_out.weight.zero_()
        torch.testing.assert_close(block(x), x)


@pytest.mark.parametrize(
    ("activation", "topk_fractions"),
    [("softmax", DRSFORMER_TOPK_FRACTIONS), ("relu2", DRSFORMER_TOPK_FRACTIONS), ("mixed", (0.5, 0.75)), ("softmax", None)],
)
def test_gradients_reach_every_parameter(activation: str, topk_fractions: tuple[float, ...] | None) -> None:
    block = SparseGatedBlock(16, 2, 2.66, bias=True, topk_fractions=topk_fractions, activation=activation)
    x = torch.randn(2, 16, 13, 11)
    out = block(x)
    (out * torch.randn_like(out)).sum().backward()
    names = {name for name, _ in block.named_parameters()}
    assert "ffn.frequency_weight" in names and "attn.temperature" in names
    assert ("attn.mix_logits" in names) == (activation == "mixed")
    assert ("attn.topk_weights" in names) == (topk_fractions is not None)
    for name, parameter in block.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_bad_arguments_give_clear_errors() -> None:
    with pytest.raises(ValueError, match="num_heads"):
        TopKChannelAttention(10, 3, False)
    with pytest.raises(ValueError, match="activation"):
        TopKChannelAttention(8, 2, False, activation="sigmoid")
    with pytest.raises(ValueError, match="relu2_normalization"):
        TopKChannelAttention(8, 2, False, relu2_normalization="max")
    with pytest.raises(ValueError, match="topk_fractions"):
        TopKChannelAttention(8, 2, False, topk_fractions=())
    with pytest.raises(ValueError, match="patch_size"):
        FrequencyGatedFeedForward(8, 2.0, False, patch_size=0)


def test_block_gives_the_same_result_on_channels_last_memory() -> None:
    block = SparseGatedBlock(16, 2, 2.0, bias=True, activation="mixed")
    _randomise_parameters(block)
    x = torch.randn(2, 16, 12, 20)
    with torch.no_grad():
        torch.testing.assert_close(
            block(x.contiguous(memory_format=torch.channels_last)), block(x), atol=1e-5, rtol=1e-5
        )


def test_block_runs_on_the_meta_device_for_shape_only_counting() -> None:
    """``tools/count_macs.py`` builds models on the meta device: top-k, padding and FFT must
    propagate shapes there too."""
    with torch.device("meta"):
        block = SparseGatedBlock(16, 2, 2.0)
        out = block(torch.empty(1, 16, 13, 21))
    assert out.shape == (1, 16, 13, 21) and out.device.type == "meta"
