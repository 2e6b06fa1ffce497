"""Build a corpus of real, sharp photographs for training and evaluating deblurring models.

    python tools/make_photo_corpus.py --out /work/data/photos

Output (``DIR`` = ``--out``)::

    DIR/train/NAME.png       8-bit RGB PNG, one per source photo
    DIR/test/NAME.png
    DIR/manifest.json        settings, source package versions and, per file: split, source,
                             path in the source, SHA-256 of source and output, sizes, downscale
                             factor, bokeh flag, description, perceptual hash

``NAME`` is ``<source short name>_<photo name>``, e.g. ``plasma_fallenleaf`` or
``lomiri1604_seeding_by_clements_engelhardt``.

Sources, and only these (other image collections on the machine are kept apart to judge models
on, so they must not leak into training data):

* scikit-image's bundled colour photographs (``skimage/data``; no download);
* the photographic wallpapers of the Debian packages ``plasma-workspace-wallpapers``,
  ``lomiri-wallpapers-16.04``, ``lomiri-wallpapers-20.04`` and ``ukui-wallpapers``. They are
  fetched with ``apt-get download`` into ``--download-dir`` (reused when the ``.deb`` is already
  there) or taken from ``--debs-dir``, and unpacked with ``dpkg -x`` into a temporary folder.

Which files are photographs (not illustrations or renders), which show real optical bokeh (a
sharp subject before a smooth out-of-focus background) and which split each one belongs to is
an explicit, hand-made list: ``tools/photo_corpus_sources.json`` (``--sources``). A list entry
naming a folder means "the largest image in that folder", because the packages ship one
wallpaper at several resolutions. The list also records every image that was looked at and left
out, with the reason.

Processing: decode to RGB (EXIF orientation applied, alpha dropped, grayscale replicated; see
:mod:`swintormer.core.image_io`), downscale by ``factor = max(2, longer side / --max-side)`` with area
averaging (``cv2.INTER_AREA`` on float32), round to 8 bits. The factor is at least 2 even for
small photos, so that JPEG blocks, demosaicing and sensor noise of the originals are averaged
below a pixel and the outputs can serve as sharp targets.

Reproducibility: a listed file that is missing (e.g. a newer package version dropped it) is a
fatal error naming every missing file; two listed photos whose outputs are near-identical
(perceptual dHash) are a fatal error too, so the same photo can never land in both splits.
The same packages and settings give byte-identical PNGs and manifest (no time stamps).

Exit status: 0 on success; 2 for invalid arguments, an invalid photo list or a refused output
folder; 1 when obtaining or reading the photos fails (apt-get/dpkg missing or failing, a listed
file missing, an unreadable image, near-duplicate photos).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from swintormer.core.files import atomic_write_bytes  # noqa: E402
from swintormer.core.image_io import (  # noqa: E402
    IMAGE_EXTENSIONS,
    ImageReadError,
    encode_png,
    quantize,
    read_image,
)

SKIMAGE = "skimage"
# The only Debian packages the corpus may come from, with the short names used in file names.
PACKAGES: dict[str, str] = {
    "plasma-workspace-wallpapers": "plasma",
    "lomiri-wallpapers-16.04": "lomiri1604",
    "lomiri-wallpapers-20.04": "lomiri2004",
    "ukui-wallpapers": "ukui",
}
SHORT_NAMES: dict[str, str] = {SKIMAGE: "skimage", **PACKAGES}
SPLITS = ("train", "test")
MIN_FACTOR = 2.0
DEFAULT_MAX_SIDE = 1024
DEFAULT_SOURCES = Path(__file__).resolve().with_name("photo_corpus_sources.json")
# Path components of the Plasma wallpaper layout (NAME/contents/images/WxH.ext) skipped when a
# photo's name is derived from its path.
_LAYOUT_PARTS = frozenset({"contents", "images", "images_dark"})
# Perceptual duplicate check: a 16×16 difference hash (256 bits) of each output; two photos at
# most this many bits apart are taken as the same photo. Distinct photos of the sources measure
# 39 bits or more apart; a photo re-encoded or rescaled differs by a few bits.
DHASH_SIZE = 16
DUPLICATE_MAX_DISTANCE = 24


class CorpusError(Exception):
    """Obtaining or reading the photos failed; the message is one line."""


class UsageError(CorpusError):
    """Invalid arguments, photo list or output folder; the message is one line."""


@dataclass(frozen=True)
class PhotoEntry:
    """One listed photo: where it comes from, its split, bokeh flag and description."""

    source: str  # "skimage" or a Debian package name
    path: str  # file or folder, relative to the source tree (POSIX separators)
    split: str  # "train" or "test"
    bokeh: bool
    description: str
    name: str  # output file stem
    function: str | None = None  # the skimage.data function returning this photo


@dataclass(frozen=True)
class SourceTree:
    """A folder the listed paths are relative to: an unpacked package or skimage's data."""

    root: Path
    version: str
    deb: str | None = None  # .deb file name (packages only)
    deb_sha256: str | None = None


