"""Make a synthetic deblurring dataset in the DPDD layout from sharp photos.

    python tools/make_synthetic_blur.py --out data/synth --blur both --seed 0 --per-image 6 --max-size 192

Output (``DIR`` = ``--out``)::

    DIR/manifest.json                    settings, split and file list
    DIR/{train,test}/inputC/NAME.png     blurry (8- or 16-bit, ``--bit-depth``)
    DIR/{train,test}/target/NAME.png     sharp
    DIR/{train,test}/kernels/NAME.safetensors   the true kernel (tensor "kernel", float64)
    DIR/{train,test}/kernels/NAME.json          kernel kind, parameters, noise level, source

``NAME`` is ``<photo>_<variant>`` (variant 0..N-1 from ``--per-image N``). Each variant draws
its own kernel, noise and (with ``--crop``) crop position.

The dataset is built in a temporary folder beside ``--out`` and renamed into place when
complete, so ``--out`` never holds half a dataset, nor files of two. A non-empty ``--out`` is
refused unless ``--overwrite`` is given; then the new dataset replaces the folder as a whole,
which is allowed only when it holds nothing but what this tool writes (``manifest.json``,
``train/``, ``test/``).

Default source: the colour photographs bundled inside scikit-image (no download):
astronaut (512×512), chelsea (300×451), coffee (400×600), rocket (427×640), motorcycle_left and
motorcycle_right (500×741, one stereo scene, kept in the same split), hubble_deep_field
(872×1000) and immunohistochemistry ``ihc`` (512×512). Left out: retina (mostly black
background), logo / color (graphics), and the grayscale images.

Reproducibility: the same arguments and seed give byte-identical files. The random draws of
variant ``v`` of photo ``p`` come from ``default_rng([seed, crc32(p), v])`` (independent of the
other photos, so adding a photo changes nothing else); PNGs are written with a fixed
compression level and no metadata; JSON is written with sorted keys. The train/test split does
not depend on the seed: source groups are ordered by the SHA-256 of their name and the first
``ceil(test_fraction · groups)`` form the test split.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from swintormer.core.files import atomic_folder, atomic_write_bytes, remove_stale_temporaries  # noqa: E402
from swintormer.core.image_io import ImageReadError, list_images, read_image, write_image  # noqa: E402
from swintormer.core.data.synthetic_blur import (  # noqa: E402
    BlurRanges,
    degrade,
    ranges_as_dict,
    sample_blur,
    save_kernel,
)

#: What the tool writes into ``--out``; ``--overwrite`` replaces a folder holding only these.
OUTPUTS = ("manifest.json", "train", "test")

SKIMAGE_PHOTOS = {
    # file in skimage/data → split group (photos of one scene share a group)
    "astronaut.png": "astronaut",
    "chelsea.png": "chelsea",
    "coffee.png": "coffee",
    "rocket.jpg": "rocket",
    "motorcycle_left.png": "motorcycle",
    "motorcycle_right.png": "motorcycle",
    "hubble_deep_field.jpg": "hubble_deep_field",
    "ihc.png": "ihc",
}


def skimage_photo_paths() -> list[tuple[Path, str]]:
    """The bundled scikit-image colour photos with their split groups."""
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    photos = []
    for file_name, group in SKIMAGE_PHOTOS.items():
        path = folder / file_name
        if path.is_file():
            photos.append((path, group))
    if not photos:
        raise FileNotFoundError(f"no bundled photos found in {folder}")
    return photos


def split_groups(groups: list[str], test_fraction: float) -> tuple[set[str], set[str]]:
    """Deterministic (seed-independent) split of source groups into (train, test)."""
    unique = sorted(set(groups), key=lambda name: hashlib.sha256(name.encode()).hexdigest())
    if len(unique) < 2:
        raise ValueError("at least two source photos (groups) are needed for a train/test split")
    test_count = min(len(unique) - 1, max(1, math.ceil(test_fraction * len(unique))))
    return set(unique[test_count:]), set(unique[:test_count])


def resize_to_max(image: np.ndarray, max_size: int | None) -> np.ndarray:
    if max_size is None or max(image.shape[:2]) <= max_size:
        return image
    scale = max_size / max(image.shape[:2])
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Write a reproducible synthetic blur dataset (DPDD layout: DIR/{train,test}/{inputC,target}) "
        "from sharp photos, with the true kernel and its parameters saved per image."
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (absent or empty, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a dataset this tool wrote before in --out: the new one is built beside it and "
                             "swapped in when complete, and the old one deleted (refused when --out holds other files)")
    parser.add_argument("--source", type=Path, default=None, help="folder of sharp photos (default: scikit-image's bundled colour photos)")
    parser.add_argument("--blur", choices=("defocus", "motion", "both"), default="defocus", help="kernel family; 'both' picks one at random per image")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--per-image", type=int, default=1, help="blurred variants per photo")
    parser.add_argument("--max-size", type=int, default=None, help="downscale photos so the longer side is at most this")
    parser.add_argument("--crop", type=int, default=None, help="random square crop of this side per variant (after --max-size)")
    parser.add_argument("--bit-depth", type=int, choices=(8, 16), default=8, help="PNG bit depth of the output")
    parser.add_argument("--test-fraction", type=float, default=0.25, help="fraction of source photos in the test split")
    parser.add_argument("--defocus-radius", type=float, nargs=2, default=list(BlurRanges.defocus_radius), metavar=("MIN", "MAX"), help="disc radius range in pixels")
    parser.add_argument("--motion-length", type=float, nargs=2, default=list(BlurRanges.motion_length), metavar=("MIN", "MAX"), help="motion trajectory extent range in pixels")
    parser.add_argument("--noise", type=float, nargs=2, default=list(BlurRanges.noise_sigma), metavar=("MIN", "MAX"), help="Gaussian noise sigma range (fraction of full scale)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _check_range(name: str, values: list[float], minimum: float) -> tuple[float, float]:
    low, high = values
    if not (minimum <= low <= high):
        raise ValueError(f"{name}: need {minimum} <= MIN <= MAX, got {low} {high}")
    return float(low), float(high)


def check_output_folder(out: Path, overwrite: bool, source: Path | None) -> None:
    """Refuse an ``--out`` that the new dataset may not replace (ValueError, one line)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    entries = sorted(entry.name for entry in out.iterdir()) if out.is_dir() else []
    if not entries:
        return
    listed = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
    if not overwrite:
        raise ValueError(f"--out {out} is not empty ({listed}); pass --overwrite to replace the dataset in it, "
                         "or choose another folder")
    foreign = [name for name in entries if name not in OUTPUTS]
    if foreign:
        raise ValueError(f"--overwrite replaces --out {out} as a whole, but it holds {', '.join(foreign[:4])}, which "
                         "this tool does not write; choose another folder")
    if source is not None and source.resolve().is_relative_to(out.resolve()):
        raise ValueError(f"--source {source} lies inside --out {out}, which --overwrite would delete")


