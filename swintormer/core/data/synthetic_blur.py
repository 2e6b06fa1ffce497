"""Synthetic blur: defocus disc kernels, random motion trajectories, convolution and noise.

Used by ``tools/make_synthetic_blur.py`` (to make reproducible blurry/sharp pairs from sharp
photos) and ``tools/classical_baselines.py`` (which deconvolves with the true kernel).

Every random draw comes from a ``numpy.random.Generator`` passed in, so a seed fixes the result.
Kernels are float64 arrays that sum to one, with odd side lengths and the blur centred on the
middle pixel, so that :func:`blur_image` neither shifts nor brightens the image.

Blur model: ``blurry = clip(k ⊛ sharp + n, 0, 1)``, ``n ~ N(0, σ²)`` i.i.d. per pixel and
channel; the convolution uses reflected borders (``BORDER_REFLECT_101``) so the output has the
input's size and no dark frame.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

import cv2
import numpy as np

BlurKind = Literal["defocus", "motion"]


def disc_kernel(radius: float, supersample: int = 8) -> np.ndarray:
    """A normalised uniform disc (the defocus point-spread function of a circular aperture) of
    the given radius in pixels. Edge pixels get their covered area (estimated on a
    ``supersample``² sub-grid), so fractional radii give distinct kernels. Side ``2·ceil(r)+1``."""
    if not radius > 0:
        raise ValueError(f"disc radius must be positive, got {radius}")
    half = int(math.ceil(radius))
    side = 2 * half + 1
    offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
    centres = np.arange(side) - half
    fine = (centres[:, None] + offsets[None, :]).reshape(-1)
    inside = (fine[:, None] ** 2 + fine[None, :] ** 2) <= radius**2
    coverage = inside.reshape(side, supersample, side, supersample).mean(axis=(1, 3))
    if coverage.sum() == 0:  # a radius far below one pixel: the disc is the centre pixel
        coverage[half, half] = 1.0
    return coverage / coverage.sum()


def motion_kernel(
    rng: np.random.Generator,
    length: float,
    steps: int = 256,
    smoothness: float = 0.85,
    turn_scale: float = 0.6,
) -> tuple[np.ndarray, np.ndarray]:
    """A random camera-shake kernel: a 2-D trajectory with inertia rasterised onto a grid.

    The velocity keeps ``smoothness`` of its direction each step and turns by a Gaussian angle
    of standard deviation ``turn_scale`` radians otherwise, so trajectories range from nearly
    straight lines to curves. The path is scaled so its larger extent is ``length`` pixels, its
    centre of mass placed on the kernel centre, and each sample splatted bilinearly.

    Returns ``(kernel, trajectory)`` with the trajectory as ``steps×2`` (x, y) kernel coordinates.
    """
    if not length > 0:
        raise ValueError(f"motion length must be positive, got {length}")
    angle = rng.uniform(0.0, 2.0 * math.pi)
    direction = np.array([math.cos(angle), math.sin(angle)])
    positions = np.zeros((steps, 2))
    for step in range(1, steps):
        turn = rng.normal(0.0, turn_scale) * (1.0 - smoothness)
        cos_t, sin_t = math.cos(turn), math.sin(turn)
        direction = np.array([cos_t * direction[0] - sin_t * direction[1], sin_t * direction[0] + cos_t * direction[1]])
        speed = rng.uniform(0.5, 1.5)
        positions[step] = positions[step - 1] + speed * direction
    extent = float(np.max(positions.max(axis=0) - positions.min(axis=0)))
    positions *= length / max(extent, 1e-12)
    positions -= positions.mean(axis=0)
    half = int(math.ceil(np.abs(positions).max())) + 1
    side = 2 * half + 1
    kernel = np.zeros((side, side))
    xy = positions + half
    x0 = np.floor(xy[:, 0]).astype(int)
    y0 = np.floor(xy[:, 1]).astype(int)
    fx = xy[:, 0] - x0
    fy = xy[:, 1] - y0
    for dx, dy, weight in (
        (0, 0, (1 - fx) * (1 - fy)),
        (1, 0, fx * (1 - fy)),
        (0, 1, (1 - fx) * fy),
        (1, 1, fx * fy),
    ):
        np.add.at(kernel, (y0 + dy, x0 + dx), weight)
    return kernel / kernel.sum(), xy


def blur_image(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Convolve each channel of a float H×W×C image with ``kernel`` (true convolution, reflected
    borders). Returns float32."""
    kernel = np.asarray(kernel, dtype=np.float64)
    if kernel.ndim != 2 or kernel.shape[0] % 2 == 0 or kernel.shape[1] % 2 == 0:
        raise ValueError(f"kernel must be 2-D with odd sides, got shape {kernel.shape}")
    # filter2D correlates; flipping the kernel makes it a convolution.
    flipped = np.ascontiguousarray(kernel[::-1, ::-1], dtype=np.float32)
    source = np.ascontiguousarray(image, dtype=np.float32)
    out = cv2.filter2D(source, -1, flipped, borderType=cv2.BORDER_REFLECT_101)
    if out.ndim == 2 and source.ndim == 3:
        out = out[:, :, None]
    return out.astype(np.float32)


