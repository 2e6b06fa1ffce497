"""The prior cache: priors sampled once by ``pipelines.cache_priors`` and read by stage two.

Layout of a cache folder::

    CACHE/manifest.json                          settings every entry was made with (JSON)
    CACHE/entries/<relative path>.safetensors    one entry per blurry image

``<relative path>`` is the blurry image's path relative to the dataset root (``inputC/a.png``
gives ``entries/inputC/a.png.safetensors``), so images with equal stems in different folders
stay apart. An entry holds one tensor ``prior`` (float16, H x W x 3, in [0, 1]) and
safetensors metadata (str -> str): the cache format version, the prior weights fingerprint, the
sampler settings (sampler, steps, eta, mode, timestep spacing, tiles), the run seed and seeding
rule, the image's own seed, the source image's SHA-256, its relative name and size.

Seeding (:func:`seed_name`): each image's noise is seeded from the run seed and the SHA-256 of
the image file (rule ``content``), so the prior of a file is the same whichever folder it is
cached or deblurred from: ``ldm_prior.prior_source.SampledPriors`` with the cache's settings
reproduces an entry bit for bit (same device and thread count). Caches made before this rule
seeded from the relative path (rule ``path``; their manifests carry no rule and read as it).

A dataset root may hold several splits (``train/``, ``test/``, DPDD's ``train_c/``...): one cache
holds them all, keyed by the path relative to that root.

Every file is written atomically (temporary file in the same folder, then ``os.replace``), so a
run killed at any moment leaves only complete entries; a rerun skips the entries that are valid
and makes the rest. :class:`PriorCache` implements ``swintormer.core.priors.PriorSource`` and refuses,
with a one-line :class:`PriorCacheError`, an entry whose settings differ from the manifest (or
from what the caller expects) or whose source hash differs from the image on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from safetensors import safe_open

from swintormer.core.files import TEMPORARY_SUFFIX, atomic_write_bytes
from swintormer.core.priors import PriorContract, PriorExpectation, PriorMissingError

CACHE_FORMAT_VERSION = "1"
MANIFEST_NAME = "manifest.json"
ENTRIES_DIR = "entries"
PRIOR_KEY = "prior"
# Metadata keys that must equal the manifest's settings; the rest describe the image itself.
SETTINGS_KEYS = (
    "format_version", "prior_fingerprint", "sampler", "steps", "eta", "mode", "timestep_spacing",
    "tile", "tile_stride", "decode_tile", "decode_stride", "seed", "seed_rule",
)
# Settings added after caches were first written, with the value every older cache was made with:
# a manifest or entry without the key reads as having this value, so old caches stay valid.
LATER_SETTINGS = {"timestep_spacing": "leading", "seed_rule": "path"}
SEED_RULES = ("content", "path")


class PriorCacheError(ValueError):
    """A cache or entry that cannot be used; the message is one line naming the culprit."""


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes (the source image hash an entry records)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def relative_name(image_path: str | os.PathLike[str], data_root: str | os.PathLike[str]) -> str:
    """The image's path relative to the dataset root, with ``/`` separators (the entry key)."""
    image_path, data_root = Path(image_path).resolve(), Path(data_root).resolve()
    try:
        return image_path.relative_to(data_root).as_posix()
    except ValueError:
        raise PriorCacheError(f"{image_path}: not inside the cache's dataset root {data_root}") from None


def seed_name(image_path: str | os.PathLike[str], rule: str, data_root: str | os.PathLike[str] | None = None,
              source_sha256: str | None = None) -> str:
    """The text an image's seed derives from (``ldm_prior.sampling.image_seed``) under ``rule``:
    the file's SHA-256 (``content``; pass ``source_sha256`` when already computed) or its path
    relative to ``data_root`` (``path``; the file name when no root is given)."""
    if rule == "content":
        return source_sha256 or file_sha256(image_path)
    if rule == "path":
        return relative_name(image_path, data_root) if data_root is not None else Path(image_path).name
    raise ValueError(f"unknown seeding rule {rule!r}; choose one of {SEED_RULES}")


