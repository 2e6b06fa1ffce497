"""Paired deblurring datasets: discovering blurry/sharp pairs on disk and serving training
patches and whole validation images.

Layouts understood by :func:`discover_pairs` (``root`` is one split folder, e.g. ``DPDD/train``
or the synthetic generator's ``DIR/test``):

``dpdd``
    ``root/inputC/`` (single-image blurry), ``root/inputL/`` + ``root/inputR/`` (dual-pixel
    views), ``root/target/``. Files are matched by stem. The default is single-image: the blurry
    input is ``inputC``. With ``dual_pixel=True`` the blurry input is the **6-channel
    concatenation L ⊕ R** (left view RGB, then right view RGB), as the dual-pixel DPDD models
    take it; :attr:`ImagePair.blurry` is then ``inputL`` and :attr:`ImagePair.blurry_right`
    ``inputR``.
``gopro``
    The original ``GOPRO_Large/<split>/<scene>/{blur,sharp}/`` layout (``root`` is the split
    folder; pair names are ``<scene>_<stem>`` because frame numbers repeat across scenes;
    ``blur_gamma`` is not used, as in the published GoPro protocol), or
    the flat ``root/{input,target}/`` layout of the Restormer-style release (handled as
    ``folder``).
``hide``
    The original HIDE layout: blurry images anywhere under ``root`` (e.g. ``test/test-close-ups``
    and ``test/test-long-shot``) and sharp images with the same file names in a ``GT`` folder,
    either ``root/GT`` or beside the split (``root/../GT``).
``folder``
    Any two sub-folders of ``root`` matched by stem: blurry in the first of ``input``, ``inputs``,
    ``blur``, ``blurry``, ``inputC``; sharp in the first of ``target``, ``targets``, ``sharp``,
    ``gt``, ``GT``, ``groundtruth``.
``auto``
    Picks the first that fits: ``inputC``/``inputL`` folders → dpdd; scene folders holding
    ``blur`` and ``sharp`` → gopro; a ``GT`` folder → hide; otherwise folder.

Pairs that do not match (a blurry image without a sharp partner or the reverse, two files with
the same stem in one folder, a pair whose sizes differ, a dual-pixel pair missing a view) are
listed in :attr:`PairDiscovery.problems`, one readable line each; they are never silently
dropped. Sizes come from the file headers (cheap); EXIF rotations are taken into account.

Randomness and resume
---------------------
:class:`PairedPatchDataset` draws the crop position and the augmentation of item ``index`` in
epoch ``epoch`` from ``numpy.random.default_rng([seed, epoch, index])``. The draw therefore
depends only on (seed, epoch, index): not on the process, the worker or the order items are
requested in. A trainer that restores the epoch (:meth:`PairedPatchDataset.set_epoch`) and the
sampler position resumes with exactly the data it would have seen; processes of a distributed
run draw different data because their samplers give them different indices; each epoch gives
every image new crops.

Augmentation is one of the 8 symmetries of the square (horizontal flip × 90° rotations), applied
to blurry, target and prior together after the crop, so they stay aligned pixel for pixel.

Progressive patch sizes
-----------------------
Restormer (whose training recipe Swintormer follows) trains with growing patches and shrinking
batches: :data:`RESTORMER_PROGRESSIVE` holds its published schedule (iterations per stage and
patch / batch size per stage). A trainer asks :meth:`ProgressiveSchedule.stage_at` for the stage
of the current iteration and, when the stage changes, calls
:meth:`PairedPatchDataset.set_patch_size` and rebuilds its ``DataLoader`` with the stage's batch
size (worker processes hold a copy of the dataset, so the new size reaches them only through a
new ``DataLoader`` iterator; rebuilding is also how the batch size changes). The Swintormer
paper itself reports a fixed 256×256 patch with batch 11; a one-stage schedule expresses that.

Decoding cost
-------------
Decoding a 1680×1120 16-bit PNG (DPDD size) takes about 0.3 s on one CPU core, so uncached
training reads two such files per patch. ``cache_images=True`` keeps the decoded integer
samples in memory (per process; 16-bit samples take 2 bytes per value, i.e. about 11 MB per
DPDD image), after which a 256-pixel patch costs about 2 ms.

Priors are looked up with the pair's ``blurry`` path (``inputL`` for dual-pixel pairs).
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from swintormer.core.image_io import IMAGE_EXTENSIONS, ImageReadError, list_images, read_image
from swintormer.core.priors import PriorSource

LAYOUTS = ("auto", "dpdd", "gopro", "hide", "folder")
BLURRY_FOLDER_NAMES = ("input", "inputs", "blur", "blurry", "inputC")
SHARP_FOLDER_NAMES = ("target", "targets", "sharp", "gt", "GT", "groundtruth")


@dataclass(frozen=True)
class ImagePair:
    """One aligned example: ``name`` (unique within a dataset; used for output file names),
    the ``blurry`` file, the ``sharp`` file and, for dual-pixel DPDD, ``blurry_right``."""

    name: str
    blurry: Path
    sharp: Path
    blurry_right: Path | None = None


@dataclass
class PairDiscovery:
    """The result of :func:`discover_pairs`: matched ``pairs`` (sorted by name), readable
    ``problems`` and the ``layout`` that was used."""

    pairs: list[ImagePair]
    problems: list[str] = field(default_factory=list)
    layout: str = "folder"


@dataclass(frozen=True)
class ProgressiveSchedule:
    """Progressive training: stage ``i`` lasts ``iterations[i]`` iterations with patches of
    ``patch_sizes[i]`` pixels and batches of ``batch_sizes[i]``."""

    iterations: tuple[int, ...]
    patch_sizes: tuple[int, ...]
    batch_sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if not (len(self.iterations) == len(self.patch_sizes) == len(self.batch_sizes) > 0):
            raise ValueError("iterations, patch_sizes and batch_sizes must be non-empty lists of equal length")
        if min(self.iterations) <= 0 or min(self.patch_sizes) <= 0 or min(self.batch_sizes) <= 0:
            raise ValueError("progressive schedule entries must be positive")

    @property
    def total_iterations(self) -> int:
        return int(sum(self.iterations))

    def stage_at(self, iteration: int) -> tuple[int, int, int]:
        """``(stage index, patch size, batch size)`` for a 0-based iteration; iterations past the
        end stay in the last stage."""
        boundary = 0
        for stage, length in enumerate(self.iterations):
            boundary += length
            if iteration < boundary:
                return stage, self.patch_sizes[stage], self.batch_sizes[stage]
        last = len(self.iterations) - 1
        return last, self.patch_sizes[last], self.batch_sizes[last]


# Restormer's published defocus/motion schedule (300k iterations in total).
RESTORMER_PROGRESSIVE = ProgressiveSchedule(
    iterations=(92000, 64000, 48000, 36000, 36000, 24000),
    patch_sizes=(128, 160, 192, 256, 320, 384),
    batch_sizes=(8, 5, 4, 2, 1, 1),
)


# ---------------------------------------------------------------------------------------------
# Discovery


def image_size(path: Path) -> tuple[int, int]:
    """``(height, width)`` of an image file from its header, after EXIF rotation."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
    except Exception as exc:
        raise ImageReadError(f"{path}: cannot read image header ({exc})") from None
    if orientation in (5, 6, 7, 8):  # transposing orientations swap the sides
        width, height = height, width
    return height, width