@dataclass
class _Processed:
    entry: PhotoEntry
    source_path: str
    source_sha256: str
    original_size: tuple[int, int]
    output_size: tuple[int, int]
    factor: float
    png: bytes
    dhash: int


# ---------------------------------------------------------------------------------------------
# The photo list


def sanitize(text: str) -> str:
    """Lower-case ``text`` with every run of characters outside ``[a-z0-9]`` made one ``_``."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def photo_name(source: str, path: str, name: str | None = None) -> str:
    """Output stem of a photo: source short name plus ``name`` or the name derived from ``path``.

    The derived name is the file stem, or for a folder entry in the Plasma layout
    (``.../NAME/contents/images``) the wallpaper's folder name.
    """
    if name is None:
        parts = [part for part in PurePosixPath(path).parts if part not in _LAYOUT_PARTS]
        if not parts:
            raise UsageError(f"cannot derive a photo name from path {path!r}; give 'name'")
        name = PurePosixPath(parts[-1]).stem
    return sanitize(f"{SHORT_NAMES[source]}_{name}")


def load_sources(path: Path) -> list[PhotoEntry]:
    """Read and validate the photo list (``photos`` array of the JSON file at ``path``).

    Every entry needs ``source`` (``skimage`` or one of :data:`PACKAGES`), ``path`` (relative,
    no ``..``), ``split`` (``train``/``test``), ``bokeh`` (bool) and ``description``; skimage
    entries also ``function`` (a ``skimage.data`` function). ``name`` is optional. Raises
    :class:`UsageError` for an invalid list.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"photo list not found: {path}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read photo list {path}: {exc}") from None
    photos = data.get("photos") if isinstance(data, dict) else None
    if not isinstance(photos, list) or not photos:
        raise UsageError(f"{path}: expected an object with a non-empty 'photos' list")
    entries: list[PhotoEntry] = []
    seen_names: dict[str, str] = {}
    seen_paths: set[tuple[str, str]] = set()
    for index, item in enumerate(photos):
        where = f"{path}: photos[{index}]"
        if not isinstance(item, dict):
            raise UsageError(f"{where}: expected an object")
        source = item.get("source")
        if source not in SHORT_NAMES:
            allowed = ", ".join(sorted(SHORT_NAMES))
            raise UsageError(f"{where}: source {source!r} is not allowed (only {allowed})")
        rel = item.get("path")
        if not isinstance(rel, str) or not rel or rel.startswith("/") or ".." in PurePosixPath(rel).parts:
            raise UsageError(f"{where}: 'path' must be a relative path without '..', got {rel!r}")
        split = item.get("split")
        if split not in SPLITS:
            raise UsageError(f"{where}: 'split' must be 'train' or 'test', got {split!r}")
        bokeh = item.get("bokeh")
        if not isinstance(bokeh, bool):
            raise UsageError(f"{where}: 'bokeh' must be true or false")
        description = item.get("description")
        if not isinstance(description, str) or not description.strip():
            raise UsageError(f"{where}: 'description' is missing")
        function = item.get("function")
        if source == SKIMAGE:
            import skimage.data

            if not isinstance(function, str) or not callable(getattr(skimage.data, function, None)):
                raise UsageError(f"{where}: 'function' must name a skimage.data function, got {function!r}")
        elif function is not None:
            raise UsageError(f"{where}: 'function' is only for skimage entries")
        name = photo_name(source, rel, item.get("name"))
        if not name:
            raise UsageError(f"{where}: empty photo name")
        if name in seen_names:
            raise UsageError(f"{where}: photo name {name!r} is already used by {seen_names[name]}")
        if (source, rel) in seen_paths:
            raise UsageError(f"{where}: {source} {rel} is listed twice")
        seen_names[name] = f"{source} {rel}"
        seen_paths.add((source, rel))
        entries.append(PhotoEntry(source, rel, split, bokeh, description.strip(), name, function))
    for split in SPLITS:
        if not any(entry.split == split for entry in entries):
            raise UsageError(f"{path}: no photo in the {split} split")
    return entries


