"""The stage-one prior model: a diffusers ``UNet2DModel`` that denoises a VQGAN latent while
seeing the blurry condition, a ``VQModel`` first stage (f = 4) and the DDPM/DDIM noise schedule.

Named configurations (:data:`NAMED_CONFIGS`): ``ldm-sr4x`` is the architecture of the public
LDM 4x super-resolution model (CompVis ``ldm-super-resolution-4x-openimages``, Rombach et al.,
2022), the authors' starting point; ``small`` trains on a CPU
in minutes; ``tiny`` is for tests. A model is saved and loaded in the diffusers layout
(``unet/``, ``vqvae/``, ``scheduler/``) plus ``prior_config.json`` holding the typed config.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel, VQModel
from pydantic import BaseModel, ConfigDict, Field, model_validator

from swintormer.core.files import atomic_folder

PRIOR_CONFIG_FILE = "prior_config.json"


class UNetSpec(BaseModel):
    """Architecture of the latent denoiser (``UNet2DModel`` arguments)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    layers_per_block: int = Field(2, ge=1)
    attention_head_dim: int = Field(32, ge=1)
    norm_num_groups: int = Field(32, ge=1)


class VQSpec(BaseModel):
    """Architecture of the VQGAN first stage (``VQModel`` arguments)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    block_out_channels: tuple[int, ...]
    layers_per_block: int = Field(2, ge=1)
    latent_channels: int = Field(3, ge=1)
    num_vq_embeddings: int = Field(8192, ge=2)
    norm_num_groups: int = Field(32, ge=1)


class SchedulerSpec(BaseModel):
    """The DDPM training schedule (Ho et al., 2020), shared by DDIM sampling (Song et al., 2021);
    the defaults are the LDM super-resolution model's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_train_timesteps: int = Field(1000, ge=2)
    beta_start: float = Field(0.0015, gt=0)
    beta_end: float = Field(0.0155, gt=0)
    # diffusers' "scaled_linear" is LDM's "linear" (linear in sqrt(beta)).
    beta_schedule: Literal["scaled_linear", "linear"] = "scaled_linear"
    # What the UNet predicts: the noise (LDM and the public model) or the velocity
    # v = sqrt(ab)·noise − sqrt(1−ab)·latent (Salimans & Ho, 2022). With "epsilon" the loss barely
    # constrains the clean latent at high noise, where sampling starts, so a small UNet trained
    # briefly from random weights samples drifting colours; "v_prediction" supervises it there.
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"


class PriorConfig(BaseModel):
    """Everything needed to build a :class:`PriorModel` from scratch."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "custom"
    image_channels: int = Field(3, ge=1)
    unet: UNetSpec
    vqvae: VQSpec
    scheduler: SchedulerSpec = SchedulerSpec()
    # LDM's scale_factor: the diffusion runs on VQ latents times this, so that they have about
    # unit variance (1.0 for the public LDM SR model; estimated for a VQGAN trained here).
    latent_scale: float = Field(1.0, gt=0)
    # What the diffusion generates. "sharp" (LDM, the authors): the VQ latent of the sharp image.
    # "residual": that latent minus the VQ latent of the blurry image, which the sampler adds
    # back before decoding; the predict-and-refine split of Whang et al. (2022, "Deblurring via
    # stochastic refinement"), with the blurry image's own latent as the prediction. A UNet that
    # has learnt little then still returns about the blurry image instead of drifting colours,
    # which is what a small UNet trained from random weights needs; the public model is "sharp".
    latent_target: Literal["sharp", "residual"] = "sharp"
    # How a "residual" prior's latent becomes an image. False: decoded, as LDM does. True: the
    # blurry image plus the change the residual makes to the decoding, B + dec(z_B + r) − dec(z_B)
    # (ldm_prior.codec.LatentCodec.pixel_residual_image). A zero residual then gives back the
    # blurry image itself rather than its VQGAN reconstruction, which cost the 4500-step VQGAN of
    # configs/prior/cpu_small_vq.yaml 0.3–0.7 dB PSNR on synthetic motion and defocus test images
    # (docs/measurements/stage_one_prior.md, measured 2026-11-21). Decodes twice.
    pixel_residual: bool = False

    @model_validator(mode="after")
    def _pixel_residual_needs_a_residual_target(self) -> "PriorConfig":
        if self.pixel_residual and self.latent_target != "residual":
            raise ValueError("pixel_residual needs latent_target 'residual' (it adds a residual to the blurry image)")
        return self

    @property
    def vq_factor(self) -> int:
        """Downsampling factor of the VQ encoder (4 for the LDM SR model)."""
        return 2 ** (len(self.vqvae.block_out_channels) - 1)

    @property
    def unet_multiple(self) -> int:
        """The latent side must be a multiple of this for the UNet's down/up path."""
        return 2 ** (len(self.unet.block_out_channels) - 1)

    @classmethod
    def named(cls, name: str) -> "PriorConfig":
        """One of :data:`NAMED_CONFIGS`; a clear error naming the choices otherwise."""
        if name not in NAMED_CONFIGS:
            raise ValueError(f"unknown prior configuration {name!r}; choose one of {sorted(NAMED_CONFIGS)}")
        return NAMED_CONFIGS[name]


