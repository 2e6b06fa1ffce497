"""The real-photo corpus builder (tools/make_photo_corpus.py): the largest resolution of a
wallpaper is used, every photo is area-averaged by at least 2, the manifest's hashes are the
files' hashes, one photo never lands in both splits, missing files and refused output folders
are clear errors. Fake package trees are built in tmp_path: no network, no real packages."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tools.make_photo_corpus import (
    DEFAULT_SOURCES,
    PACKAGES,
    SKIMAGE,
    CorpusError,
    SourceTree,
    build_corpus,
    load_sources,
    main,
    skimage_tree,
)

PLASMA = "plasma-workspace-wallpapers"
LOMIRI16 = "lomiri-wallpapers-16.04"
LOMIRI20 = "lomiri-wallpapers-20.04"
MEADOW = "usr/share/wallpapers/Meadow/contents/images"
STONES = "usr/share/backgrounds/Stones_by_Someone.png"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _texture(seed: int, width: int, height: int) -> np.ndarray:
    """A textured RGB uint8 image: coarse random blobs plus fine noise (distinct per seed)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(max(2, height // 16), max(2, width // 16), 3)).astype(np.float32)
    coarse = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.BICUBIC), dtype=np.float32)
    fine = rng.normal(0, 25, size=(height, width, 3))
    return np.clip(coarse + fine, 0, 255).astype(np.uint8)


def _save(array: np.ndarray, path: Path, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **options)
    return path


def _fake_trees(tmp_path: Path) -> dict[str, SourceTree]:
    """A Plasma-layout wallpaper at 1280×800 (JPEG), 640×400 (PNG: more bytes) and a symlink,
    and one small lossless lomiri photo; plus scikit-image's data folder."""
    root = tmp_path / "trees"
    big = _texture(1, 1280, 800)
    meadow = root / PLASMA / MEADOW
    _save(big, meadow / "1280x800.jpg", quality=80)
    _save(np.asarray(Image.fromarray(big).resize((640, 400), Image.BOX)), meadow / "640x400.png")
    (meadow / "320x200.png").symlink_to("640x400.png")
    _save(_texture(2, 96, 64), root / LOMIRI16 / STONES)
    assert (meadow / "640x400.png").stat().st_size > (meadow / "1280x800.jpg").stat().st_size
    return {
        PLASMA: SourceTree(root=(root / PLASMA).resolve(), version="4:1.0-1"),
        LOMIRI16: SourceTree(root=(root / LOMIRI16).resolve(), version="2.0-3"),
        LOMIRI20: SourceTree(root=(root / LOMIRI20).resolve(), version="2.0-3"),
        SKIMAGE: skimage_tree(),
    }


def _write_list(path: Path, photos: list[dict]) -> Path:
    path.write_text(json.dumps({"photos": photos}))
    return path


def _photo(source: str, rel: str, split: str, bokeh: bool = False, **extra) -> dict:
    return {"source": source, "path": rel, "split": split, "bokeh": bokeh, "description": f"{rel} photo", **extra}


CHELSEA = _photo(SKIMAGE, "chelsea.png", "train", True, function="chelsea")
COFFEE = _photo(SKIMAGE, "coffee.png", "test", function="coffee")