def make_dataset(args: argparse.Namespace) -> dict:
    """Check the arguments and ``--out``, then write the dataset (see the module docstring)."""
    check_output_folder(args.out, args.overwrite, args.source)
    ranges = BlurRanges(
        defocus_radius=_check_range("--defocus-radius", args.defocus_radius, 1e-3),
        motion_length=_check_range("--motion-length", args.motion_length, 1e-3),
        noise_sigma=_check_range("--noise", args.noise, 0.0),
    )
    if args.per_image < 1:
        raise ValueError("--per-image must be at least 1")
    if args.max_size is not None and args.max_size < 8:
        raise ValueError("--max-size must be at least 8")
    if args.crop is not None and args.crop < 8:
        raise ValueError("--crop must be at least 8")
    if not 0.0 < args.test_fraction < 1.0:
        raise ValueError("--test-fraction must be between 0 and 1")
    if args.source is None:
        photos = skimage_photo_paths()
        source_label = "scikit-image bundled colour photos"
    else:
        if not args.source.is_dir():
            raise FileNotFoundError(f"source folder not found: {args.source}")
        photos = [(path, path.stem) for path in list_images(args.source)]
        if not photos:
            raise FileNotFoundError(f"no images in source folder {args.source}")
        source_label = str(args.source)
    stems = [path.stem for path, _ in photos]
    if len(set(stems)) != len(stems):
        raise ValueError("source photos must have distinct file stems")
    train_groups, test_groups = split_groups([group for _, group in photos], args.test_fraction)
    remove_stale_temporaries(args.out.resolve().parent, args.out.resolve().name)  # left by a killed run
    with atomic_folder(args.out.resolve()) as staging:
        return _write_dataset(args, staging, photos, source_label, ranges, train_groups, test_groups)


