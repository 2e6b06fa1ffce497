"""Losses: each checked against an independent computation on small inputs (random backbones)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import wasserstein_distance

from swintormer.losses import (
    CombinedLoss,
    LossConfig,
    MAEPerceptualLoss,
    MissingWeightsError,
    VGG19Features,
    VGGPerceptualLoss,
    build_loss,
    imagenet_normalize,
    load_vgg19,
    sliced_wasserstein,
    token_wasserstein,
)
from swintormer.mae import MAEEncoder, MAEEncoderConfig, load_mae_encoder

SMALL_MAE = MAEEncoderConfig(embed_dim=32, depth=3, num_heads=2)

def test_l1_known_value():
    loss = CombinedLoss(l1_weight=2.0)
    total, parts = loss(torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.25))
    assert total.item() == pytest.approx(0.5) and parts["l1"].item() == pytest.approx(0.5)


# --------------------------------------------------------------------------- VGG


def test_vgg_layers_are_the_named_convolutions():
    torch.manual_seed(0)
    vgg = VGG19Features()
    x = torch.rand(1, 3, 16, 16)
    y = torch.rand(1, 3, 16, 16)
    f = vgg.features
    conv1_1 = lambda t: F.conv2d(imagenet_normalize(t), f[0].weight, f[0].bias, padding=1)  # noqa: E731

    def conv2_1(t):
        h = F.relu(conv1_1(t))
        h = F.relu(F.conv2d(h, f[2].weight, f[2].bias, padding=1))
        h = F.max_pool2d(h, 2)
        return F.conv2d(h, f[5].weight, f[5].bias, padding=1)

    loss = VGGPerceptualLoss(vgg, {"conv1_1": 2.0, "conv2_1": 0.5})
    expected = 2.0 * (conv1_1(x) - conv1_1(y)).abs().mean() + 0.5 * (conv2_1(x) - conv2_1(y)).abs().mean()
    assert loss(x, y).item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss(x, x).item() == 0.0
    # conv5_4 is the 16th convolution: features index 34 (after four pools)
    deep = vgg(imagenet_normalize(x), ["conv5_4"])["conv5_4"]
    assert deep.shape == (1, 512, 1, 1)


def test_vgg_loads_torchvision_layout_and_names_missing_file(tmp_path):
    torch.manual_seed(1)
    source = VGG19Features()
    state = dict(source.state_dict())
    state["classifier.0.weight"] = torch.zeros(4, 4)  # torchvision's file also holds the classifier
    path = tmp_path / "vgg19-dcbbe01f.pth"
    torch.save(state, path)
    loaded = load_vgg19(path)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(MissingWeightsError, match="nowhere/vgg19.pth"):
        load_vgg19(tmp_path / "nowhere/vgg19.pth")


# --------------------------------------------------------------------------- Wasserstein


def test_token_wasserstein_zero_for_equal_with_finite_gradient():
    a = torch.randn(2, 5, 16, requires_grad=True)
    loss = token_wasserstein(a, a.detach().clone())
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(a.grad).all() and (a.grad == 0).all()


def test_token_wasserstein_invariant_to_permuting_each_tokens_channels():
    torch.manual_seed(0)
    a, b = torch.randn(2, 6, 32), torch.randn(2, 6, 32)
    permuted = torch.stack([torch.stack([tok[torch.randperm(32)] for tok in img]) for img in a])
    assert not torch.equal(permuted, a)
    assert token_wasserstein(permuted, b).item() == pytest.approx(token_wasserstein(a, b).item(), rel=1e-6)
    # but not invariant to moving values between tokens
    swapped = a[:, torch.randperm(6)]
    assert token_wasserstein(swapped, b).item() != pytest.approx(token_wasserstein(a, b).item(), rel=1e-3)


def test_token_wasserstein_p1_matches_scipy_per_token():
    torch.manual_seed(0)
    a, b = torch.randn(1, 4, 20), torch.randn(1, 4, 20)
    expected = sum(wasserstein_distance(a[0, t].numpy(), b[0, t].numpy()) for t in range(4))
    assert token_wasserstein(a, b, p=1.0).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("p", [2.0, 3.0])
def test_token_wasserstein_matches_direct_sort_computation(p):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 3, 10)), rng.normal(size=(2, 3, 10))
    expected = 0.0
    for t in range(3):  # authors' reduction: one token position, mean over batch × channels
        diffs = [abs(x - y) ** p for n in range(2) for x, y in zip(sorted(a[n, t]), sorted(b[n, t]))]
        expected += (sum(diffs) / len(diffs)) ** (1 / p)
    got = token_wasserstein(torch.tensor(a), torch.tensor(b), p=p).item()
    assert got == pytest.approx(expected, rel=1e-10)


def test_sliced_wasserstein_is_a_distance_between_token_sets():
    torch.manual_seed(0)
    a, b = torch.randn(2, 12, 8), torch.randn(2, 12, 8)
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    assert sliced_wasserstein(a, a.clone(), generator=gen()).item() == 0.0
    shuffled = a[:, torch.randperm(12)]  # token order does not matter for a set distance
    assert sliced_wasserstein(shuffled, b, generator=gen()).item() == pytest.approx(
        sliced_wasserstein(a, b, generator=gen()).item(), rel=1e-6)
    directions = torch.randn(8, 128, generator=gen())
    directions = directions / directions.norm(dim=0, keepdim=True)
    pa, pb = (a @ directions).sort(dim=1).values, (b @ directions).sort(dim=1).values
    expected = ((pa - pb) ** 2).mean(dim=1).sqrt().mean()
    assert sliced_wasserstein(a, b, generator=gen()).item() == pytest.approx(expected.item(), rel=1e-5)


# --------------------------------------------------------------------------- MAE


def _mae_release_file(tmp_path, encoder: MAEEncoder):
    """A file in the MAE release's layout: {"model": encoder keys + decoder keys}."""
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    state["mask_token"] = torch.zeros(1, 1, 16)
    state["decoder_embed.weight"] = torch.zeros(16, encoder.config.embed_dim)
    state["decoder_pos_embed"] = torch.zeros(1, 197, 16)
    state["decoder_blocks.0.norm1.weight"] = torch.ones(16)
    path = tmp_path / "mae_pretrain_vit_base.pth"
    torch.save({"model": state}, path)
    return path