def storage_precision(prior: np.ndarray) -> np.ndarray:
    """The prior as an entry stores it: clipped to [0, 1] and rounded to float16 (returned as
    float32). Priors sampled at deblur time are rounded the same way, so a model sees the same
    input from a cache as from its stage-one model."""
    return np.clip(np.asarray(prior, dtype=np.float32), 0.0, 1.0).astype(np.float16).astype(np.float32)


def entry_path(cache_root: str | os.PathLike[str], relative: str) -> Path:
    """Where the entry of the image with relative name ``relative`` lives."""
    return Path(cache_root) / ENTRIES_DIR / f"{relative}.safetensors"


@dataclass(frozen=True)
class CacheSettings:
    """What produced a cache: the settings every entry must carry."""

    prior_fingerprint: str
    sampling: dict[str, str]
    seed: int
    seed_rule: str = "content"

    def as_metadata(self) -> dict[str, str]:
        metadata = {"format_version": CACHE_FORMAT_VERSION, "prior_fingerprint": self.prior_fingerprint,
                    "seed": str(self.seed), "seed_rule": self.seed_rule}
        metadata.update(self.sampling)
        return {key: metadata[key] for key in SETTINGS_KEYS}


def _settings_difference(found: dict[str, str], expected: dict[str, str]) -> str | None:
    found = {**LATER_SETTINGS, **found}
    for key in SETTINGS_KEYS:
        if key in expected and found.get(key) != expected[key]:
            return f"{key} is {found.get(key)!r}, expected {expected[key]!r}"
    return None


def encode_entry(prior: np.ndarray, metadata: dict[str, str]) -> bytes:
    """The bytes of one entry: the prior in float16 and the metadata, in the safetensors format.

    Written by hand (the format is an 8-byte little-endian header length, a JSON header, then
    the raw tensor bytes) because the library orders the metadata differently from run to run;
    with sorted keys the same prior always gives the same bytes, which is what makes a resumed
    or multi-process cache comparable bit for bit with an uninterrupted one.
    """
    array = np.ascontiguousarray(storage_precision(prior).astype("<f2"))
    data = array.tobytes()
    header = {
        "__metadata__": {str(key): str(value) for key, value in sorted(metadata.items())},
        PRIOR_KEY: {"dtype": "F16", "shape": list(array.shape), "data_offsets": [0, len(data)]},
    }
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to 8-byte alignment
    return struct.pack("<Q", len(text)) + text + data


def read_entry(path: str | os.PathLike[str]) -> tuple[np.ndarray, dict[str, str]]:
    """The prior (float32 H x W x 3) and metadata of an entry; :class:`PriorCacheError` if unreadable."""
    try:
        with safe_open(str(path), framework="np") as handle:
            metadata = handle.metadata() or {}
            prior = handle.get_tensor(PRIOR_KEY)
    except Exception as exc:  # safetensors raises several types for damaged files
        raise PriorCacheError(f"{path}: unreadable cache entry ({exc})") from None
    return np.asarray(prior, dtype=np.float32), dict(metadata)


def read_entry_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """Only the metadata of an entry (cheap: the tensor is not read)."""
    try:
        with safe_open(str(path), framework="np") as handle:
            if PRIOR_KEY not in handle.keys():
                raise PriorCacheError(f"{path}: cache entry has no tensor {PRIOR_KEY!r}")
            return dict(handle.metadata() or {})
    except PriorCacheError:
        raise
    except Exception as exc:
        raise PriorCacheError(f"{path}: unreadable cache entry ({exc})") from None


def entry_problem(path: Path, expected: dict[str, str], source_sha256: str | None,
                  size: tuple[int, int] | None = None) -> str | None:
    """Why the entry at ``path`` is not a valid prior for these settings and this source (and,
    given, an image of this (height, width)), or None when it is. Reads the metadata only."""
    if not path.is_file():
        return f"{path}: missing"
    try:
        metadata = read_entry_metadata(path)
    except PriorCacheError as exc:
        return str(exc)
    difference = _settings_difference(metadata, expected)
    if difference:
        return f"{path}: made with other settings ({difference})"
    if source_sha256 is not None and metadata.get("source_sha256") != source_sha256:
        return f"{path}: the source image changed since the entry was made (hash differs)"
    if size is not None:
        found = (int(metadata.get("height", -1)), int(metadata.get("width", -1)))
        if found != size:
            return f"{path}: prior is {found[0]}x{found[1]}, the image {size[0]}x{size[1]}"
    return None