def _unet_spec(widths: tuple[int, ...], layers: int, head_dim: int, groups: int) -> UNetSpec:
    return UNetSpec(
        block_out_channels=widths,
        down_block_types=("DownBlock2D",) * (len(widths) - 1) + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (len(widths) - 1),
        layers_per_block=layers,
        attention_head_dim=head_dim,
        norm_num_groups=groups,
    )


NAMED_CONFIGS: dict[str, PriorConfig] = {
    # The public CompVis LDM 4x SR model (diffusers: ldm-super-resolution-4x-openimages).
    "ldm-sr4x": PriorConfig(
        name="ldm-sr4x",
        unet=_unet_spec((160, 320, 320, 640), layers=2, head_dim=32, groups=32),
        vqvae=VQSpec(block_out_channels=(128, 256, 512), layers_per_block=2, num_vq_embeddings=8192),
    ),
    # Same shape of network, narrow enough to fine-tune on a 2-core CPU in minutes.
    "small": PriorConfig(
        name="small",
        unet=_unet_spec((32, 64, 64, 128), layers=1, head_dim=16, groups=16),
        vqvae=VQSpec(block_out_channels=(32, 64, 64), layers_per_block=1, num_vq_embeddings=1024, norm_num_groups=16),
    ),
    # For tests: about 0.7 M UNet + 0.24 M VQ parameters.
    "tiny": PriorConfig(
        name="tiny",
        unet=_unet_spec((16, 32, 64), layers=1, head_dim=8, groups=8),
        vqvae=VQSpec(block_out_channels=(16, 32, 32), layers_per_block=1, num_vq_embeddings=256, norm_num_groups=8),
    ),
}


def build_unet(config: PriorConfig) -> UNet2DModel:
    """A randomly initialised denoiser: noisy latent and condition in, noise prediction out."""
    spec = config.unet
    return UNet2DModel(
        in_channels=config.vqvae.latent_channels + config.image_channels,
        out_channels=config.vqvae.latent_channels,
        down_block_types=spec.down_block_types,
        up_block_types=spec.up_block_types,
        block_out_channels=spec.block_out_channels,
        layers_per_block=spec.layers_per_block,
        attention_head_dim=spec.attention_head_dim,
        norm_num_groups=spec.norm_num_groups,
    )


def build_vqvae(config: PriorConfig) -> VQModel:
    """A randomly initialised VQGAN first stage."""
    spec = config.vqvae
    levels = len(spec.block_out_channels)
    return VQModel(
        in_channels=config.image_channels,
        out_channels=config.image_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=spec.block_out_channels,
        layers_per_block=spec.layers_per_block,
        latent_channels=spec.latent_channels,
        num_vq_embeddings=spec.num_vq_embeddings,
        norm_num_groups=spec.norm_num_groups,
    )


def _scheduler_kwargs(spec: SchedulerSpec) -> dict:
    return {
        "num_train_timesteps": spec.num_train_timesteps,
        "beta_start": spec.beta_start,
        "beta_end": spec.beta_end,
        "beta_schedule": spec.beta_schedule,
        "prediction_type": spec.prediction_type,
        "clip_sample": False,
    }