def _timm_twin(encoder: MAEEncoder):
    """The same weights in today's timm VisionTransformer (an independent implementation)."""
    timm = pytest.importorskip("timm")
    from functools import partial

    config = encoder.config
    twin = timm.models.vision_transformer.VisionTransformer(
        img_size=224, patch_size=16, embed_dim=config.embed_dim, depth=config.depth, num_heads=config.num_heads,
        mlp_ratio=config.mlp_ratio, qkv_bias=True, num_classes=0, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    missing, unexpected = twin.load_state_dict(encoder.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("head") for k in missing)
    return twin.eval()


def test_mae_release_layout_loads_and_matches_timm(tmp_path):
    torch.manual_seed(0)
    source = MAEEncoder(SMALL_MAE)
    for param in source.parameters():  # LayerNorms away from 1/0 so a missed key would show
        param.data.add_(0.05 * torch.randn_like(param))
    encoder = load_mae_encoder(_mae_release_file(tmp_path, source), SMALL_MAE)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), encoder.state_dict().values()))

    twin = _timm_twin(encoder)
    images = imagenet_normalize(torch.rand(2, 3, 224, 224))
    with torch.no_grad():
        ours = encoder.block_features(encoder.patch_tokens(images), [1, 3])
        x = twin._pos_embed(twin.patch_embed(images))
        theirs = []
        for block in twin.blocks:
            x = block(x)
            theirs.append(x)
    assert torch.allclose(ours[0], theirs[0], atol=1e-5) and torch.allclose(ours[1], theirs[2], atol=1e-5)
    with pytest.raises(MissingWeightsError, match="absent/mae_pretrain_vit_base.pth"):
        load_mae_encoder(tmp_path / "absent/mae_pretrain_vit_base.pth", SMALL_MAE)


def test_mae_position_grid_is_resized_bicubically():
    torch.manual_seed(0)
    encoder = MAEEncoder(SMALL_MAE)
    positions = encoder.patch_positions(4, 4)
    grid = encoder.pos_embed[:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 16, -1)
    assert torch.allclose(positions, expected)
    with pytest.raises(ValueError, match="multiple of 16"):
        encoder.patch_tokens(torch.rand(1, 3, 40, 40))