def _index_by_stem(paths: list[Path], folder_label: str, problems: list[str], key=None) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for path in paths:
        stem = key(path) if key else path.stem
        if stem in index:
            problems.append(f"duplicate name {stem!r} in {folder_label}: {index[stem].name} and {path.name}")
            continue
        index[stem] = path
    return index


def _match(
    blurry: dict[str, Path],
    sharp: dict[str, Path],
    blurry_label: str,
    sharp_label: str,
    problems: list[str],
    right: dict[str, Path] | None = None,
) -> list[ImagePair]:
    pairs = []
    for name in sorted(set(blurry) | set(sharp)):
        if name not in sharp:
            problems.append(f"{blurry[name]}: no sharp partner named {name!r} in {sharp_label}")
            continue
        if name not in blurry:
            problems.append(f"{sharp[name]}: no blurry partner named {name!r} in {blurry_label}")
            continue
        blurry_right = None
        if right is not None:
            if name not in right:
                problems.append(f"{blurry[name]}: no right dual-pixel view named {name!r} in inputR")
                continue
            blurry_right = right[name]
        pairs.append(ImagePair(name=name, blurry=blurry[name], sharp=sharp[name], blurry_right=blurry_right))
    return pairs


def _folder_by_names(root: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        if (root / name).is_dir():
            return root / name
    return None


def _discover_dpdd(root: Path, dual_pixel: bool, problems: list[str]) -> list[ImagePair]:
    target = root / "target"
    if not target.is_dir():
        raise FileNotFoundError(f"{root}: DPDD layout needs a 'target' folder")
    sharp = _index_by_stem(list_images(target), str(target), problems)
    if dual_pixel:
        left_dir, right_dir = root / "inputL", root / "inputR"
        for folder in (left_dir, right_dir):
            if not folder.is_dir():
                raise FileNotFoundError(f"{root}: dual-pixel DPDD needs '{folder.name}'")
        left = _index_by_stem(list_images(left_dir), str(left_dir), problems)
        right = _index_by_stem(list_images(right_dir), str(right_dir), problems)
        for name in sorted(set(right) - set(left)):
            problems.append(f"{right[name]}: no left dual-pixel view named {name!r} in inputL")
        return _match(left, sharp, str(left_dir), str(target), problems, right=right)
    centre = root / "inputC"
    if not centre.is_dir():
        raise FileNotFoundError(f"{root}: DPDD layout needs an 'inputC' folder (or use dual_pixel)")
    blurry = _index_by_stem(list_images(centre), str(centre), problems)
    return _match(blurry, sharp, str(centre), str(target), problems)


def _gopro_scenes(root: Path) -> list[Path]:
    return sorted(
        child for child in root.iterdir() if child.is_dir() and (child / "blur").is_dir() and (child / "sharp").is_dir()
    )


def _discover_gopro(root: Path, problems: list[str]) -> list[ImagePair]:
    scenes = _gopro_scenes(root)
    if not scenes:
        if _folder_by_names(root, BLURRY_FOLDER_NAMES) and _folder_by_names(root, SHARP_FOLDER_NAMES):
            return _discover_folder(root, problems)
        raise FileNotFoundError(f"{root}: no GoPro scene folders with 'blur' and 'sharp' (nor input/target)")
    pairs: list[ImagePair] = []
    for scene in scenes:
        blurry = _index_by_stem(list_images(scene / "blur"), str(scene / "blur"), problems)
        sharp = _index_by_stem(list_images(scene / "sharp"), str(scene / "sharp"), problems)
        for pair in _match(blurry, sharp, str(scene / "blur"), str(scene / "sharp"), problems):
            pairs.append(ImagePair(name=f"{scene.name}_{pair.name}", blurry=pair.blurry, sharp=pair.sharp))
    return pairs


def _hide_gt_folder(root: Path) -> Path | None:
    for candidate in (root / "GT", root.parent / "GT"):
        if candidate.is_dir():
            return candidate
    return None


def _discover_hide(root: Path, problems: list[str]) -> list[ImagePair]:
    gt = _hide_gt_folder(root)
    if gt is None:
        raise FileNotFoundError(f"{root}: HIDE layout needs a 'GT' folder in it or beside it")
    blurry_paths = sorted(
        path
        for path in root.rglob("*")
        if path.is_file()
        and path.suffix.lower() in IMAGE_EXTENSIONS
        and not path.name.startswith(".")
        and gt not in path.parents
    )
    blurry = _index_by_stem(blurry_paths, str(root), problems)
    sharp_all = _index_by_stem(list_images(gt), str(gt), problems)
    if gt.parent == root:
        sharp = sharp_all
    else:
        # GT beside the split holds the sharp images of every split: only this split's are expected.
        sharp = {name: path for name, path in sharp_all.items() if name in blurry}
    return _match(blurry, sharp, str(root), str(gt), problems)


def _discover_folder(root: Path, problems: list[str]) -> list[ImagePair]:
    blurry_dir = _folder_by_names(root, BLURRY_FOLDER_NAMES)
    sharp_dir = _folder_by_names(root, SHARP_FOLDER_NAMES)
    if blurry_dir is None or sharp_dir is None:
        raise FileNotFoundError(
            f"{root}: no pair folders found (blurry: one of {', '.join(BLURRY_FOLDER_NAMES)}; "
            f"sharp: one of {', '.join(SHARP_FOLDER_NAMES)})"
        )
    return discover_folder_pairs(blurry_dir, sharp_dir, problems)


def discover_folder_pairs(blurry_dir: Path, sharp_dir: Path, problems: list[str] | None = None) -> list[ImagePair]:
    """Pairs from two explicit folders, matched by file stem (problems appended to ``problems``)."""
    problems = [] if problems is None else problems
    blurry = _index_by_stem(list_images(blurry_dir), str(blurry_dir), problems)
    sharp = _index_by_stem(list_images(sharp_dir), str(sharp_dir), problems)
    return _match(blurry, sharp, str(blurry_dir), str(sharp_dir), problems)


def detect_layout(root: str | os.PathLike[str]) -> str:
    """The layout ``auto`` resolves to for ``root`` (see the module docstring)."""
    root = Path(root)
    if (root / "inputC").is_dir() or (root / "inputL").is_dir():
        return "dpdd"
    if _gopro_scenes(root):
        return "gopro"
    if (root / "GT").is_dir() or (
        (root.parent / "GT").is_dir() and not _folder_by_names(root, BLURRY_FOLDER_NAMES)
    ):
        return "hide"
    return "folder"


def discover_pairs(
    root: str | os.PathLike[str], layout: str = "auto", dual_pixel: bool = False, check_sizes: bool = True
) -> PairDiscovery:
    """Find the blurry/sharp pairs of one split folder ``root`` in the given ``layout``.

    Raises ``FileNotFoundError`` when ``root`` or the folders its layout needs do not exist and
    ``ValueError`` for an unknown layout. Mismatches are reported in ``problems``; with
    ``check_sizes`` a pair whose images differ in size is moved from ``pairs`` to ``problems``.
    """
    root = Path(root)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown dataset layout {layout!r} (expected one of {', '.join(LAYOUTS)})")
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset folder not found")
    resolved = detect_layout(root) if layout == "auto" else layout
    if dual_pixel and resolved != "dpdd":
        raise ValueError(f"{root}: dual-pixel input needs the DPDD layout, found {resolved!r}")
    problems: list[str] = []
    if resolved == "dpdd":
        pairs = _discover_dpdd(root, dual_pixel, problems)
    elif resolved == "gopro":
        pairs = _discover_gopro(root, problems)
    elif resolved == "hide":
        pairs = _discover_hide(root, problems)
    else:
        pairs = _discover_folder(root, problems)
    if check_sizes:
        checked = []
        for pair in pairs:
            try:
                sizes = {path: image_size(path) for path in (pair.blurry, pair.blurry_right, pair.sharp) if path}
            except ImageReadError as exc:
                problems.append(str(exc))
                continue
            if len(set(sizes.values())) > 1:
                described = ", ".join(f"{path.name} {w}×{h}" for path, (h, w) in sizes.items())
                problems.append(f"{pair.blurry}: pair {pair.name!r} has different sizes ({described})")
                continue
            checked.append(pair)
        pairs = checked
    counts = defaultdict(int)
    for pair in pairs:
        counts[pair.name] += 1
    duplicated = [name for name, count in counts.items() if count > 1]
    if duplicated:
        problems.append(f"{root}: pair names repeat: {', '.join(sorted(duplicated)[:5])}")
    return PairDiscovery(pairs=sorted(pairs, key=lambda pair: pair.name), problems=problems, layout=resolved)


# ---------------------------------------------------------------------------------------------
# Loading


def _as_samples(pixels: np.ndarray, bit_depth: int) -> np.ndarray:
    """Float pixels back to their exact integer samples (to cache images at half the memory)."""
    scale = 255.0 if bit_depth == 8 else 65535.0
    return np.rint(pixels * scale).astype(np.uint8 if bit_depth == 8 else np.uint16)


def from_samples(samples: np.ndarray) -> np.ndarray:
    """Integer samples (8 or 16 bit) as float32 in [0, 1]."""
    scale = np.float32(255.0 if samples.dtype == np.uint8 else 65535.0)
    return samples.astype(np.float32) / scale


class DecodedImages:
    """Decoded images as their exact integer samples, kept in memory when ``cache_images``
    (per process)."""

    def __init__(self, cache_images: bool):
        self.cache_images = cache_images
        self._cache: dict[Path, np.ndarray] = {}

    def samples(self, path: Path) -> np.ndarray:
        cached = self._cache.get(path)
        if cached is not None:
            return cached
        loaded = read_image(path)
        samples = _as_samples(loaded.pixels, loaded.bit_depth)
        if self.cache_images:
            self._cache[path] = samples
        return samples


class _PairLoader:
    """Reads the arrays of a pair (blurry channels, target, optional prior)."""

    def __init__(self, pairs: list[ImagePair], prior_source: PriorSource | None, cache_images: bool):
        if not pairs:
            raise ValueError("the dataset has no image pairs")
        self.pairs = list(pairs)
        self.prior_source = prior_source
        self._images = DecodedImages(cache_images)

    def _samples(self, path: Path) -> np.ndarray:
        return self._images.samples(path)

    def arrays(self, index: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray | None]:
        """Integer blurry views, integer target, float prior (or None) of pair ``index``."""
        pair = self.pairs[index]
        blurry = [self._samples(pair.blurry)]
        if pair.blurry_right is not None:
            blurry.append(self._samples(pair.blurry_right))
        target = self._samples(pair.sharp)
        for view, path in zip(blurry, (pair.blurry, pair.blurry_right)):
            if view.shape != target.shape:
                raise ValueError(
                    f"{path}: size {view.shape[1]}×{view.shape[0]} differs from its target "
                    f"{pair.sharp.name} {target.shape[1]}×{target.shape[0]}"
                )
        prior = None
        if self.prior_source is not None:
            prior = np.asarray(self.prior_source.prior_for(pair.blurry), dtype=np.float32)
            if prior.shape != target.shape:
                raise ValueError(
                    f"{pair.blurry}: prior has shape {prior.shape}, the image {target.shape}"
                )
        return blurry, target, prior


def _to_chw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def apply_symmetry(array: np.ndarray, flip: bool, rotations: int) -> np.ndarray:
    """One of the 8 symmetries of the square on an H×W×C array: optional horizontal flip, then
    ``rotations`` counter-clockwise quarter turns."""
    if flip:
        array = array[:, ::-1]
    return np.rot90(array, k=rotations, axes=(0, 1))


class RandomPatchDataset(Dataset):
    """What every training-patch dataset shares: ``repeat`` visits of each of ``num_sources``
    images per epoch, the patch side (changed by progressive training), and the random stream of
    item ``index`` in the current epoch, ``default_rng([seed, epoch, index])`` (module docstring)."""

    def __init__(self, num_sources: int, patch_size: int, augment: bool, seed: int, repeat: int):
        self.num_sources = int(num_sources)
        self.augment = augment
        self.seed = int(seed)
        self.repeat = int(repeat)
        if self.repeat < 1:
            raise ValueError("repeat must be at least 1")
        self.epoch = 0
        self.patch_size = 0
        self.set_patch_size(patch_size)

    def set_patch_size(self, patch_size: int) -> None:
        """Change the patch side for the following items (progressive training)."""
        if int(patch_size) <= 0:
            raise ValueError(f"patch size must be positive, got {patch_size}")
        self.patch_size = int(patch_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random draws the following items use."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_sources * self.repeat

    def item_rng(self, index: int) -> np.random.Generator:
        """The random stream of item ``index`` in the current epoch (checks the index)."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        return np.random.default_rng([self.seed, self.epoch, index])


class PairedPatchDataset(RandomPatchDataset):
    """Random training patches of aligned blurry / target (/ prior) images.

    Item ``index`` is ``{"input": C×p×p float32, "target": 3×p×p float32, "name": str}`` where
    the input is the blurry RGB (6 channels L ⊕ R for dual-pixel pairs) followed by the prior's
    RGB when a ``prior_source`` is given. Crop and symmetry come from
    ``default_rng([seed, epoch, index])`` (see the module docstring); ``augment=False`` keeps
    the random crop and skips the symmetry. Images smaller than the patch are padded by
    reflection (identically for every array) so every patch has the requested size.

    ``repeat`` lets one epoch visit each pair several times (with different crops), which keeps
    small datasets from making tiny epochs; ``cache_images`` keeps decoded images in memory.
    """

    def __init__(
        self,
        pairs: list[ImagePair],
        patch_size: int,
        augment: bool = True,
        prior_source: PriorSource | None = None,
        seed: int = 0,
        repeat: int = 1,
        cache_images: bool = False,
    ):
        self._loader = _PairLoader(pairs, prior_source, cache_images)
        super().__init__(len(self._loader.pairs), patch_size, augment, seed, repeat)

    @property
    def pairs(self) -> list[ImagePair]:
        return self._loader.pairs

    def __getitem__(self, index: int) -> dict:
        rng = self.item_rng(index)
        pair_index = index % len(self._loader.pairs)
        blurry, target, prior = self._loader.arrays(pair_index)
        size = self.patch_size
        height, width = target.shape[:2]
        pad_h, pad_w = max(0, size - height), max(0, size - width)
        top = int(rng.integers(0, height + pad_h - size + 1))
        left = int(rng.integers(0, width + pad_w - size + 1))
        flip = bool(rng.integers(0, 2)) if self.augment else False
        rotations = int(rng.integers(0, 4)) if self.augment else 0

        def patch(array: np.ndarray) -> np.ndarray:
            if pad_h or pad_w:
                mode = "reflect" if (height > 1 and width > 1) else "edge"
                array = np.pad(array, ((0, pad_h), (0, pad_w), (0, 0)), mode=mode)
            cropped = array[top : top + size, left : left + size]
            return apply_symmetry(cropped, flip, rotations)

        inputs = [from_samples(patch(view)) for view in blurry]
        if prior is not None:
            inputs.append(patch(prior).astype(np.float32))
        return {
            "input": _to_chw(np.concatenate(inputs, axis=2)),
            "target": _to_chw(from_samples(patch(target))),
            "name": self._loader.pairs[pair_index].name,
        }


class PairedImageDataset(Dataset):
    """Whole images for validation: ``{"input": C×H×W, "target": 3×H×W, "name": str}`` with the
    same channel order as :class:`PairedPatchDataset`. Images differ in size, so batch them one
    at a time (or with a collate function that does not stack)."""

    def __init__(self, pairs: list[ImagePair], prior_source: PriorSource | None = None, cache_images: bool = False):
        self._loader = _PairLoader(pairs, prior_source, cache_images)

    @property
    def pairs(self) -> list[ImagePair]:
        return self._loader.pairs

    def __len__(self) -> int:
        return len(self._loader.pairs)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        blurry, target, prior = self._loader.arrays(index)
        inputs = [from_samples(view) for view in blurry]
        if prior is not None:
            inputs.append(prior)
        return {
            "input": _to_chw(np.concatenate(inputs, axis=2)),
            "target": _to_chw(from_samples(target)),
            "name": self._loader.pairs[index].name,
        }