def needed_packages(entries: list[PhotoEntry]) -> list[str]:
    """The Debian packages the listed photos come from, sorted."""
    return sorted({entry.source for entry in entries if entry.source != SKIMAGE})


# ---------------------------------------------------------------------------------------------
# Obtaining the sources


def skimage_tree() -> SourceTree:
    """scikit-image's bundled data folder and the installed scikit-image version."""
    import skimage
    import skimage.data

    return SourceTree(root=Path(skimage.data.__file__).resolve().parent, version=skimage.__version__)


def default_download_dir() -> Path:
    """``$XDG_CACHE_HOME/swintormer/debs`` (``~/.cache/swintormer/debs`` by default)."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "swintormer" / "debs"


def _require_tool(name: str, why: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise CorpusError(f"{name} not found on PATH: {why}")
    return found


def _run(command: list[str], *, cwd: Path | None = None, hint: str = "") -> str:
    """Run ``command``; return its stdout, or raise :class:`CorpusError` with its last error line."""
    try:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise CorpusError(f"cannot run {command[0]}: {exc.strerror or exc}") from None
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("E:")] or lines
        detail = errors[-1] if errors else "no message"
        raise CorpusError(f"'{' '.join(command)}' failed (exit {result.returncode}): {detail}{hint}")
    return result.stdout


def deb_field(deb: Path, field: str) -> str:
    """A control field of a ``.deb`` file (``dpkg-deb -f FILE FIELD``)."""
    _require_tool("dpkg-deb", "needed to read .deb files (install dpkg)")
    return _run(["dpkg-deb", "-f", str(deb), field]).strip()


def find_debs(folder: Path, packages: list[str]) -> dict[str, Path]:
    """The ``.deb`` files in ``folder`` for ``packages`` (matched by their Package field).

    Raises :class:`CorpusError` when a package has several ``.deb`` files there (ambiguous).
    """
    found: dict[str, list[Path]] = {}
    for deb in sorted(Path(folder).glob("*.deb")):
        package = deb_field(deb, "Package")
        if package in packages:
            found.setdefault(package, []).append(deb)
    for package, debs in found.items():
        if len(debs) > 1:
            names = ", ".join(deb.name for deb in debs)
            raise CorpusError(f"several .deb files for {package} in {folder}: {names}; keep one")
    return {package: debs[0] for package, debs in found.items()}


def download_debs(
    packages: list[str],
    download_dir: Path,
    *,
    apt_update: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Path]:
    """The ``.deb`` of each package: reused from ``download_dir`` or fetched with ``apt-get download``."""
    download_dir = Path(download_dir)
    download_dir.mkdir(parents=True, exist_ok=True)
    debs = find_debs(download_dir, packages)
    missing = [package for package in packages if package not in debs]
    if missing:
        _require_tool("apt-get", "needed to download the wallpaper packages (or pass --debs-dir DIR with the .deb files)")
        if apt_update:
            log("running apt-get update")
            _run(["apt-get", "update"])
        hint = "" if apt_update else " (run 'apt-get update' first or pass --apt-update; or use --debs-dir)"
        for package in missing:
            log(f"downloading {package} with apt-get into {download_dir}")
            _run(["apt-get", "download", package], cwd=download_dir, hint=hint)
        debs = find_debs(download_dir, packages)
        still = [package for package in packages if package not in debs]
        if still:
            raise CorpusError(f"apt-get download left no .deb for {', '.join(still)} in {download_dir}")
    return debs


def extract_debs(debs: dict[str, Path], dest: Path, *, log: Callable[[str], None] = print) -> dict[str, SourceTree]:
    """Unpack each ``.deb`` with ``dpkg -x`` into ``dest/PACKAGE``; read its version."""
    _require_tool("dpkg", "needed to unpack .deb files")
    trees: dict[str, SourceTree] = {}
    for package, deb in sorted(debs.items()):
        root = Path(dest) / package
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        log(f"unpacking {deb.name}")
        _run(["dpkg", "-x", str(deb), str(root)])
        trees[package] = SourceTree(
            root=root.resolve(),
            version=deb_field(deb, "Version"),
            deb=deb.name,
            deb_sha256=sha256_file(deb),
        )
    return trees


def obtain_package_trees(
    packages: list[str],
    work_dir: Path,
    *,
    debs_dir: Path | None = None,
    download_dir: Path | None = None,
    apt_update: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, SourceTree]:
    """Find or download the ``.deb`` of each package and unpack it under ``work_dir``."""
    if not packages:
        return {}
    if debs_dir is not None:
        if not Path(debs_dir).is_dir():
            raise UsageError(f"--debs-dir is not a folder: {debs_dir}")
        debs = find_debs(Path(debs_dir), packages)
        missing = [package for package in packages if package not in debs]
        if missing:
            raise CorpusError(f"no .deb for {', '.join(missing)} in {debs_dir}")
    else:
        debs = download_debs(packages, download_dir or default_download_dir(), apt_update=apt_update, log=log)
    return extract_debs(debs, work_dir, log=log)


# ---------------------------------------------------------------------------------------------
# Processing


def sha256_file(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from an image file's header."""
    try:
        with Image.open(path) as image:
            return image.size
    except Exception as exc:  # Pillow raises several types for bad files
        raise CorpusError(f"{path}: cannot read the image header ({exc})") from None