def test_build_corpus_takes_largest_resolution_area_averages_and_hashes(tmp_path):
    trees = _fake_trees(tmp_path)
    entries = load_sources(
        _write_list(
            tmp_path / "list.json",
            [_photo(PLASMA, MEADOW, "test", True), _photo(LOMIRI16, STONES, "train"), CHELSEA],
        )
    )
    out = tmp_path / "out"
    manifest = build_corpus(entries, trees, out, max_side=256, quiet=True)

    by_source = {record["source"]: record for record in manifest["files"]}
    assert manifest["counts"] == {"train": 2, "test": 1}
    assert len(manifest["files"]) == 3

    meadow = by_source[PLASMA]
    assert meadow["path"] == "test/plasma_meadow.png"
    assert meadow["source_path"] == f"{MEADOW}/1280x800.jpg"  # most pixels, not most bytes
    assert meadow["original_size"] == [1280, 800]
    assert meadow["downscale_factor"] == pytest.approx(5.0)
    assert meadow["output_size"] == [256, 160]
    assert meadow["bokeh"] is True and meadow["package_version"] == "4:1.0-1"
    # area averaging at factor 5: each output pixel is the mean of a 5×5 block of the decoded JPEG
    decoded = np.asarray(Image.open(trees[PLASMA].root / meadow["source_path"]).convert("RGB"), dtype=np.float64)
    expected = decoded.reshape(160, 5, 256, 5, 3).mean(axis=(1, 3))
    written = np.asarray(Image.open(out / meadow["path"]), dtype=np.float64)
    assert np.abs(written - expected).max() <= 0.5 + 1e-6

    stones = by_source[LOMIRI16]
    assert stones["downscale_factor"] == 2.0  # small photos are still halved
    assert stones["output_size"] == [48, 32]
    # area averaging: each output pixel is the mean of a 2×2 block (not a subsample)
    source = np.asarray(Image.open(trees[LOMIRI16].root / STONES), dtype=np.float64)
    block_mean = source.reshape(32, 2, 48, 2, 3).mean(axis=(1, 3))
    written = np.asarray(Image.open(out / stones["path"]), dtype=np.float64)
    assert np.abs(written - block_mean).max() <= 0.5 + 1e-6
    assert np.abs(written - source[::2, ::2]).max() > 10

    chelsea = by_source[SKIMAGE]
    assert chelsea["skimage_function"] == "chelsea"
    assert chelsea["original_size"] == [451, 300] and chelsea["output_size"] == [226, 150]

    for record in manifest["files"]:
        tree = trees[record["source"]]
        assert record["source_sha256"] == _sha256(tree.root / record["source_path"])
        assert record["output_sha256"] == _sha256(out / record["path"])
        factor = record["downscale_factor"]
        width, height = record["original_size"]
        assert factor >= 2.0
        assert record["output_size"] == [math.floor(width / factor + 0.5), math.floor(height / factor + 0.5)]
        with Image.open(out / record["path"]) as image:
            assert image.mode == "RGB" and list(image.size) == record["output_size"]
    on_disk = {split: sorted(p.name for p in (out / split).glob("*.png")) for split in ("train", "test")}
    assert on_disk == {"train": ["lomiri1604_stones_by_someone.png", "skimage_chelsea.png"], "test": ["plasma_meadow.png"]}
    assert json.loads((out / "manifest.json").read_text()) == manifest


def test_same_photo_in_two_packages_is_refused_before_writing(tmp_path):
    trees = _fake_trees(tmp_path)
    # the lomiri 16.04 photo again in the 20.04 package, re-encoded at another size
    copy = trees[LOMIRI20].root / "usr/share/backgrounds/Stones_again.jpg"
    _save(np.asarray(Image.open(trees[LOMIRI16].root / STONES).resize((80, 53), Image.BOX)), copy, quality=90)
    entries = load_sources(
        _write_list(
            tmp_path / "list.json",
            [_photo(LOMIRI16, STONES, "train"), _photo(LOMIRI20, "usr/share/backgrounds/Stones_again.jpg", "test")],
        )
    )
    out = tmp_path / "out"
    with pytest.raises(CorpusError, match="near-duplicate") as caught:
        build_corpus(entries, trees, out, max_side=256, quiet=True)
    assert STONES in str(caught.value) and "Stones_again.jpg" in str(caught.value)
    assert not out.exists()


def test_missing_listed_files_are_all_named_in_one_error(tmp_path):
    trees = _fake_trees(tmp_path)
    gone = ["usr/share/backgrounds/Gone_1.jpg", "usr/share/wallpapers/Gone2/contents/images"]
    entries = load_sources(
        _write_list(
            tmp_path / "list.json",
            [_photo(LOMIRI16, STONES, "train"), _photo(LOMIRI16, gone[0], "test"), _photo(PLASMA, gone[1], "train")],
        )
    )
    out = tmp_path / "out"
    with pytest.raises(CorpusError) as caught:
        build_corpus(entries, trees, out, quiet=True)
    message = str(caught.value)
    assert "2 listed photo(s) not found" in message and "\n" not in message
    assert f"{LOMIRI16} 2.0-3: {gone[0]}" in message and f"{PLASMA} 4:1.0-1: {gone[1]}" in message
    assert not out.exists()


