"""The stage-one prior model: named architectures, the diffusers layout, and loading an original
CompVis checkpoint (key mapping checked against diffusers' own converters and against a
re-implementation of CompVis' legacy fused-qkv attention)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ldm_prior.compvis import UNET_PREFIX, VQ_PREFIX, load_compvis_checkpoint, to_compvis_state_dict
from ldm_prior.model import PriorConfig, PriorModel, load_prior
from ldm_prior.sampling import SamplingSettings, sample_prior


@pytest.fixture(scope="module")
def tiny() -> PriorModel:
    return PriorModel.from_config("tiny", seed=3)


def _blurry(height: int, width: int) -> np.ndarray:
    from skimage import data

    return (data.astronaut()[100 : 100 + height, 150 : 150 + width] / 255.0).astype(np.float32)


def test_ldm_sr4x_matches_the_public_model_parameter_counts() -> None:
    model = PriorModel.from_config("ldm-sr4x")
    assert model.parameter_counts() == {"unet": 113_622_563, "vqvae": 55_322_782}  # the public LDM 4x SR model's
    decoder_side = sum(p.numel() for n, p in model.unet.named_parameters()
                       if n.startswith(("up_blocks", "conv_norm_out", "conv_out")))
    assert round(decoder_side / 1e6, 2) == 67.67
    assert model.unet.config.in_channels == 6 and model.unet.config.out_channels == 3
    assert model.config.vq_factor == 4 and model.vqvae.config.num_vq_embeddings == 8192


def test_tiny_is_small_enough_for_tests(tiny: PriorModel) -> None:
    counts = tiny.parameter_counts()
    assert counts["unet"] < 800_000 and counts["vqvae"] < 300_000
    assert tiny.config.vq_factor == 4


def test_unknown_configuration_and_missing_folder_give_clear_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown prior configuration 'huge'"):
        PriorConfig.named("huge")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"vqvae/config\.json"):
        PriorModel.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="prior not found"):
        load_prior(tmp_path / "nothing")


def test_save_and_load_diffusers_layout_round_trips(tiny: PriorModel, tmp_path) -> None:
    tiny.save_pretrained(tmp_path / "prior")
    assert {p.name for p in (tmp_path / "prior").iterdir()} >= {"unet", "vqvae", "scheduler", "prior_config.json"}
    loaded = PriorModel.from_pretrained(tmp_path / "prior")
    assert loaded.config == tiny.config
    assert loaded.fingerprint() == tiny.fingerprint()
    # Saving again over an existing folder swaps it whole, leaving no staging folders behind.
    tiny.save_pretrained(tmp_path / "prior")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prior"]
    # Without prior_config.json (the public model's layout) the config comes from the components.
    (tmp_path / "prior" / "prior_config.json").unlink()
    rebuilt = PriorModel.from_pretrained(tmp_path / "prior")
    assert rebuilt.config.unet == tiny.config.unet and rebuilt.config.vqvae == tiny.config.vqvae
    assert rebuilt.config.scheduler == tiny.config.scheduler


def test_latent_scale_is_saved_and_fingerprinted(tiny: PriorModel, tmp_path) -> None:
    scaled = PriorModel(tiny.config.model_copy(update={"latent_scale": 2.5}), unet=tiny.unet, vqvae=tiny.vqvae)
    scaled.save_pretrained(tmp_path / "scaled")
    assert PriorModel.from_pretrained(tmp_path / "scaled").config.latent_scale == 2.5
    assert scaled.fingerprint() != tiny.fingerprint()


def test_fingerprint_changes_with_any_weight(tiny: PriorModel) -> None:
    other = PriorModel.from_config("tiny", seed=3)
    assert other.fingerprint() == tiny.fingerprint()
    with torch.no_grad():
        other.vqvae.decoder.conv_out.bias[0] += 1e-3
    assert other.fingerprint() != tiny.fingerprint()


def test_compvis_key_names_agree_with_diffusers_converters(tiny: PriorModel) -> None:
    """diffusers' converters are an independent reading of the CompVis names; they are right
    for everything but the UNet attention blocks, which are checked below against CompVis'
    legacy attention maths."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    original = to_compvis_state_dict(tiny)
    unet = convert_ldm_unet_checkpoint(dict(original), dict(tiny.unet.config))
    reference = tiny.unet.state_dict()
    non_attention = [key for key in reference if ".attentions." not in key]
    assert len(non_attention) > 100
    for key in non_attention:
        assert torch.equal(unet[key], reference[key]), key
    vq_original = {k[len(VQ_PREFIX):]: v for k, v in original.items() if k.startswith(VQ_PREFIX)}
    vq = convert_ldm_vae_checkpoint(vq_original, dict(tiny.vqvae.config))
    for key, value in tiny.vqvae.state_dict().items():
        if key != "quantize.embedding.weight":  # not handled by the VAE converter; copied as is
            assert torch.equal(vq[key], value), key
    assert torch.equal(original[VQ_PREFIX + "quantize.embedding.weight"], tiny.vqvae.quantize.embedding.weight)