def test_mae_losses_match_timm_computation_on_kept_tokens():
    torch.manual_seed(0)
    encoder = MAEEncoder(SMALL_MAE)
    twin = _timm_twin(encoder)
    loss = MAEPerceptualLoss(encoder, blocks=[1, 2], mask_ratio=0.5)
    output, target = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    keep = torch.tensor([[0, 5, 9, 15, 3, 2, 8, 11], [1, 2, 3, 4, 12, 13, 14, 6]])
    parts = loss(output, target, keep=keep)

    def twin_features(images):
        tokens = twin.patch_embed.proj(imagenet_normalize(images)).flatten(2).transpose(1, 2)
        tokens = tokens + encoder.patch_positions(4, 4)
        tokens = torch.stack([tokens[n, keep[n]] for n in range(2)])
        x = torch.cat([(twin.cls_token + twin.pos_embed[:, :1]).expand(2, -1, -1), tokens], dim=1)
        feats = []
        for block in twin.blocks[:2]:
            x = block(x)
            feats.append(x)
        return feats

    with torch.no_grad():
        fo, ft = twin_features(output), twin_features(target)
    local = sum((a - b).abs().mean() for a, b in zip(fo, ft))
    distribution = 0.0
    for a, b in zip(fo, ft):  # direct sort-based computation, token by token
        for t in range(a.shape[1]):
            sa, sb = a[:, t].sort(dim=-1).values, b[:, t].sort(dim=-1).values
            distribution += ((sa - sb) ** 2).mean().sqrt()
    assert fo[0].shape[1] == 1 + 8
    assert parts["mae_local"].item() == pytest.approx(local.item(), rel=1e-4)
    assert parts["mae_distribution"].item() == pytest.approx(float(distribution), rel=1e-4)


def test_mae_random_mask_is_shared_and_halves_tokens():
    torch.manual_seed(0)
    encoder = MAEEncoder(SMALL_MAE)
    loss = MAEPerceptualLoss(encoder, blocks=[1, 3], mask_ratio=0.5)
    images = torch.rand(2, 3, 64, 64)
    # same images: zero only if output and target keep the same positions
    parts = loss(images, images.clone())
    assert parts["mae_local"].item() == 0.0 and parts["mae_distribution"].item() == 0.0
    keep = loss.keep_indices(2, 16, images.device)
    assert keep.shape == (2, 8) and all(len(set(row.tolist())) == 8 for row in keep)
    output = images.clone().requires_grad_(True)
    total = sum(loss(output, torch.rand(2, 3, 64, 64)).values())
    total.backward()
    assert output.grad.abs().sum() > 0
    assert all(p.grad is None for p in encoder.parameters())  # backbone frozen


def test_build_loss_weights_and_missing_files(tmp_path):
    config = LossConfig.model_validate({
        "l1": 1.0, "allow_random_weights": True,
        "mae": {"local_weight": 0.1, "distribution_weight": 1e-4, "encoder": {"embed_dim": 32, "depth": 6, "num_heads": 2}},
    })
    torch.manual_seed(0)
    loss = build_loss(config)
    output, target = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    torch.manual_seed(3)
    total, parts = loss(output, target)
    torch.manual_seed(3)
    raw = loss.mae(output, target)
    assert parts["mae_local"].item() == pytest.approx(0.1 * raw["mae_local"].item())
    assert parts["mae_distribution"].item() == pytest.approx(1e-4 * raw["mae_distribution"].item())
    assert total.item() == pytest.approx(sum(v.item() for v in parts.values()))

    missing = LossConfig.model_validate({"vgg": {"weights_path": str(tmp_path / "gone/vgg19.pth")}})
    with pytest.raises(MissingWeightsError, match="gone/vgg19.pth"):
        build_loss(missing)
    unset = LossConfig.model_validate({"mae": {"local_weight": 0.1}})
    with pytest.raises(MissingWeightsError, match="loss.mae.weights_path"):
        build_loss(unset)
    with pytest.raises(ValueError, match="conv9_9"):
        LossConfig.model_validate({"vgg": {"layers": {"conv9_9": 1.0}}})
