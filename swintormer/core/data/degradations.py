"""Degradations drawn on the fly: from a sharp photo, a fresh realistic blurry input per sample.

The fixed-pair datasets (DPDD, GoPro, the synthetic generator's folders) show a network the same
few degradations forever. Here every training sample draws its own, reproducibly from
``numpy.random.default_rng([seed, epoch, index])``, in the spirit of Real-ESRGAN's and BSRGAN's
randomised pipelines (Wang et al. 2021, Zhang et al. 2021), specialised to blur:

1. **Blur kind**, by configured shares: ``sharp`` (no blur at all, so that the network learns to
   leave sharp detail alone), ``defocus_uniform`` (one disc), ``defocus_varying`` (a disc whose
   radius follows a random depth map, part of the patch in focus), ``motion`` (a camera-shake
   trajectory) and ``defocus_motion`` (varying defocus, then shake).
2. **Blur in linear light.** Light adds up in linear intensity, not in sRGB code values, so the
   blur is applied after the sRGB decoding curve and undone after: bright highlights spread into
   bright discs, as in real bokeh.
3. **Spatially varying defocus** is rendered as in the layered/gather approximations of the
   defocus-rendering literature (e.g. Lee et al., "Real-time depth-of-field rendering using
   anisotropically filtered mipmap interpolation", 2009): a stack of disc blurs at radii
   ``0 = r_0 < r_1 < … < r_K = R`` and, per pixel, a linear blend of the two levels around that
   pixel's radius. Radius 0 is the image itself, so a depth map in focus everywhere returns the
   input exactly. The depth map is smooth (a tilted plane, or a plane with soft-edged blobs in
   front of it), and the focus distance is the depth at a random pixel, so part of the patch is
   always in focus and the radius grows with the distance from the focal plane.
4. **Sensor noise**, signal dependent (Poisson–Gaussian: variance ``a·x + b`` per pixel and
   channel, Foi et al. 2008), in linear light, before the camera's tone curve.
5. **Quantisation and JPEG** at a random quality, after everything else, as a camera or phone
   writes the file.

The sharp crop is the target; the output's geometry is unchanged by every step (centred kernels,
reflected borders; the crop is taken with a margin so that the border pixels see real content).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import cv2
import numpy as np
from pydantic import Field, model_validator

from swintormer.core.config import StrictModel
from swintormer.core.data.synthetic_blur import blur_image, disc_kernel, motion_kernel

BlurKind = Literal["sharp", "defocus_uniform", "defocus_varying", "motion", "defocus_motion"]
BLUR_KINDS: tuple[str, ...] = ("sharp", "defocus_uniform", "defocus_varying", "motion", "defocus_motion")


class BlurShares(StrictModel):
    """Relative frequencies of the blur kinds (normalised; zero removes a kind)."""

    sharp: float = Field(0.15, ge=0)
    defocus_uniform: float = Field(0.25, ge=0)
    defocus_varying: float = Field(0.3, ge=0)
    motion: float = Field(0.2, ge=0)
    defocus_motion: float = Field(0.1, ge=0)

    @model_validator(mode="after")
    def _some_share(self) -> "BlurShares":
        if sum(self.as_probabilities().values()) == 0:
            raise ValueError("at least one blur share must be positive")
        return self

    def as_probabilities(self) -> dict[str, float]:
        values = {kind: float(getattr(self, kind)) for kind in BLUR_KINDS}
        total = sum(values.values())
        return {kind: (value / total if total else 0.0) for kind, value in values.items()}


class DegradationConfig(StrictModel):
    """Ranges and shares of the on-the-fly degradation (``data.degradation`` in a training config).

    Lengths are in pixels of the training patch; noise is in linear intensity on [0, 1].
    """

    shares: BlurShares = Field(default_factory=BlurShares)
    linear_light: bool = True  # blur and noise in linear light (sRGB decoded), else on code values
    # Uniform defocus: disc radius drawn uniformly in this range.
    defocus_radius: tuple[float, float] = (1.0, 8.0)
    # Varying defocus: the largest radius R of the patch is drawn in this range; radii 0..R.
    varying_max_radius: tuple[float, float] = (2.0, 10.0)
    varying_levels: int = Field(8, ge=1)  # disc-blur levels between 0 and R
    motion_length: tuple[float, float] = (3.0, 21.0)
    # Poisson–Gaussian noise: variance a·x + b; a drawn log-uniformly, b = read_sigma².
    noise_probability: float = Field(0.8, ge=0, le=1)
    shot_noise: tuple[float, float] = (1e-5, 3e-3)
    read_noise_sigma: tuple[float, float] = (0.0, 0.01)
    jpeg_probability: float = Field(0.5, ge=0, le=1)
    jpeg_quality: tuple[int, int] = (70, 95)
    # Crops are taken at a random scale in this range of the photo's resolution (area downscale),
    # so that few photos give many textures and blur sizes relative to content.
    scale: tuple[float, float] = (0.5, 1.0)

    @model_validator(mode="after")
    def _ordered_ranges(self) -> "DegradationConfig":
        for name in ("defocus_radius", "varying_max_radius", "motion_length", "shot_noise",
                     "read_noise_sigma", "jpeg_quality", "scale"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"{name}: lower bound {low} is above upper bound {high}")
            if low < 0:
                raise ValueError(f"{name}: bounds must not be negative")
        if self.defocus_radius[0] <= 0 or self.motion_length[0] <= 0:
            raise ValueError("defocus_radius and motion_length must be positive")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError("scale must lie in (0, 1]")
        if not 1 <= self.jpeg_quality[0] <= self.jpeg_quality[1] <= 100:
            raise ValueError("jpeg_quality must lie in [1, 100]")
        return self

    def margin(self) -> int:
        """Pixels of context needed on each side of a patch for the largest blur drawn."""
        defocus = max(self.defocus_radius[1], self.varying_max_radius[1])
        motion = self.motion_length[1] / 2 + 1
        return int(math.ceil(defocus + motion)) + 1


# --------------------------------------------------------------------------- colour


def srgb_to_linear(image: np.ndarray) -> np.ndarray:
    """The sRGB decoding curve (IEC 61966-2-1) on [0, 1] values."""
    image = np.clip(image, 0.0, 1.0)
    return np.where(image <= 0.04045, image / 12.92, ((image + 0.055) / 1.055) ** 2.4).astype(np.float32)


def linear_to_srgb(image: np.ndarray) -> np.ndarray:
    """The sRGB encoding curve, the inverse of :func:`srgb_to_linear`; clips to [0, 1]."""
    image = np.clip(image, 0.0, 1.0)
    return np.where(image <= 0.0031308, image * 12.92, 1.055 * image ** (1 / 2.4) - 0.055).astype(np.float32)


# --------------------------------------------------------------------------- depth and defocus


def random_depth_map(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth random depth map on [0, 1]: a tilted plane, optionally with soft blobs in front.

    Planes model a receding ground or wall; blobs model objects (a subject, a flower) standing in
    front of the background, with soft edges so that the radius map stays smooth.
    """
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ys /= max(height - 1, 1)
    xs /= max(width - 1, 1)
    angle = rng.uniform(0, 2 * math.pi)
    tilt = rng.uniform(0.0, 1.0)
    depth = 0.5 + tilt * ((xs - 0.5) * math.cos(angle) + (ys - 0.5) * math.sin(angle))
    for _ in range(int(rng.integers(0, 4))):
        cy, cx = rng.uniform(0, 1, size=2)
        ry, rx = rng.uniform(0.1, 0.5, size=2)
        softness = rng.uniform(0.05, 0.3)
        distance = np.sqrt(((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2)
        inside = 1.0 / (1.0 + np.exp((distance - 1.0) / softness))
        depth = depth * (1 - inside) + rng.uniform(0, 1) * inside
    low, high = float(depth.min()), float(depth.max())
    return ((depth - low) / (high - low) if high > low else np.zeros_like(depth)).astype(np.float32)


def radius_map_from_depth(depth: np.ndarray, focus: float, max_radius: float, depth_of_field: float) -> np.ndarray:
    """Per-pixel disc radius: 0 within ``depth_of_field`` of the focal depth, then growing
    linearly with the distance from it, reaching ``max_radius`` at the farthest depth."""
    distance = np.abs(depth - focus)
    reach = max(float(distance.max()) - depth_of_field, 1e-6)
    return (max_radius * np.clip((distance - depth_of_field) / reach, 0.0, 1.0)).astype(np.float32)


def blur_levels(max_radius: float, levels: int) -> np.ndarray:
    """Radii ``0 = r_0 < … < r_levels = max_radius`` of the disc-blur stack."""
    return np.linspace(0.0, max_radius, levels + 1)


def render_varying_defocus(image: np.ndarray, radius: np.ndarray, levels: int) -> np.ndarray:
    """Blur ``image`` (H×W×C float) with a disc whose radius varies per pixel (``radius`` H×W).

    A stack of uniform disc blurs at :func:`blur_levels` radii is blended per pixel between the
    two levels around that pixel's radius. Level 0 is ``image`` itself, so a pixel of radius 0
    keeps its value exactly.
    """
    if radius.shape != image.shape[:2]:
        raise ValueError(f"radius map {radius.shape} does not match the image {image.shape[:2]}")
    max_radius = float(radius.max())
    if max_radius <= 0:
        return image.astype(np.float32, copy=True)
    radii = blur_levels(max_radius, levels)
    step = radii[1]
    position = np.clip(radius / step, 0.0, levels)
    lower = np.minimum(np.floor(position).astype(np.int64), levels - 1)
    weight_upper = (position - lower)[..., None].astype(np.float32)
    out = np.zeros_like(image, dtype=np.float32)
    previous = image.astype(np.float32)
    for level in range(levels):
        upper = blur_image(image, disc_kernel(float(radii[level + 1])))
        at_level = (lower == level)[..., None]
        blend = previous * (1 - weight_upper) + upper * weight_upper
        out = np.where(at_level, blend, out)
        previous = upper
    return out


# --------------------------------------------------------------------------- noise and compression


def add_poisson_gaussian_noise(rng: np.random.Generator, linear: np.ndarray, shot: float, read_sigma: float) -> np.ndarray:
    """Heteroscedastic sensor noise: ``x + sqrt(shot·x + read_sigma²)·n``, ``n ~ N(0, 1)`` per
    pixel and channel (the Gaussian approximation of Poisson–Gaussian noise); clipped to [0, 1]."""
    variance = shot * np.clip(linear, 0.0, 1.0) + read_sigma**2
    noisy = linear + np.sqrt(variance) * rng.standard_normal(linear.shape).astype(np.float32)
    return np.clip(noisy, 0.0, 1.0).astype(np.float32)


def jpeg_roundtrip(image: np.ndarray, quality: int) -> np.ndarray:
    """Encode an RGB float image as 8-bit JPEG at ``quality`` (4:2:0, libjpeg's default) and decode it."""
    samples = np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8)
    ok, encoded = cv2.imencode(".jpg", samples[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    decoded = cv2.imdecode(encoded, cv2.IMREAD_COLOR)[..., ::-1]
    return decoded.astype(np.float32) / 255.0


def quantise_8bit(image: np.ndarray) -> np.ndarray:
    return (np.rint(np.clip(image, 0, 1) * 255) / 255).astype(np.float32)


# --------------------------------------------------------------------------- one degradation


@dataclass
class Degradation:
    """One drawn degradation, enough to apply it again and to describe it (JSON-ready)."""

    kind: str
    kernel: np.ndarray | None = None  # a uniform kernel (uniform defocus, motion, or the shake of defocus_motion)
    radius_map: np.ndarray | None = None  # varying defocus: per-pixel disc radius
    levels: int = 8
    shot_noise: float = 0.0
    read_noise_sigma: float = 0.0
    jpeg_quality: int | None = None
    linear_light: bool = True
    parameters: dict = field(default_factory=dict)

    def describe(self) -> dict:
        info = {"kind": self.kind, "shot_noise": self.shot_noise, "read_noise_sigma": self.read_noise_sigma,
                "jpeg_quality": self.jpeg_quality, "linear_light": self.linear_light}
        info.update(self.parameters)
        return info

    def blur(self, sharp: np.ndarray) -> np.ndarray:
        """The blur alone (no noise, no compression), in the configured light, back in sRGB."""
        light = srgb_to_linear(sharp) if self.linear_light else sharp.astype(np.float32)
        light = self._blur_light(light)
        return linear_to_srgb(light) if self.linear_light else np.clip(light, 0, 1).astype(np.float32)

    def _blur_light(self, light: np.ndarray) -> np.ndarray:
        if self.radius_map is not None:
            light = render_varying_defocus(light, self.radius_map, self.levels)
        if self.kernel is not None:
            light = blur_image(light, self.kernel)
        return light

    def apply(self, rng: np.random.Generator, sharp: np.ndarray) -> np.ndarray:
        """Blur, noise, tone curve, 8-bit quantisation and JPEG, on an H×W×3 float sRGB image."""
        light = srgb_to_linear(sharp) if self.linear_light else sharp.astype(np.float32)
        light = self._blur_light(light)
        if self.shot_noise > 0 or self.read_noise_sigma > 0:
            light = add_poisson_gaussian_noise(rng, light, self.shot_noise, self.read_noise_sigma)
        image = linear_to_srgb(light) if self.linear_light else np.clip(light, 0, 1).astype(np.float32)
        if self.jpeg_quality is not None:
            return jpeg_roundtrip(image, self.jpeg_quality)
        return quantise_8bit(image)


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    if low <= 0:
        return float(rng.uniform(low, high))
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def sample_degradation(
    rng: np.random.Generator, config: DegradationConfig, height: int, width: int, kind: str | None = None
) -> Degradation:
    """Draw one degradation for an ``height``×``width`` image (``kind`` forces the blur kind)."""
    probabilities = config.shares.as_probabilities()
    if kind is None:
        kinds = [k for k in BLUR_KINDS if probabilities[k] > 0]
        kind = str(rng.choice(kinds, p=np.array([probabilities[k] for k in kinds])))
    elif kind not in BLUR_KINDS:
        raise ValueError(f"unknown blur kind {kind!r}; known: {', '.join(BLUR_KINDS)}")
    degradation = Degradation(kind=kind, levels=config.varying_levels, linear_light=config.linear_light)
    if kind == "defocus_uniform":
        radius = float(rng.uniform(*config.defocus_radius))
        degradation.kernel = disc_kernel(radius)
        degradation.parameters["radius"] = radius
    if kind in ("defocus_varying", "defocus_motion"):
        max_radius = float(rng.uniform(*config.varying_max_radius))
        depth = random_depth_map(rng, height, width)
        focus = float(depth[int(rng.integers(0, height)), int(rng.integers(0, width))])
        depth_of_field = float(rng.uniform(0.0, 0.15))
        degradation.radius_map = radius_map_from_depth(depth, focus, max_radius, depth_of_field)
        degradation.parameters.update(max_radius=max_radius, focus=focus, depth_of_field=depth_of_field)
    if kind in ("motion", "defocus_motion"):
        length = float(rng.uniform(*config.motion_length))
        if kind == "defocus_motion":
            length = max(config.motion_length[0], length / 2)  # together, each blur is milder
        degradation.kernel, _ = motion_kernel(rng, length)
        degradation.parameters["motion_length"] = length
    if rng.uniform() < config.noise_probability:
        degradation.shot_noise = _log_uniform(rng, *config.shot_noise)
        degradation.read_noise_sigma = float(rng.uniform(*config.read_noise_sigma))
    if rng.uniform() < config.jpeg_probability:
        degradation.jpeg_quality = int(rng.integers(config.jpeg_quality[0], config.jpeg_quality[1] + 1))
    return degradation


def degrade_crop(
    rng: np.random.Generator, sharp: np.ndarray, config: DegradationConfig, kind: str | None = None
) -> tuple[np.ndarray, np.ndarray, Degradation]:
    """Degrade a crop that carries ``config.margin()`` pixels of context on every side.

    Returns ``(blurry, sharp, degradation)`` with the margin cut off both images, so that the
    border pixels of the blurry patch were blurred with real neighbours, not reflections.
    """
    margin = config.margin()
    height, width = sharp.shape[:2]
    if height <= 2 * margin or width <= 2 * margin:
        raise ValueError(f"crop {width}×{height} is too small for a margin of {margin} px")
    degradation = sample_degradation(rng, config, height, width, kind)
    blurry = degradation.apply(rng, sharp)
    inner = (slice(margin, height - margin), slice(margin, width - margin))
    return blurry[inner], sharp[inner].astype(np.float32), degradation
