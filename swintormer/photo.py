"""One photo file in, one deblurred photo file out: what ``swintormer deblur`` and
``swintormer app`` share, so that both write the same bytes for the same settings.

:func:`restore_photo` reads the file once, checks its header against ``max_megapixels`` before
anything is decoded, fits the window settings to the image and to the machine's memory
(:func:`fit_settings`), decodes it with its metadata (:func:`swintormer.core.image_io.read_image_file`),
optionally converts it to sRGB, runs the :class:`~swintormer.pipeline.DeblurPipeline` and
encodes the result like the input (:func:`swintormer.core.image_io.encode_image_file`).

Memory model (bytes, for an image of P pixels; measured on the CPU with ``ru_maxrss``):

* the image: P × :data:`IMAGE_BYTES_PER_PIXEL` = the float32 input (12), the float64
  accumulator of the sliding windows (24) and the float32 output (12), which live together while
  the windows are averaged, plus the decoded samples, the alpha and the quantised output around
  them (8); a model with a prior adds the prior and the 6-channel network input (36);
* one window batch: batch × tile² × model width × :data:`WINDOW_BYTES_PER_PIXEL_AND_CHANNEL`
  plus :data:`WINDOW_OVERHEAD` (the default model, width 16: about 95 MB at tile 256 and batch
  1, 170 MB at batch 4, measured; activations grow with the width);
* the available memory: ``psutil.virtual_memory().available`` when psutil is installed, else
  ``MemAvailable`` of ``/proc/meminfo``; unknown elsewhere (no check). At most
  :data:`MEMORY_SHARE` of it is planned for.

When the image and its windows do not fit, the window batch is lowered first, then the tile
(halved, down to the model's size multiple); when even that does not fit, the image is refused
with one line saying how much it needs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from swintormer import __version__

if TYPE_CHECKING:
    from swintormer.core.image_io import EncodedImage, ImageFile
    from swintormer.pipeline import DeblurPipeline, InferenceSettings

SOFTWARE = f"swintormer {__version__}"
IMAGE_BYTES_PER_PIXEL = 56
PRIOR_BYTES_PER_PIXEL = 36
WINDOW_BYTES_PER_PIXEL_AND_CHANNEL = 48
WINDOW_OVERHEAD = 64 * 1024 * 1024
MEMORY_SHARE = 0.9


class PhotoError(ValueError):
    """An image that cannot be processed as asked; the message is one line naming the file."""


@dataclass(frozen=True)
class PhotoOptions:
    """How a photo is written: ``format`` (``"PNG"``, ``"JPEG"``, ``"TIFF"``, ``"WEBP"``; None:
    the input's own), ``quality`` for JPEG/WebP (None: 95), ``to_srgb``, and the header limit."""

    format: str | None = None
    quality: int | None = None
    to_srgb: bool = False
    max_megapixels: float | None = 200.0


@dataclass
class FittedSettings:
    """The window settings one image runs with, and what was changed to get them."""

    settings: InferenceSettings
    capped_to_image: bool = False  # the tile was larger than the image needs
    notes: list[str] = field(default_factory=list)  # memory adjustments, one line each


@dataclass
class RestoredPhoto:
    encoded: EncodedImage
    image: ImageFile  # the input as read (pixels in its encoded values, or sRGB with to_srgb)
    fitted: FittedSettings
    notes: list[str] = field(default_factory=list)


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation now, or None when unknown."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def image_bytes(height: int, width: int, with_prior: bool = False) -> int:
    return height * width * (IMAGE_BYTES_PER_PIXEL + (PRIOR_BYTES_PER_PIXEL if with_prior else 0))


def window_bytes(model_width: int, tile_h: int, tile_w: int, batch: int) -> int:
    return batch * tile_h * tile_w * model_width * WINDOW_BYTES_PER_PIXEL_AND_CHANNEL + WINDOW_OVERHEAD


def _gb(value: float) -> str:
    return f"{value / 1e9:.1f} GB"


def fit_settings(height: int, width: int, pipe: DeblurPipeline, available: int | None, label: str
                 ) -> FittedSettings:
    """The pipeline's settings for one image: the tile capped at the image's larger side rounded
    up to the model's size multiple, and the window batch, then the tile, lowered until the
    image and one window batch fit ``available`` bytes (module docstring). Raises
    :class:`PhotoError` when they cannot."""
    from swintormer.inference import default_stride

    settings = pipe.settings
    config = pipe.model.config
    multiple, model_width = config.size_multiple, config.dim
    budget = None if available is None else available * MEMORY_SHARE - image_bytes(height, width, pipe.needs_prior)
    if settings.whole:
        need = window_bytes(model_width, _round_up(height, multiple), _round_up(width, multiple), 1)
        if budget is not None and need > budget:
            raise PhotoError(f"{label}: needs about {_gb(need + image_bytes(height, width))} of memory in one pass "
                             f"(--whole), {_gb(available)} available; drop --whole to run it in windows")
        return FittedSettings(settings)
    cap = _round_up(max(height, width), multiple)
    tile = min(settings.tile, cap)
    capped = tile < settings.tile
    batch = settings.batch_size
    notes: list[str] = []
    if budget is not None:
        stride = settings.stride or default_stride(tile)

        def windows(side: int, step: int) -> int:
            along = lambda length: 1 if length <= side else math.ceil((length - side) / step) + 1  # noqa: E731
            return along(height) * along(width)

        def need(side: int, count: int) -> int:
            return window_bytes(model_width, side, side, min(count, windows(side, min(stride, side))))

        smallest = min(tile, multiple)
        if need(smallest, 1) > budget:
            total = image_bytes(height, width, pipe.needs_prior) + need(smallest, 1)
            raise PhotoError(f"{label}: needs about {_gb(total)} of memory, {_gb(available)} available")
        original_batch, original_tile = batch, tile
        while batch > 1 and need(tile, batch) > budget:
            batch -= 1
        while need(tile, batch) > budget and tile > smallest:
            tile = max(smallest, (tile // 2) // multiple * multiple or smallest)
        if batch != original_batch:
            notes.append(f"window batch lowered from {original_batch} to {batch} to fit the available memory "
                         f"({_gb(available)})")
        if tile != original_tile:
            notes.append(f"tile lowered from {original_tile} to {tile} to fit the available memory ({_gb(available)})")
    stride = settings.stride if settings.stride is None or settings.stride <= tile else None
    fitted = settings.model_copy(update={"tile": tile, "stride": stride, "batch_size": batch})
    return FittedSettings(fitted, capped_to_image=capped, notes=notes)


@contextmanager
def pipeline_settings(pipe: DeblurPipeline, settings: InferenceSettings) -> Iterator[None]:
    """Run ``pipe`` with ``settings`` inside the block; its own settings are restored after."""
    previous = pipe.settings
    pipe.settings = settings
    try:
        yield
    finally:
        pipe.settings = previous


def restore_photo(source: str | os.PathLike[str] | bytes, pipe: DeblurPipeline, options: PhotoOptions,
                  *, name: str | None = None) -> RestoredPhoto:
    """Deblur one photo file (a path, or its bytes with ``name``) into the bytes of the output
    file (module docstring). Raises :class:`swintormer.core.image_io.ImageReadError` or
    :class:`PhotoError` (one line naming the file) for what cannot be done."""
    from swintormer.core.image_io import convert_to_srgb, encode_image_file, read_header, read_image_file

    if isinstance(source, (bytes, bytearray, memoryview)):
        data, label, source_path = bytes(source), name or "<image>", None
        header = read_header(data, name=label, max_megapixels=options.max_megapixels)
    else:
        source_path = Path(source)
        label = name or str(source_path)
        header = read_header(source_path, name=label, max_megapixels=options.max_megapixels)  # before reading it all
        try:
            data = source_path.read_bytes()
        except OSError as error:
            raise PhotoError(f"{label}: cannot read file ({error.strerror or error})") from None
    fitted = fit_settings(header.height, header.width, pipe, available_memory(), label)
    image = read_image_file(data, name=label, max_megapixels=options.max_megapixels)
    del data
    image.path = source_path
    if options.to_srgb:
        image = convert_to_srgb(image)
    with pipeline_settings(pipe, fitted.settings):
        restored = pipe(image.pixels, source_path=source_path)
    try:
        encoded = encode_image_file(image, restored, format=options.format, quality=options.quality,
                                    software=SOFTWARE)
    except ValueError as error:
        raise PhotoError(f"{label}: {error}") from None
    return RestoredPhoto(encoded, image, fitted, notes=[*image.notes, *encoded.notes])