def largest_image(folder: Path, root: Path) -> Path:
    """The image file in ``folder`` with the most pixels (symbolic links followed inside ``root``).

    Ties go to the larger file. Raises ``FileNotFoundError`` when there is none.
    """
    root = root.resolve()
    candidates: set[Path] = set()
    for child in folder.iterdir():
        if child.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        real = child.resolve()
        if real.is_file() and real.is_relative_to(root):
            candidates.add(real)
    if not candidates:
        raise FileNotFoundError(f"no image file in {folder}")

    def key(path: Path) -> tuple[int, int, str]:
        width, height = image_size(path)
        return (width * height, path.stat().st_size, path.name)

    return max(candidates, key=key)


def resolve_photo(entry: PhotoEntry, tree: SourceTree) -> Path:
    """The file of a listed photo: the path itself, or the largest image in the listed folder."""
    path = tree.root / entry.path
    if path.is_dir():
        return largest_image(path, tree.root)
    if path.is_file():
        return path
    raise FileNotFoundError(str(path))


def resolve_all(entries: list[PhotoEntry], trees: dict[str, SourceTree]) -> list[Path]:
    """Files of all listed photos; one :class:`CorpusError` naming every missing one."""
    files: list[Path] = []
    missing: list[str] = []
    for entry in entries:
        tree = trees.get(entry.source)
        if tree is None:
            raise CorpusError(f"source {entry.source} was not obtained")
        try:
            files.append(resolve_photo(entry, tree))
        except FileNotFoundError:
            missing.append(f"{entry.source} {tree.version}: {entry.path}")
    if missing:
        raise CorpusError(f"{len(missing)} listed photo(s) not found: " + "; ".join(missing))
    return files


def downscale(pixels: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """Area-average ``pixels`` (H×W×C float) by ``max(2, longer side / max_side)``.

    Returns the downscaled image and the factor; the output size is
    ``(round(W / factor), round(H / factor))``, halves rounded up.
    """
    height, width = pixels.shape[:2]
    factor = max(MIN_FACTOR, max(height, width) / max_side)
    size = (max(1, math.floor(width / factor + 0.5)), max(1, math.floor(height / factor + 0.5)))
    return cv2.resize(pixels, size, interpolation=cv2.INTER_AREA), factor


def dhash(samples: np.ndarray) -> int:
    """256-bit difference hash of an RGB image: signs of horizontal steps on a 17×16 gray thumbnail."""
    gray = cv2.cvtColor(np.ascontiguousarray(samples), cv2.COLOR_RGB2GRAY).astype(np.float32)
    small = cv2.resize(gray, (DHASH_SIZE + 1, DHASH_SIZE), interpolation=cv2.INTER_AREA)
    bits = (small[:, 1:] > small[:, :-1]).ravel()
    return int("".join("1" if bit else "0" for bit in bits), 2)


def check_duplicates(items: list[_Processed]) -> None:
    """Raise :class:`CorpusError` naming two listed photos that are the same source bytes or
    near-identical images (dHash at most :data:`DUPLICATE_MAX_DISTANCE` bits apart)."""
    for i, first in enumerate(items):
        for second in items[i + 1 :]:
            distance = bin(first.dhash ^ second.dhash).count("1")
            if first.source_sha256 == second.source_sha256 or distance <= DUPLICATE_MAX_DISTANCE:
                raise CorpusError(
                    f"near-duplicate photos ({distance} of {DHASH_SIZE * DHASH_SIZE} hash bits differ): "
                    f"{first.entry.source} {first.source_path} and {second.entry.source} {second.source_path}; "
                    "list one of them under 'excluded' instead"
                )


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse an output path that is a file, or a non-empty folder without ``overwrite``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"--out {out} is not empty (pass --overwrite to replace the corpus in it)")


