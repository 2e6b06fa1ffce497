"""The latent codec against the diffusers calls it stands for, written out by hand: encoding,
condition, diffusion target, decoding, the pixel-residual image and the autoencoder round trip
give the same tensors bit for bit, in both conditioning modes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldm_prior.codec import LatentCodec
from ldm_prior.model import PriorModel


@pytest.fixture(scope="module")
def residual() -> PriorModel:
    tiny = PriorModel.from_config("tiny", seed=0).eval()
    config = tiny.config.model_copy(update={"latent_target": "residual", "pixel_residual": True, "latent_scale": 2.5})
    return PriorModel(config, unet=tiny.unet, vqvae=tiny.vqvae)


def _images() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    sharp = torch.rand(2, 3, 16, 24, generator=generator)
    return F.avg_pool2d(sharp, 3, stride=1, padding=1, count_include_pad=False), sharp


@pytest.mark.parametrize("mode", ["full", "quarter"])
@torch.no_grad()
def test_codec_matches_the_diffusers_calls_written_out(residual: PriorModel, mode: str) -> None:
    codec = LatentCodec.for_model(residual, mode)
    vqvae, factor = residual.vqvae, residual.config.vq_factor
    blurry, sharp = _images()

    def encode(image: torch.Tensor) -> torch.Tensor:
        if mode == "full":
            image = F.interpolate(image, scale_factor=factor, mode="bicubic", align_corners=False).clamp(0, 1)
        return vqvae.encode(image * 2 - 1).latents

    def decode(latents: torch.Tensor) -> torch.Tensor:
        decoded = vqvae.decode(latents).sample
        return F.avg_pool2d(decoded, factor) if mode == "full" else decoded

    z_sharp, z_blurry = encode(sharp), encode(blurry)
    assert torch.equal(codec.encode(sharp), z_sharp)
    assert z_sharp.shape[-2:] == ((16, 24) if mode == "full" else (4, 6))  # the condition's size
    condition = (blurry if mode == "full" else F.avg_pool2d(blurry, factor)) * 2 - 1
    target, codec_condition = codec.target_and_condition(blurry, sharp)
    assert torch.equal(target, (z_sharp - z_blurry) * 2.5) and torch.equal(codec_condition, condition)
    assert torch.equal(codec.to_vq_latent(target, z_blurry), target / 2.5 + z_blurry)
    assert torch.equal(codec.decode(z_sharp), decode(z_sharp))
    assert codec.decode(z_sharp).shape == sharp.shape
    prior = codec.prior_image(z_sharp, blurry, z_blurry)
    assert torch.equal(prior, blurry * 2 - 1 + decode(z_sharp) - decode(z_blurry))
    reconstruction, commit_loss = codec.reconstruct(sharp)
    decoded = vqvae.decode(z_sharp)
    assert torch.equal(reconstruction, decode(z_sharp)) and torch.equal(commit_loss, decoded.commit_loss)
    # A sharp-target, plain-decoding codec of the same weights: no blurry latent, the decoding itself.
    plain = LatentCodec(vqvae, mode, factor)
    assert plain.blurry_latent(blurry) is None and torch.equal(plain.prior_image(z_sharp, blurry, None), decode(z_sharp))


def test_unknown_mode_is_refused(residual: PriorModel) -> None:
    with pytest.raises(ValueError, match="unknown conditioning mode 'half'"):
        LatentCodec.for_model(residual, "half")