def add_noise(rng: np.random.Generator, image: np.ndarray, sigma: float) -> np.ndarray:
    """Add i.i.d. Gaussian noise of standard deviation ``sigma`` and clip to [0, 1]."""
    noisy = image.astype(np.float64) + (rng.normal(0.0, sigma, size=image.shape) if sigma > 0 else 0.0)
    return np.clip(noisy, 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class BlurRanges:
    """The ranges the generator samples from (pixels; noise as a fraction of full scale)."""

    defocus_radius: tuple[float, float] = (1.5, 6.0)
    motion_length: tuple[float, float] = (5.0, 21.0)
    noise_sigma: tuple[float, float] = (0.0, 0.01)


@dataclass
class BlurSample:
    """One sampled degradation: the kernel and the parameters that made it (JSON-ready)."""

    kind: BlurKind
    kernel: np.ndarray
    noise_sigma: float
    parameters: dict = field(default_factory=dict)

    def describe(self) -> dict:
        info = {"kind": self.kind, "noise_sigma": self.noise_sigma, "kernel_shape": list(self.kernel.shape)}
        info.update(self.parameters)
        return info


def sample_blur(rng: np.random.Generator, kind: BlurKind, ranges: BlurRanges = BlurRanges()) -> BlurSample:
    """Draw a kernel of ``kind`` and a noise level from ``ranges``."""
    if kind == "defocus":
        radius = float(rng.uniform(*ranges.defocus_radius))
        kernel = disc_kernel(radius)
        parameters = {"radius": radius}
    elif kind == "motion":
        length = float(rng.uniform(*ranges.motion_length))
        kernel, _ = motion_kernel(rng, length)
        parameters = {"length": length}
    else:
        raise ValueError(f"unknown blur kind {kind!r} (expected 'defocus' or 'motion')")
    sigma = float(rng.uniform(*ranges.noise_sigma))
    return BlurSample(kind=kind, kernel=kernel, noise_sigma=sigma, parameters=parameters)


def degrade(rng: np.random.Generator, sharp: np.ndarray, sample: BlurSample) -> np.ndarray:
    """Apply a sampled blur and its noise to a float H×W×3 image in [0, 1]."""
    return add_noise(rng, blur_image(sharp, sample.kernel), sample.noise_sigma)


def ranges_as_dict(ranges: BlurRanges) -> dict:
    return {name: list(value) for name, value in asdict(ranges).items()}


KERNEL_TENSOR_NAME = "kernel"


def save_kernel(path, kernel: np.ndarray) -> None:
    """Write a kernel as ``.safetensors`` (one float64 tensor named ``"kernel"``), atomically."""
    from safetensors.numpy import save

    from swintormer.core.files import atomic_write_bytes

    atomic_write_bytes(path, save({KERNEL_TENSOR_NAME: np.ascontiguousarray(kernel, dtype=np.float64)}))


def load_kernel(path) -> np.ndarray:
    """Read a kernel written by :func:`save_kernel`; raises ``ValueError`` naming a bad file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as handle:
            kernel = handle.get_tensor(KERNEL_TENSOR_NAME)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise ValueError(f"{path}: cannot read kernel ({exc})") from None
    if kernel.ndim != 2 or kernel.shape[0] % 2 == 0 or kernel.shape[1] % 2 == 0:
        raise ValueError(f"{path}: kernel must be 2-D with odd sides, got shape {kernel.shape}")
    return kernel.astype(np.float64)