def _process(entry: PhotoEntry, file: Path, tree: SourceTree, max_side: int) -> _Processed:
    try:
        loaded = read_image(file)
    except ImageReadError as exc:
        raise CorpusError(str(exc)) from None
    small, factor = downscale(loaded.pixels, max_side)
    samples = quantize(small, 8)
    return _Processed(
        entry=entry,
        source_path=file.resolve().relative_to(tree.root).as_posix(),
        source_sha256=sha256_file(file),
        original_size=(loaded.pixels.shape[1], loaded.pixels.shape[0]),
        output_size=(samples.shape[1], samples.shape[0]),
        factor=factor,
        png=encode_png(small, bit_depth=8),
        dhash=dhash(samples),
    )


def build_corpus(
    entries: list[PhotoEntry],
    trees: dict[str, SourceTree],
    out: Path,
    *,
    max_side: int = DEFAULT_MAX_SIDE,
    overwrite: bool = False,
    quiet: bool = False,
    settings: dict | None = None,
) -> dict:
    """Process the listed photos from the unpacked ``trees`` and write the corpus to ``out``.

    Nothing is written unless every photo is found, decodes and no two are near-duplicates.
    With ``overwrite``, the old manifest is removed first and PNGs left in ``out/{train,test}``
    from an earlier corpus are deleted afterwards. Returns the manifest.
    """
    if max_side < 16:
        raise UsageError(f"--max-side must be at least 16, got {max_side}")
    out = Path(out)
    check_out_dir(out, overwrite)
    files = resolve_all(entries, trees)
    items = [
        _process(entry, file, trees[entry.source], max_side)
        for entry, file in tqdm(list(zip(entries, files)), desc="photos", unit="photo", disable=quiet)
    ]
    check_duplicates(items)

    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)
    records = []
    written: set[Path] = set()
    for item in items:
        relative = f"{item.entry.split}/{item.entry.name}.png"
        atomic_write_bytes(out / relative, item.png)
        written.add((out / relative).resolve())
        tree = trees[item.entry.source]
        record = {
            "split": item.entry.split,
            "path": relative,
            "source": item.entry.source,
            "source_path": item.source_path,
            "source_sha256": item.source_sha256,
            "output_sha256": hashlib.sha256(item.png).hexdigest(),
            "original_size": list(item.original_size),
            "output_size": list(item.output_size),
            "downscale_factor": item.factor,
            "bokeh": item.entry.bokeh,
            "description": item.entry.description,
            "dhash": f"{item.dhash:0{DHASH_SIZE * DHASH_SIZE // 4}x}",
        }
        if item.entry.source == SKIMAGE:
            record["skimage_function"] = item.entry.function
            record["skimage_version"] = tree.version
        else:
            record["package_version"] = tree.version
        records.append(record)
    removed = 0
    for split in SPLITS:
        for stale in sorted((out / split).glob("*.png")):
            if stale.resolve() not in written:
                stale.unlink()
                removed += 1
    records.sort(key=lambda record: (SPLITS.index(record["split"]), record["path"]))
    used = sorted({entry.source for entry in entries})
    manifest = {
        "settings": {
            "max_side": max_side,
            "min_factor": MIN_FACTOR,
            "resampling": "cv2.INTER_AREA on float32 RGB in [0, 1], rounded to 8 bits",
            "duplicate_check": f"dHash {DHASH_SIZE}x{DHASH_SIZE}, at most {DUPLICATE_MAX_DISTANCE} bits apart",
            **(settings or {}),
        },
        "sources": {
            source: {
                key: value
                for key, value in (
                    ("version", trees[source].version),
                    ("deb", trees[source].deb),
                    ("deb_sha256", trees[source].deb_sha256),
                )
                if value is not None
            }
            for source in used
        },
        "counts": {split: sum(record["split"] == split for record in records) for split in SPLITS},
        "files": records,
    }
    atomic_write_bytes(out / "manifest.json", (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    if removed and not quiet:
        print(f"removed {removed} PNG(s) of an earlier corpus from {out}", file=sys.stderr)
    return manifest


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Build a corpus of real, sharp photographs (OUT/{train,test}/NAME.png plus OUT/manifest.json) "
        "from scikit-image's bundled photos and the photographic wallpapers of four Debian packages, "
        "chosen, flagged for bokeh and split by an explicit list. Each photo is downscaled by at least 2 "
        "with area averaging so that compression artefacts and noise fall below a pixel.",
        epilog="Exit status: 0 success; 2 invalid arguments, photo list or output folder; "
        "1 apt-get/dpkg missing or failing, a listed file missing, an unreadable image, or near-duplicate photos.",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder; must be empty or absent unless --overwrite")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --out: the manifest and the PNGs of the new corpus are replaced, "
        "and PNGs in OUT/train and OUT/test that are not part of it are deleted",
    )
    parser.add_argument(
        "--max-side",
        type=int,
        default=DEFAULT_MAX_SIDE,
        help=f"cap on the longer side of an output (default {DEFAULT_MAX_SIDE}); "
        "the downscale factor is max(2, longer side / MAX_SIDE)",
    )
    parser.add_argument(
        "--sources",
        type=Path,
        default=DEFAULT_SOURCES,
        help="the JSON photo list: source, path, split, bokeh flag and description of each photo "
        f"(default {DEFAULT_SOURCES.relative_to(REPO_ROOT)})",
    )
    parser.add_argument(
        "--download-dir",
        type=Path,
        default=None,
        help="cache for the downloaded .deb files; a package whose .deb is already there is not downloaded again "
        f"(default {default_download_dir()})",
    )
    parser.add_argument(
        "--debs-dir",
        type=Path,
        default=None,
        help="take the .deb files from this folder (matched by their Package field) instead of running apt-get",
    )
    parser.add_argument(
        "--apt-update",
        action="store_true",
        help="run 'apt-get update' before downloading (needs root; for a machine whose package lists are empty)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar or status lines (the final summary line stays)")
    return parser


def _display_path(path: Path) -> str:
    resolved = Path(path).resolve()
    return resolved.relative_to(REPO_ROOT).as_posix() if resolved.is_relative_to(REPO_ROOT) else str(resolved)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.monotonic()

    def log(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr)

    try:
        if args.max_side < 16:
            raise UsageError(f"--max-side must be at least 16, got {args.max_side}")
        entries = load_sources(args.sources)
        check_out_dir(args.out, args.overwrite)
        with tempfile.TemporaryDirectory(prefix="photo-corpus-") as work_dir:
            trees: dict[str, SourceTree] = {}
            if any(entry.source == SKIMAGE for entry in entries):
                trees[SKIMAGE] = skimage_tree()
            trees.update(
                obtain_package_trees(
                    needed_packages(entries),
                    Path(work_dir),
                    debs_dir=args.debs_dir,
                    download_dir=args.download_dir,
                    apt_update=args.apt_update,
                    log=log,
                )
            )
            settings = {
                "sources_file": _display_path(args.sources),
                "sources_sha256": sha256_file(args.sources),
            }
            manifest = build_corpus(
                entries,
                trees,
                args.out,
                max_side=args.max_side,
                overwrite=args.overwrite,
                quiet=args.quiet,
                settings=settings,
            )
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except CorpusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    megapixels = sum(math.prod(record["output_size"]) for record in manifest["files"]) / 1e6
    bokeh = sum(record["bokeh"] for record in manifest["files"] if record["split"] == "test")
    print(
        f"wrote {manifest['counts']['train']} train and {manifest['counts']['test']} test photos "
        f"({megapixels:.2f} Mpx, {bokeh} bokeh in test) to {args.out} in {time.monotonic() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