def manifest_dict(settings: CacheSettings, data_root: str | os.PathLike[str]) -> dict:
    return {"format_version": CACHE_FORMAT_VERSION, "settings": settings.as_metadata(), "data_root": str(Path(data_root).resolve())}


def read_manifest(cache_root: str | os.PathLike[str]) -> dict:
    path = Path(cache_root) / MANIFEST_NAME
    if not path.is_file():
        raise PriorCacheError(f"{path}: no cache manifest (is {cache_root} a prior cache?)")
    try:
        manifest = json.loads(path.read_text())
        manifest["settings"] = {**LATER_SETTINGS, **manifest["settings"]}
        manifest["data_root"]  # noqa: B018 - the key must exist
    except (ValueError, KeyError, TypeError) as exc:
        raise PriorCacheError(f"{path}: damaged cache manifest ({exc})") from None
    return manifest


def prepare_cache(cache_root: str | os.PathLike[str], settings: CacheSettings, data_root: str | os.PathLike[str]) -> None:
    """Create the cache folder and its manifest, or check that an existing cache was made with
    the same settings (a rerun resumes it). Call on the main process only."""
    root = Path(cache_root)
    wanted = manifest_dict(settings, data_root)
    if (root / MANIFEST_NAME).is_file():
        found = read_manifest(root)
        difference = _settings_difference(found["settings"], wanted["settings"])
        if difference:
            raise PriorCacheError(f"{root}: existing cache was made with other settings ({difference}); use another --out")
        if found["data_root"] != wanted["data_root"]:
            raise PriorCacheError(f"{root}: existing cache is for dataset {found['data_root']}, not {wanted['data_root']}")
    (root / ENTRIES_DIR).mkdir(parents=True, exist_ok=True)
    # Temporary files (swintormer.core.files' naming) of writes interrupted by a kill, in every
    # sub-folder of the entries; no process is writing yet at this point.
    for stale in (root / ENTRIES_DIR).rglob(f".*{TEMPORARY_SUFFIX}"):
        stale.unlink(missing_ok=True)
    atomic_write_bytes(root / MANIFEST_NAME, (json.dumps(wanted, indent=2, sort_keys=True) + "\n").encode())


class PriorCacheWriter:
    """Writes entries of one cache (any number of processes may write disjoint images)."""

    def __init__(self, cache_root: str | os.PathLike[str], data_root: str | os.PathLike[str], settings: CacheSettings):
        self.cache_root = Path(cache_root)
        self.data_root = Path(data_root)
        self.settings = settings
        self.expected = settings.as_metadata()

    def entry_for(self, image_path: Path) -> Path:
        return entry_path(self.cache_root, relative_name(image_path, self.data_root))

    def is_valid(self, image_path: Path, source_sha256: str) -> bool:
        """Whether a usable entry already exists (the resume test)."""
        return entry_problem(self.entry_for(image_path), self.expected, source_sha256) is None

    def write(self, image_path: Path, prior: np.ndarray, source_sha256: str, image_seed: int) -> Path:
        relative = relative_name(image_path, self.data_root)
        metadata = dict(self.expected)
        metadata.update({
            "source_sha256": source_sha256,
            "source_name": relative,
            "image_seed": str(image_seed),
            "height": str(prior.shape[0]),
            "width": str(prior.shape[1]),
        })
        path = entry_path(self.cache_root, relative)
        atomic_write_bytes(path, encode_entry(prior, metadata))
        return path