def _compvis_legacy_attention(x: torch.Tensor, weights: dict[str, torch.Tensor], prefix: str, head_dim: int) -> torch.Tensor:
    """CompVis ``AttentionBlock`` with ``QKVAttentionLegacy``, written from the original maths."""
    batch, channels, height, width = x.shape
    flat = x.reshape(batch, channels, -1)
    normed = F.group_norm(flat, 8, weights[prefix + "norm.weight"], weights[prefix + "norm.bias"])
    qkv = F.conv1d(normed, weights[prefix + "qkv.weight"], weights[prefix + "qkv.bias"])
    heads = channels // head_dim
    q, k, v = qkv.reshape(batch * heads, 3 * head_dim, -1).split(head_dim, dim=1)
    scale = 1 / head_dim**0.25
    attention = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    mixed = torch.einsum("bts,bcs->bct", attention, v).reshape(batch, channels, -1)
    out = F.conv1d(mixed, weights[prefix + "proj_out.weight"], weights[prefix + "proj_out.bias"])
    return (flat + out).reshape(batch, channels, height, width)


def test_fused_qkv_mapping_reproduces_compvis_attention(tiny: PriorModel) -> None:
    original = to_compvis_state_dict(tiny)
    torch.manual_seed(0)
    x = torch.randn(2, 64, 5, 6)
    expected = _compvis_legacy_attention(x, original, UNET_PREFIX + "middle_block.1.", tiny.config.unet.attention_head_dim)
    with torch.no_grad():
        got = tiny.unet.mid_block.attentions[0](x)
    assert torch.allclose(got, expected, atol=1e-5)
    # A plain (non-interleaved) split of qkv would be a different attention.
    assert tiny.config.unet.block_out_channels[-1] // tiny.config.unet.attention_head_dim > 1


def test_compvis_checkpoint_gives_the_same_prior_as_the_diffusers_folder(tiny: PriorModel, tmp_path) -> None:
    tiny.save_pretrained(tmp_path / "diffusers")
    torch.save({"state_dict": to_compvis_state_dict(tiny), "global_step": 1}, tmp_path / "model.ckpt")
    from_folder = load_prior(tmp_path / "diffusers")
    from_ckpt = load_compvis_checkpoint(tmp_path / "model.ckpt", "tiny")
    for (name, a), (_, b) in zip(from_folder.state_dict().items(), from_ckpt.state_dict().items()):
        assert torch.equal(a, b), name
    blurry = _blurry(21, 26)
    settings = SamplingSettings(steps=3, mode="quarter")
    assert np.array_equal(sample_prior(from_folder, blurry, 5, settings), sample_prior(from_ckpt, blurry, 5, settings))


def test_compvis_checkpoint_of_another_architecture_is_refused(tiny: PriorModel, tmp_path) -> None:
    torch.save(to_compvis_state_dict(tiny), tmp_path / "model.ckpt")
    with pytest.raises(ValueError, match="does not fit"):
        load_compvis_checkpoint(tmp_path / "model.ckpt", "small")
    torch.save({"state_dict": {"cond_stage_model.x": torch.zeros(1)}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not a CompVis latent-diffusion checkpoint"):
        load_compvis_checkpoint(tmp_path / "other.ckpt", "tiny")
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        load_compvis_checkpoint(tmp_path / "missing.ckpt", "tiny")