class PriorModel(torch.nn.Module):
    """The conditional latent-diffusion prior: ``unet`` + ``vqvae`` + its noise schedule."""

    def __init__(self, config: PriorConfig, unet: UNet2DModel | None = None, vqvae: VQModel | None = None) -> None:
        super().__init__()
        self.config = config
        self.unet = unet if unet is not None else build_unet(config)
        self.vqvae = vqvae if vqvae is not None else build_vqvae(config)

    @classmethod
    def from_config(cls, config: PriorConfig | str, seed: int | None = None) -> "PriorModel":
        """A model with random weights; ``seed`` makes the initialisation reproducible."""
        if isinstance(config, str):
            config = PriorConfig.named(config)
        if seed is None:
            return cls(config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(config)

    def ddim_scheduler(self, timestep_spacing: str = "leading") -> DDIMScheduler:
        """A fresh DDIM sampler on the model's training schedule; ``timestep_spacing`` places its
        T timesteps (see :class:`ldm_prior.sampling.SamplingSettings`)."""
        return DDIMScheduler(
            **_scheduler_kwargs(self.config.scheduler), set_alpha_to_one=True, timestep_spacing=timestep_spacing
        )

    def ddpm_scheduler(self) -> DDPMScheduler:
        """A fresh DDPM scheduler (noising for training) on the same schedule."""
        return DDPMScheduler(**_scheduler_kwargs(self.config.scheduler))

    def parameter_counts(self) -> dict[str, int]:
        """Parameter counts of the UNet and the VQ model."""
        return {
            "unet": sum(p.numel() for p in self.unet.parameters()),
            "vqvae": sum(p.numel() for p in self.vqvae.parameters()),
        }

    def fingerprint(self) -> str:
        """SHA-256 of the architecture, schedule and every weight: what a cache entry records."""
        digest = hashlib.sha256(self.config.model_dump_json(exclude={"name"}).encode())
        for prefix, module in (("unet", self.unet), ("vqvae", self.vqvae)):
            for key, tensor in sorted(module.state_dict().items()):
                tensor = tensor.detach().to("cpu").contiguous()
                digest.update(f"{prefix}.{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        return digest.hexdigest()

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the diffusers layout (``unet/``, ``vqvae/``, ``scheduler/``) atomically: the
        folder is built beside the target and swapped in, so a crash never leaves half a model."""
        with atomic_folder(directory) as staging:
            self.unet.save_pretrained(staging / "unet", safe_serialization=True)
            self.vqvae.save_pretrained(staging / "vqvae", safe_serialization=True)
            self.ddim_scheduler().save_pretrained(staging / "scheduler")
            (staging / PRIOR_CONFIG_FILE).write_text(self.config.model_dump_json(indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "PriorModel":
        """Load a diffusers-layout folder (ours, or the public model's ``unet/ vqvae/ scheduler/``).

        Without ``prior_config.json`` the config is read back from the components' own
        ``config.json`` files. Errors name the missing file.
        """
        root = Path(directory)
        if not root.is_dir():
            raise FileNotFoundError(f"prior model folder not found: {root}")
        for part in ("unet", "vqvae"):
            if not (root / part / "config.json").is_file():
                raise FileNotFoundError(f"prior model is missing {root / part / 'config.json'}")
        unet = UNet2DModel.from_pretrained(root / "unet")
        vqvae = VQModel.from_pretrained(root / "vqvae")
        config_file = root / PRIOR_CONFIG_FILE
        if config_file.is_file():
            config = PriorConfig.model_validate_json(config_file.read_text())
        else:
            config = _config_from_components(unet, vqvae, root / "scheduler" / "scheduler_config.json")
        return cls(config, unet=unet, vqvae=vqvae)


def _config_from_components(unet: UNet2DModel, vqvae: VQModel, scheduler_file: Path) -> PriorConfig:
    u, v = unet.config, vqvae.config
    head_dim = u.attention_head_dim if u.attention_head_dim is not None else 8
    scheduler = SchedulerSpec()
    if scheduler_file.is_file():
        raw = json.loads(scheduler_file.read_text())
        scheduler = SchedulerSpec(
            num_train_timesteps=raw.get("num_train_timesteps", 1000),
            beta_start=raw.get("beta_start", 0.0015),
            beta_end=raw.get("beta_end", 0.0155),
            beta_schedule=raw.get("beta_schedule", "scaled_linear"),
            prediction_type=raw.get("prediction_type", "epsilon"),
        )
    return PriorConfig(
        name="pretrained",
        image_channels=u.in_channels - v.latent_channels,
        unet=UNetSpec(
            block_out_channels=tuple(u.block_out_channels),
            down_block_types=tuple(u.down_block_types),
            up_block_types=tuple(u.up_block_types),
            layers_per_block=u.layers_per_block,
            attention_head_dim=head_dim,
            norm_num_groups=u.norm_num_groups,
        ),
        vqvae=VQSpec(
            block_out_channels=tuple(v.block_out_channels),
            layers_per_block=v.layers_per_block,
            latent_channels=v.latent_channels,
            num_vq_embeddings=v.num_vq_embeddings,
            norm_num_groups=v.norm_num_groups,
        ),
        scheduler=scheduler,
    )


def load_prior(source: str | Path) -> PriorModel:
    """A prior from a named configuration (random weights), a diffusers-layout folder, or an
    original CompVis ``.ckpt`` file."""
    text = str(source)
    if text in NAMED_CONFIGS:
        return PriorModel.from_config(text, seed=0)
    path = Path(text)
    if path.is_file() and path.suffix in {".ckpt", ".pt", ".pth"}:
        from ldm_prior.compvis import load_compvis_checkpoint

        return load_compvis_checkpoint(path)
    if path.is_dir():
        return PriorModel.from_pretrained(path)
    raise FileNotFoundError(
        f"prior not found: {text} (give a diffusers-layout folder, a CompVis model.ckpt, "
        f"or one of {sorted(NAMED_CONFIGS)})"
    )