class PriorCache:
    """Reads a prior cache; implements ``swintormer.core.priors.PriorSource``.

    ``expected`` (optional) names settings the caller insists on, as a
    :class:`~swintormer.core.priors.PriorExpectation` or in the cache's string form (``{"steps":
    "50", "mode": "full"}``); a cache made otherwise is refused at once. ``data_root`` overrides
    the dataset root recorded in the manifest (a moved dataset). ``check_source`` hashes each blurry image on first use and refuses entries made from other
    bytes.
    """

    def __init__(
        self,
        cache_root: str | os.PathLike[str],
        data_root: str | os.PathLike[str] | None = None,
        expected: PriorExpectation | dict[str, str] | None = None,
        check_source: bool = True,
    ) -> None:
        self.cache_root = Path(cache_root)
        manifest = read_manifest(self.cache_root)
        self.settings: dict[str, str] = dict(manifest["settings"])
        if isinstance(expected, PriorExpectation):
            expected = expected.as_metadata()
        if expected:
            unknown = sorted(set(expected) - set(SETTINGS_KEYS))
            if unknown:
                raise PriorCacheError(f"unknown cache setting(s) {unknown}; known: {list(SETTINGS_KEYS)}")
            difference = _settings_difference(self.settings, {key: str(value) for key, value in expected.items()})
            if difference:
                raise PriorCacheError(f"{self.cache_root}: cache was made with other settings ({difference})")
        self.data_root = Path(data_root) if data_root is not None else Path(manifest["data_root"])
        self.check_source = check_source
        self._hash_memo: dict[tuple[str, int, int], str] = {}

    def _source_hash(self, path: Path) -> str:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in self._hash_memo:
            self._hash_memo[key] = file_sha256(path)
        return self._hash_memo[key]

    def entry_for(self, blurry_path: str | os.PathLike[str]) -> Path:
        return entry_path(self.cache_root, relative_name(blurry_path, self.data_root))

    def prior_for(self, blurry_path: Path, blurry: np.ndarray | None = None) -> np.ndarray:
        """The cached prior of ``blurry_path``: float32 H x W x 3 in [0, 1] (``blurry``, the
        decoded image, is not needed: entries are found by path)."""
        blurry_path = Path(blurry_path)
        path = self.entry_for(blurry_path)
        if not path.is_file():
            raise PriorMissingError(f"{blurry_path}: no prior in cache {self.cache_root} (looked for {path})")
        prior, metadata = read_entry(path)
        difference = _settings_difference(metadata, self.settings)
        if difference:
            raise PriorCacheError(f"{path}: entry made with other settings than the cache ({difference})")
        if self.check_source and metadata.get("source_sha256") != self._source_hash(blurry_path):
            raise PriorCacheError(f"{path}: stale entry, {blurry_path} changed since its prior was made (hash differs)")
        if prior.ndim != 3 or prior.shape[2] != 3:
            raise PriorCacheError(f"{path}: prior has shape {prior.shape}, expected H x W x 3")
        return prior

    def contract(self) -> PriorContract:
        """The settings every entry was made with, as a stage-two model records them."""
        return PriorContract.from_metadata(self.settings)

    def entry_problem(self, image: str | os.PathLike[str]) -> str | None:
        """Why the entry of ``image`` cannot be used (missing, unreadable, made with other settings,
        stale, or of another size than the image), or None. Reads metadata and image headers
        only, so a whole dataset is checked in seconds before training starts."""
        from swintormer.core.data.paired import image_size

        image = Path(image)
        try:
            path = self.entry_for(image)
        except PriorCacheError as exc:
            return str(exc)
        return entry_problem(path, self.settings, self._source_hash(image) if self.check_source else None,
                             size=image_size(image))

    def problems(self, images: Iterable[Path], check_size: bool = False) -> list[str]:
        """One line per image whose entry is missing, unreadable, stale, made otherwise, holds
        non-finite values or (``check_size``: reads each image's header) is of another size than
        its image. Reads every entry whole: the thorough check of ``cache_priors --verify``."""
        from swintormer.core.data.paired import image_size

        found = []
        for image in images:
            path = self.entry_for(image)
            problem = entry_problem(path, self.settings, self._source_hash(Path(image)) if self.check_source else None,
                                    size=image_size(Path(image)) if check_size else None)
            if problem is None:
                try:
                    prior, metadata = read_entry(path)
                    if prior.shape[:2] != (int(metadata.get("height", -1)), int(metadata.get("width", -1))):
                        problem = f"{path}: prior shape {prior.shape} disagrees with its metadata"
                    elif not np.all(np.isfinite(prior)):
                        problem = f"{path}: prior holds NaN or infinity"
                except PriorCacheError as exc:
                    problem = str(exc)
            if problem:
                found.append(problem)
        return found
