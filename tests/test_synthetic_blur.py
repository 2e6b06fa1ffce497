"""Blur kernels, the blur model, and the synthetic dataset generator (byte-identical for a seed,
split by source photo, kernels saved so that they reproduce the blurry images)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from swintormer.core.image_io import read_image, write_image
from swintormer.core.data.synthetic_blur import blur_image, disc_kernel, load_kernel, motion_kernel
from tools.make_synthetic_blur import SKIMAGE_PHOTOS, main as make_main


def test_disc_kernel_is_a_normalised_centred_disc():
    for radius in (0.3, 1.0, 2.5, 4.0):
        kernel = disc_kernel(radius)
        assert kernel.shape == (2 * math.ceil(radius) + 1,) * 2
        assert abs(kernel.sum() - 1.0) < 1e-12
        np.testing.assert_allclose(kernel, kernel[::-1], atol=1e-15)
        np.testing.assert_allclose(kernel, kernel.T, atol=1e-15)
    big = disc_kernel(6.0)
    # covered area ≈ π r² (in pixels): the centre value is 1/area
    assert abs(1.0 / big.max() - math.pi * 36) / (math.pi * 36) < 0.01
    assert big[6, 0] > 0 and big[0, 0] == 0  # the edge midpoint is inside, the corner is not
    assert not np.array_equal(disc_kernel(2.2), disc_kernel(2.4))  # fractional radii differ
    with pytest.raises(ValueError):
        disc_kernel(0)


def test_motion_kernel_is_normalised_centred_and_seeded():
    kernel, trajectory = motion_kernel(np.random.default_rng(5), length=15.0)
    again, _ = motion_kernel(np.random.default_rng(5), length=15.0)
    other, _ = motion_kernel(np.random.default_rng(6), length=15.0)
    np.testing.assert_array_equal(kernel, again)
    assert not (kernel.shape == other.shape and np.allclose(kernel, other))
    assert abs(kernel.sum() - 1.0) < 1e-12 and kernel.min() >= 0
    half = kernel.shape[0] // 2
    ys, xs = np.mgrid[: kernel.shape[0], : kernel.shape[1]]
    assert abs((kernel * xs).sum() - half) < 1e-9 and abs((kernel * ys).sum() - half) < 1e-9
    extent = (trajectory.max(axis=0) - trajectory.min(axis=0)).max()
    assert abs(extent - 15.0) < 1e-9
    assert (kernel > 0).sum() > 15  # a path, not a point


def test_blur_is_a_true_convolution_that_keeps_brightness():
    kernel, _ = motion_kernel(np.random.default_rng(1), length=7.0)
    impulse = np.zeros((31, 31, 1), dtype=np.float32)
    impulse[15, 15] = 1.0
    response = blur_image(impulse, kernel)[:, :, 0]
    half = kernel.shape[0] // 2
    # the response to an impulse is the kernel itself, not its mirror image
    np.testing.assert_allclose(response[15 - half : 16 + half, 15 - half : 16 + half], kernel, atol=1e-7)
    flat = np.full((20, 24, 3), 0.37, dtype=np.float32)
    np.testing.assert_allclose(blur_image(flat, disc_kernel(3.5)), 0.37, atol=1e-6)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_generator_is_byte_identical_for_a_seed_and_split_by_photo(tmp_path):
    args = ["--blur", "both", "--seed", "3", "--per-image", "2", "--max-size", "48", "--quiet"]
    assert make_main(["--out", str(tmp_path / "a"), *args]) == 0
    assert make_main(["--out", str(tmp_path / "b"), *args]) == 0
    first, second = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert first == second
    assert make_main(["--out", str(tmp_path / "c"), *args[:3], "4", *args[4:]]) == 0
    third = _tree(tmp_path / "c")
    assert first.keys() == third.keys()
    assert any(first[name] != third[name] for name in first if name.endswith(".png") and "inputC" in name)

    manifest = json.loads(first["manifest.json"])
    train, test = manifest["files"]["train"], manifest["files"]["test"]
    assert len(train) + len(test) == 2 * len(SKIMAGE_PHOTOS)
    assert test and train
    assert set(manifest["split"]["train"]).isdisjoint(manifest["split"]["test"])
    split_of_group = {}
    for split in ("train", "test"):
        for name in manifest["files"][split]:
            info = json.loads(first[f"{split}/kernels/{name}.json"])
            assert split_of_group.setdefault(info["group"], split) == split  # one split per photo
            assert info["kind"] in ("defocus", "motion")
    kinds = {json.loads(first[n])["kind"] for n in first if n.endswith(".json") and "kernels" in n}
    assert kinds == {"defocus", "motion"}
    assert split_of_group.get("motorcycle") is not None  # left and right views share a group
    some = read_image(tmp_path / "a" / "train" / "target" / f"{train[0]}.png")
    assert max(some.pixels.shape[:2]) <= 48


def test_saved_kernel_reproduces_the_blurry_image(tmp_path):
    source = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for name in ("p1", "p2", "p3"):
        write_image(source / f"{name}.png", rng.random((40, 44, 3)), bit_depth=8)
    out = tmp_path / "out"
    code = make_main(["--out", str(out), "--source", str(source), "--blur", "motion", "--noise", "0", "0",
                      "--bit-depth", "16", "--crop", "32", "--quiet"])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["split"]["test"] and len(manifest["files"]["test"]) == 1
    for split in ("train", "test"):
        for name in manifest["files"][split]:
            sharp = read_image(out / split / "target" / f"{name}.png")
            blurry = read_image(out / split / "inputC" / f"{name}.png")
            assert sharp.bit_depth == 16 and sharp.pixels.shape == (32, 32, 3)
            kernel = load_kernel(out / split / "kernels" / f"{name}.safetensors")
            info = json.loads((out / split / "kernels" / f"{name}.json").read_text())
            assert info["kind"] == "motion" and info["noise_sigma"] == 0.0
            assert list(kernel.shape) == info["kernel_shape"]
            reblurred = blur_image(sharp.pixels, kernel)
            assert np.abs(reblurred - blurry.pixels).max() <= 1.0 / 65535 + 1e-6


def test_generator_rejects_bad_arguments(tmp_path, capsys):
    assert make_main(["--out", str(tmp_path / "x"), "--source", str(tmp_path / "none")]) == 2
    assert "error:" in capsys.readouterr().err
    assert make_main(["--out", str(tmp_path / "x"), "--defocus-radius", "5", "1"]) == 2


def _photos(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    for name in ("p1", "p2", "p3"):
        write_image(folder / f"{name}.png", rng.random((24, 28, 3)), bit_depth=8)
    return folder


def test_a_used_output_folder_is_refused_without_overwrite_and_replaced_whole_with_it(tmp_path, capsys, monkeypatch):
    import tools.make_synthetic_blur as tool

    source = _photos(tmp_path / "photos")
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    common = ["--source", str(source), "--noise", "0", "0", "--quiet"]
    assert make_main(["--out", str(out), "--per-image", "2", *common]) == 0
    before = _tree(out)
    assert any("_01" in name for name in before)

    capsys.readouterr()
    assert make_main(["--out", str(out), "--per-image", "1", *common]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out ") and "--overwrite" in err and err.count("\n") == 1
    assert _tree(out) == before  # nothing written

    # A generation that fails half-way leaves the previous dataset as it was, and no temporaries.
    written = []

    def failing_write(path, pixels, bit_depth=8):
        written.append(path)
        if len(written) == 3:
            raise OSError("disk full")
        return write_image(path, pixels, bit_depth=bit_depth)

    monkeypatch.setattr(tool, "write_image", failing_write)
    assert make_main(["--out", str(out), "--per-image", "1", "--overwrite", *common]) == 2
    assert "disk full" in capsys.readouterr().err
    assert _tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out", "photos"]
    monkeypatch.undo()

    # With --overwrite the folder holds exactly what a generation into a new folder holds.
    assert make_main(["--out", str(out), "--per-image", "1", "--overwrite", *common]) == 0
    assert make_main(["--out", str(fresh), "--per-image", "1", *common]) == 0
    assert _tree(out) == _tree(fresh)
    assert not any("_01" in name for name in _tree(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "out", "photos"]


def test_overwrite_refuses_a_folder_holding_other_files(tmp_path, capsys):
    source = _photos(tmp_path / "photos")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert make_main(["--out", str(out), "--source", str(source), "--overwrite", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "notes.txt" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    # The photos a dataset was made from are not deleted with it.
    assert make_main(["--out", str(tmp_path / "data"), "--source", str(source), "--quiet"]) == 0
    inside = tmp_path / "data" / "train" / "target"
    assert make_main(["--out", str(tmp_path / "data"), "--source", str(inside), "--overwrite", "--quiet"]) == 2
    assert "lies inside --out" in capsys.readouterr().err
    # An empty folder is used as it is.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert make_main(["--out", str(empty), "--source", str(source), "--quiet"]) == 0
    assert (empty / "manifest.json").is_file()


def test_the_cpu_configs_name_one_data_command() -> None:
    """The synthetic-data configs of both stages train on the same data, made by one command."""
    repo = Path(__file__).resolve().parents[1]
    configs = [*sorted((repo / "configs/prior").glob("cpu_*.yaml")), *sorted((repo / "configs/swintormer").glob("cpu_*.yaml"))]
    commands = {}
    for config in configs:
        lines = [line.lstrip("# ").strip() for line in config.read_text().splitlines()
                 if line.startswith("#") and line.lstrip("# ").startswith("python tools/make_synthetic_blur.py")]
        assert len(lines) == 1, config.name
        commands[config.name] = lines[0]
    assert len(configs) == 6 and len(set(commands.values())) == 1, commands
    assert "--out data/synth" in next(iter(commands.values()))
