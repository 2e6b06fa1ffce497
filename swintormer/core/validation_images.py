"""Validation images: a few fixed crops, each shown as panels side by side, written every validation.

A training pipeline's validation hook returns a :class:`ValidationReport`: its metrics and a list
of :class:`ValidationImage` (panels left to right, e.g. blurry | prior | output | sharp). The
training engine (:mod:`swintormer.core.training`) writes them, on the main process, with
:func:`write_validation_images` to ``RUN_DIR/validation/step_XXXXXXXX/<name>.png`` (the step's
folder appears complete or not at all) and, when TensorBoard logging is on and installed, as
TensorBoard images tagged ``validation/<name>``, so a run can be watched while it trains.

Each image's ``name`` is the same at every step (the TensorBoard tag, and the file-name stem
that lines the step folders up); its ``note`` (a score, e.g. ``prior_24.31dB``) is appended to
the file name only.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from swintormer.core.files import atomic_folder
from swintormer.core.image_io import encode_png

__all__ = [
    "VALIDATION_DIR",
    "ValidationImage",
    "ValidationReport",
    "centre_crop",
    "side_by_side",
    "image_file_name",
    "write_validation_images",
    "remove_later_steps",
]

#: The run folder's sub-folder of validation images, one ``step_XXXXXXXX`` folder per validation.
VALIDATION_DIR = "validation"
STEP_PREFIX = "step_"
#: White columns between two panels, so that their borders stay visible.
GAP = 2


@dataclass
class ValidationImage:
    """One validation crop: ``panels`` (H×W×3 or H×W float pixels in [0, 1]) left to right."""

    name: str
    panels: Sequence[np.ndarray]
    note: str = ""


@dataclass
class ValidationReport:
    """What a validation hook may return instead of a plain ``{metric: value}`` dict."""

    metrics: dict[str, float]
    images: list[ValidationImage] = field(default_factory=list)


def centre_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The centre ``size``×``size`` crop of an H×W(×C) array (a side shorter than ``size`` is kept)."""
    height, width = image.shape[:2]
    top, left = max(0, (height - size) // 2), max(0, (width - size) // 2)
    return image[top: top + size, left: left + size]


def side_by_side(panels: Sequence[np.ndarray], gap: int = GAP) -> np.ndarray:
    """The panels (H×W×3, or H×W / H×W×1 grey) top-aligned in one H×W×3 float32 image, ``gap``
    white columns apart; shorter panels are filled with white below. Values are clipped to [0, 1]."""
    if not panels:
        raise ValueError("a validation image needs at least one panel")
    colour = []
    for panel in panels:
        array = np.asarray(panel, dtype=np.float32)
        if array.ndim == 2:
            array = array[:, :, None]
        if array.ndim != 3 or array.shape[2] not in (1, 3):
            raise ValueError(f"a panel must be H×W×3 or H×W, got shape {array.shape}")
        colour.append(np.broadcast_to(array, (*array.shape[:2], 3)))
    height = max(panel.shape[0] for panel in colour)
    width = sum(panel.shape[1] for panel in colour) + gap * (len(colour) - 1)
    strip = np.ones((height, width, 3), dtype=np.float32)
    left = 0
    for panel in colour:
        strip[: panel.shape[0], left: left + panel.shape[1]] = panel
        left += panel.shape[1] + gap
    # NaN (a diverged network) shows black rather than stopping the run's validation.
    return np.clip(np.nan_to_num(strip, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)


def _safe(text: str) -> str:
    """``text`` with everything but letters, digits, ``.``, ``-`` and ``_`` replaced by ``_``
    (a dataset name may hold a folder separator)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "image"


def image_file_name(image: ValidationImage) -> str:
    """``<name>[_<note>].png``, with only file-name-safe characters."""
    stem = _safe(image.name) + (f"_{_safe(image.note)}" if image.note else "")
    return f"{stem}.png"


def step_folder(run_dir: str | os.PathLike[str], step: int) -> Path:
    """``RUN_DIR/validation/step_XXXXXXXX``."""
    return Path(run_dir) / VALIDATION_DIR / f"{STEP_PREFIX}{step:08d}"


def write_validation_images(run_dir: str | os.PathLike[str], step: int,
                            images: Sequence[ValidationImage]) -> list[Path]:
    """Write ``images`` as 8-bit PNGs into :func:`step_folder` (replacing what an earlier run
    wrote for this step, all at once); returns the files written (none for no images)."""
    if not images:
        return []
    folder = step_folder(run_dir, step)
    names = [image_file_name(image) for image in images]
    if len(set(names)) != len(names):
        raise ValueError(f"validation image names are not unique: {names}")
    with atomic_folder(folder) as staging:
        for image, name in zip(images, names):
            (staging / name).write_bytes(encode_png(side_by_side(image.panels)))  # atomic_folder syncs them
    return [folder / name for name in names]


def remove_later_steps(run_dir: str | os.PathLike[str], step: int) -> list[Path]:
    """Delete the validation folders of steps after ``step`` (a resumed run's continuation
    replaces them, as the metrics log is cut back); returns what was removed."""
    folder = Path(run_dir) / VALIDATION_DIR
    removed = []
    for path in sorted(folder.glob(f"{STEP_PREFIX}*")) if folder.is_dir() else []:
        suffix = path.name[len(STEP_PREFIX):]
        if path.is_dir() and suffix.isdigit() and int(suffix) > step:
            shutil.rmtree(path)
            removed.append(path)
    return removed