def test_main_refuses_a_non_empty_out_and_overwrite_replaces_the_corpus(tmp_path, capsys):
    sources = _write_list(tmp_path / "list.json", [CHELSEA, COFFEE])
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    stale = _save(_texture(3, 8, 8), out / "train" / "stale.png")
    notes = out / "notes.txt"
    notes.write_text("mine")
    args = ["--out", str(out), "--sources", str(sources), "--max-side", "64", "--quiet"]

    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "not empty" in err and "--overwrite" in err and "\n" not in err
    assert stale.exists() and not (out / "manifest.json").exists()

    assert main(args + ["--overwrite"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [record["path"] for record in manifest["files"]] == ["train/skimage_chelsea.png", "test/skimage_coffee.png"]
    assert not stale.exists()  # a PNG of an earlier corpus would silently join the split
    assert notes.read_text() == "mine"
    assert manifest["settings"]["max_side"] == 64
    assert manifest["settings"]["sources_sha256"] == _sha256(sources)
    assert manifest["sources"] == {SKIMAGE: {"version": skimage_tree().version}}


@pytest.mark.parametrize("source", ["mate-backgrounds", "sklearn", "matplotlib"])
def test_sources_outside_the_allowed_ones_are_refused(tmp_path, capsys, source):
    sources = _write_list(tmp_path / "list.json", [CHELSEA, _photo(source, "usr/share/backgrounds/x.jpg", "test")])
    assert main(["--out", str(tmp_path / "out"), "--sources", str(sources), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "not allowed" in err and source in err
    assert not (tmp_path / "out").exists()


def test_missing_apt_get_is_a_clear_error(tmp_path, capsys, monkeypatch):
    sources = _write_list(tmp_path / "list.json", [_photo(PLASMA, MEADOW, "train"), _photo(LOMIRI16, STONES, "test")])
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    code = main(["--out", str(tmp_path / "out"), "--sources", str(sources), "--download-dir", str(tmp_path / "debs"), "--quiet"])
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: apt-get not found") and "--debs-dir" in err and "\n" not in err


@pytest.mark.skipif(shutil.which("dpkg-deb") is None or shutil.which("dpkg") is None, reason="needs dpkg and dpkg-deb")
def test_debs_dir_unpacks_a_package_and_records_its_version(tmp_path, capsys):
    package_root = tmp_path / "pkg"
    (package_root / "DEBIAN").mkdir(parents=True)
    (package_root / "DEBIAN" / "control").write_text(
        f"Package: {LOMIRI20}\nVersion: 9.9-1\nArchitecture: all\nMaintainer: Test <test@example.org>\n"
        "Description: test wallpapers\n"
    )
    _save(_texture(4, 200, 120), package_root / "usr/share/backgrounds/Leaf_by_Someone.jpg", quality=90)
    debs = tmp_path / "debs"
    debs.mkdir()
    deb = debs / "fake.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(package_root), str(deb)], check=True, capture_output=True)

    listed = _photo(LOMIRI20, "usr/share/backgrounds/Leaf_by_Someone.jpg", "test", True)
    sources = _write_list(tmp_path / "list.json", [CHELSEA, listed])
    out = tmp_path / "out"
    assert main(["--out", str(out), "--sources", str(sources), "--debs-dir", str(debs), "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sources"][LOMIRI20] == {"version": "9.9-1", "deb": "fake.deb", "deb_sha256": _sha256(deb)}
    leaf = next(record for record in manifest["files"] if record["source"] == LOMIRI20)
    assert leaf["path"] == "test/lomiri2004_leaf_by_someone.png" and leaf["package_version"] == "9.9-1"
    assert leaf["original_size"] == [200, 120] and leaf["output_size"] == [100, 60]
    assert leaf["source_sha256"] == _sha256(package_root / "usr/share/backgrounds/Leaf_by_Someone.jpg")
    capsys.readouterr()

    # the package no longer holds a listed photo: fatal, naming it and the package version
    missing = _photo(LOMIRI20, "usr/share/backgrounds/Gone_by_Someone.jpg", "train")
    sources = _write_list(tmp_path / "list2.json", [CHELSEA, listed, missing])
    code = main(["--out", str(tmp_path / "out2"), "--sources", str(sources), "--debs-dir", str(debs), "--quiet"])
    assert code == 1
    err = capsys.readouterr().err
    assert f"{LOMIRI20} 9.9-1: usr/share/backgrounds/Gone_by_Someone.jpg" in err
    assert not (tmp_path / "out2").exists()


def test_shipped_photo_list_is_split_by_photo_with_bokeh_in_test():
    entries = load_sources(DEFAULT_SOURCES)  # validates sources, fields and unique names
    test = [entry for entry in entries if entry.split == "test"]
    train = [entry for entry in entries if entry.split == "train"]
    assert sum(entry.bokeh for entry in test) >= 3
    assert any(not entry.bokeh for entry in test) and any(entry.bokeh for entry in train)
    assert 0.15 <= len(test) / len(entries) <= 0.35
    assert {entry.source for entry in entries} <= {SKIMAGE, *PACKAGES}
    assert len({entry.source for entry in test}) >= 3 and len({entry.source for entry in train}) >= 3
    names = [entry.name for entry in entries]
    assert len(set(names)) == len(names)
    data = json.loads(DEFAULT_SOURCES.read_text())
    listed = {(photo["source"], photo["path"]) for photo in data["photos"]}
    excluded = {(item["source"], item["path"]) for item in data["excluded"]}
    assert not listed & excluded and all(item["reason"] for item in data["excluded"])
    skimage_root = skimage_tree().root
    for entry in entries:
        if entry.source == SKIMAGE:
            assert (skimage_root / entry.path).is_file(), entry.path