def _write_dataset(args: argparse.Namespace, root: Path, photos: list[tuple[Path, str]], source_label: str,
                   ranges: BlurRanges, train_groups: set[str], test_groups: set[str]) -> dict:
    """Write every pair, its kernel and the manifest into ``root``; returns the manifest."""
    kinds = ("defocus", "motion") if args.blur == "both" else (args.blur,)
    files: dict[str, list[str]] = {"train": [], "test": []}
    jobs = [(path, group, variant) for path, group in photos for variant in range(args.per_image)]
    loaded: dict[Path, np.ndarray] = {}
    for path, group, variant in tqdm(jobs, desc="synthesise", unit="image", disable=args.quiet):
        if path not in loaded:
            loaded = {path: resize_to_max(read_image(path).pixels, args.max_size)}
        sharp = loaded[path]
        split = "test" if group in test_groups else "train"
        rng = np.random.default_rng([args.seed, zlib.crc32(path.stem.encode()), variant])
        crop_info = None
        if args.crop is not None:
            side = min(args.crop, sharp.shape[0], sharp.shape[1])
            top = int(rng.integers(0, sharp.shape[0] - side + 1))
            left = int(rng.integers(0, sharp.shape[1] - side + 1))
            sharp_view = sharp[top : top + side, left : left + side]
            crop_info = {"top": top, "left": left, "size": side}
        else:
            sharp_view = sharp
        kind = kinds[int(rng.integers(0, len(kinds)))] if len(kinds) > 1 else kinds[0]
        sample = sample_blur(rng, kind, ranges)
        # The target is stored quantised; blur the quantised target so the pair is consistent
        # with the kernel exactly as saved.
        scale = 255.0 if args.bit_depth == 8 else 65535.0
        target = np.rint(np.clip(sharp_view, 0, 1) * scale) / scale
        blurry = degrade(rng, target.astype(np.float32), sample)
        name = f"{path.stem}_{variant:02d}"
        split_dir = root / split
        write_image(split_dir / "target" / f"{name}.png", target, bit_depth=args.bit_depth)
        write_image(split_dir / "inputC" / f"{name}.png", blurry, bit_depth=args.bit_depth)
        save_kernel(split_dir / "kernels" / f"{name}.safetensors", sample.kernel)
        info = {"name": name, "source": path.name, "group": group, "variant": variant, "split": split, "crop": crop_info}
        info.update(sample.describe())
        atomic_write_bytes(split_dir / "kernels" / f"{name}.json", (json.dumps(info, indent=2, sort_keys=True) + "\n").encode())
        files[split].append(name)
    manifest = {
        "source": source_label,
        "blur": args.blur,
        "seed": args.seed,
        "per_image": args.per_image,
        "max_size": args.max_size,
        "crop": args.crop,
        "bit_depth": args.bit_depth,
        "test_fraction": args.test_fraction,
        "ranges": ranges_as_dict(ranges),
        "split": {"train": sorted(train_groups), "test": sorted(test_groups)},
        "files": {split: sorted(names) for split, names in files.items()},
    }
    atomic_write_bytes(root / "manifest.json", (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return manifest


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        manifest = make_dataset(args)
    except (ValueError, OSError, ImageReadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    counts = {split: len(names) for split, names in manifest["files"].items()}
    print(f"wrote {counts['train']} train and {counts['test']} test pairs to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
