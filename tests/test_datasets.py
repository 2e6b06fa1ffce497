"""Pair discovery for every layout, mismatch reporting, aligned crops and symmetries,
seeded per (epoch, index) draws, progressive patch sizes and the file-based prior source."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from swintormer.core.data.paired import (
    RESTORMER_PROGRESSIVE,
    ImagePair,
    PairedImageDataset,
    PairedPatchDataset,
    ProgressiveSchedule,
    apply_symmetry,
    detect_layout,
    discover_pairs,
)
from swintormer.core.image_io import write_image
from swintormer.core.priors import PriorFolder, PriorMissingError, PriorSource, save_prior_safetensors


def _img(path: Path, h=8, w=10, value=0.5, bit_depth=8):
    write_image(path, np.full((h, w, 3), value), bit_depth=bit_depth)


def _coordinate_image(h: int, w: int, offset: float = 0.0) -> np.ndarray:
    """Channels encode (row, column, offset): every pixel is unique, so a patch reveals where it
    came from and how it was turned."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([rows / 65535.0 * 100, cols / 65535.0 * 100, np.full((h, w), offset)], axis=2)


def test_dpdd_layout_matches_by_stem_and_reports_problems(tmp_path):
    root = tmp_path / "DPDD" / "test"
    for name in ("a", "b", "c"):
        _img(root / "inputC" / f"{name}.png")
    for name in ("a", "b", "d"):
        _img(root / "target" / f"{name}.png")
    _img(root / "target" / "b.png", h=9)  # size differs from its blurry partner
    (root / "inputC" / "a.tif").write_bytes((root / "inputC" / "a.png").read_bytes())  # duplicate stem 'a'
    found = discover_pairs(root)
    assert found.layout == "dpdd"
    assert [pair.name for pair in found.pairs] == ["a"]
    text = "\n".join(found.problems)
    assert "c.png: no sharp partner" in text
    assert "d.png: no blurry partner" in text
    assert "pair 'b' has different sizes (b.png 10×8, b.png 10×9)" in text
    assert "duplicate name 'a'" in text
    assert len(found.problems) == 4


def test_dpdd_dual_pixel_concatenates_left_then_right(tmp_path):
    root = tmp_path / "dp"
    _img(root / "inputL" / "x.png", value=0.2)
    _img(root / "inputR" / "x.png", value=0.6)
    _img(root / "inputC" / "x.png", value=0.4)
    _img(root / "target" / "x.png", value=0.8)
    _img(root / "inputL" / "y.png")  # no right view, no target
    found = discover_pairs(root, dual_pixel=True)
    assert [pair.name for pair in found.pairs] == ["x"]
    assert any("y.png: no sharp partner" in problem for problem in found.problems)
    item = PairedImageDataset(found.pairs)[0]
    assert item["input"].shape == (6, 8, 10)
    means = item["input"].mean(dim=(1, 2))
    torch.testing.assert_close(means, torch.tensor([51, 51, 51, 153, 153, 153]) / 255.0)
    single = discover_pairs(root)
    assert PairedImageDataset(single.pairs)[0]["input"].shape == (3, 8, 10)


def test_gopro_original_and_flat_layouts(tmp_path):
    root = tmp_path / "GOPRO_Large" / "test"
    for scene in ("GOPR0384_11_00", "GOPR0385_11_01"):
        for frame in ("000001", "000002"):
            _img(root / scene / "blur" / f"{frame}.png")
            _img(root / scene / "sharp" / f"{frame}.png")
    _img(root / "GOPR0385_11_01" / "blur" / "000003.png")
    found = discover_pairs(root)
    assert found.layout == "gopro"
    assert [pair.name for pair in found.pairs] == [
        "GOPR0384_11_00_000001", "GOPR0384_11_00_000002", "GOPR0385_11_01_000001", "GOPR0385_11_01_000002",
    ]
    assert len(found.problems) == 1 and "000003.png: no sharp partner" in found.problems[0]

    flat = tmp_path / "GoPro" / "test"
    _img(flat / "input" / "p.png")
    _img(flat / "target" / "p.png")
    assert detect_layout(flat) == "folder"
    assert [pair.name for pair in discover_pairs(flat, layout="gopro").pairs] == ["p"]


def test_hide_layout_with_gt_beside_the_split(tmp_path):
    root = tmp_path / "HIDE_dataset"
    _img(root / "test" / "test-close-ups" / "1fromGOPR0950.png")
    _img(root / "test" / "test-long-shot" / "2fromGOPR1096.png")
    for name in ("1fromGOPR0950", "2fromGOPR1096", "9fromTRAIN"):
        _img(root / "GT" / f"{name}.png")
    found = discover_pairs(root / "test")
    assert found.layout == "hide"
    assert [pair.name for pair in found.pairs] == ["1fromGOPR0950", "2fromGOPR1096"]
    assert found.pairs[0].sharp == root / "GT" / "1fromGOPR0950.png"
    assert found.problems == []  # GT images of the other split are not reported


def test_folder_layout_and_errors(tmp_path):
    root = tmp_path / "pairs"
    _img(root / "blurry" / "q.png")
    _img(root / "sharp" / "q.png")
    found = discover_pairs(root, layout="auto")
    assert found.layout == "folder" and [p.name for p in found.pairs] == ["q"]
    with pytest.raises(FileNotFoundError, match="no pair folders"):
        discover_pairs(tmp_path / "pairs" / "blurry")
    with pytest.raises(FileNotFoundError, match="not found"):
        discover_pairs(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown dataset layout 'nope'"):
        discover_pairs(root, layout="nope")


class _CoordinatePrior:
    """A prior source that returns a known image (different from blurry and target)."""

    def __init__(self, h, w):
        self.image = _coordinate_image(h, w, offset=0.75).astype(np.float32)

    def prior_for(self, blurry_path: Path) -> np.ndarray:
        return self.image


@pytest.fixture
def coordinate_pair(tmp_path):
    h, w = 37, 53
    write_image(tmp_path / "inputC" / "img.png", _coordinate_image(h, w, offset=0.25), bit_depth=16)
    write_image(tmp_path / "target" / "img.png", _coordinate_image(h, w, offset=0.5), bit_depth=16)
    return discover_pairs(tmp_path).pairs, (h, w)


def _decode(patch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    scale = 65535.0 / 100
    return np.rint(patch[0].numpy() * scale), np.rint(patch[1].numpy() * scale)


def _find_transform(rows: np.ndarray, cols: np.ndarray, h: int, w: int):
    """The (flip, rotations, top, left) whose crop and symmetry produce this patch, or None."""
    size = rows.shape[0]
    for flip in (False, True):
        for rotations in range(4):
            top, left = int(rows.min()), int(cols.min())
            if top + size > h or left + size > w:
                continue
            grid_r, grid_c = np.meshgrid(np.arange(top, top + size), np.arange(left, left + size), indexing="ij")
            stacked = np.stack([grid_r, grid_c], axis=2)
            candidate = apply_symmetry(stacked, flip, rotations)
            if np.array_equal(candidate[:, :, 0], rows) and np.array_equal(candidate[:, :, 1], cols):
                return flip, rotations, top, left
    return None


def test_patches_are_aligned_crops_with_one_symmetry(coordinate_pair):
    pairs, (h, w) = coordinate_pair
    prior = _CoordinatePrior(h, w)
    assert isinstance(prior, PriorSource)
    dataset = PairedPatchDataset(pairs, patch_size=16, prior_source=prior, seed=3, repeat=40)
    seen = set()
    for index in range(len(dataset)):
        item = dataset[index]
        assert item["input"].shape == (6, 16, 16) and item["target"].shape == (3, 16, 16)
        assert item["name"] == "img"
        blurry, target, prior_patch = item["input"][:3], item["target"], item["input"][3:]
        torch.testing.assert_close(blurry[:2], target[:2], rtol=0, atol=0)  # same pixels
        torch.testing.assert_close(prior_patch[:2], target[:2], rtol=0, atol=2e-7)
        assert torch.all((blurry[2] - 0.25).abs() < 1e-4) and torch.all((prior_patch[2] - 0.75).abs() < 1e-6)
        transform = _find_transform(*_decode(target), h, w)
        assert transform is not None, f"item {index} is not a crop under a symmetry of the square"
        seen.add(transform[:2])
    assert len(seen) == 8  # all symmetries occur

    plain = PairedPatchDataset(pairs, patch_size=16, augment=False, seed=3, repeat=10)
    for index in range(len(plain)):
        flip, rotations, _, _ = _find_transform(*_decode(plain[index]["target"]), h, w)
        assert (flip, rotations) == (False, 0)


def test_draws_depend_only_on_seed_epoch_and_index(coordinate_pair):
    pairs, _ = coordinate_pair
    first = PairedPatchDataset(pairs, patch_size=12, seed=7, repeat=4)
    second = PairedPatchDataset(pairs, patch_size=12, seed=7, repeat=4)  # e.g. a resumed run
    first.set_epoch(5)
    second.set_epoch(5)
    for index in reversed(range(4)):  # order of requests does not matter
        torch.testing.assert_close(first[index]["target"], second[index]["target"], rtol=0, atol=0)
    epoch5 = [first[i]["target"] for i in range(4)]
    first.set_epoch(6)
    assert any(not torch.equal(a, first[i]["target"]) for i, a in enumerate(epoch5))
    assert not all(torch.equal(epoch5[0], epoch5[i]) for i in range(1, 4))  # indices differ
    other_seed = PairedPatchDataset(pairs, patch_size=12, seed=8, repeat=4)
    other_seed.set_epoch(5)
    assert any(not torch.equal(a, other_seed[i]["target"]) for i, a in enumerate(epoch5))


def test_progressive_patch_size_and_small_images(coordinate_pair):
    pairs, (h, w) = coordinate_pair
    dataset = PairedPatchDataset(pairs, patch_size=8, seed=0)
    assert dataset[0]["input"].shape == (3, 8, 8)
    dataset.set_patch_size(64)  # larger than the 37×53 image: reflected padding
    item = dataset[0]
    assert item["input"].shape == (3, 64, 64) and item["target"].shape == (3, 64, 64)
    torch.testing.assert_close(item["input"][:2], item["target"][:2], rtol=0, atol=0)
    with pytest.raises(ValueError):
        dataset.set_patch_size(0)

    schedule = ProgressiveSchedule(iterations=(10, 5), patch_sizes=(64, 128), batch_sizes=(4, 2))
    assert schedule.stage_at(0) == (0, 64, 4)
    assert schedule.stage_at(9) == (0, 64, 4)
    assert schedule.stage_at(10) == (1, 128, 2)
    assert schedule.stage_at(99) == (1, 128, 2)
    assert RESTORMER_PROGRESSIVE.total_iterations == 300000
    assert RESTORMER_PROGRESSIVE.stage_at(92000)[1:] == (160, 5)
    with pytest.raises(ValueError):
        ProgressiveSchedule(iterations=(1,), patch_sizes=(64, 96), batch_sizes=(1,))


def test_whole_image_dataset_and_cache(coordinate_pair, tmp_path):
    pairs, (h, w) = coordinate_pair
    dataset = PairedImageDataset(pairs, prior_source=_CoordinatePrior(h, w), cache_images=True)
    item = dataset[0]
    assert item["input"].shape == (6, h, w) and item["target"].shape == (3, h, w)
    # cached: still served after the files are gone
    for path in (pairs[0].blurry, pairs[0].sharp):
        path.unlink()
    torch.testing.assert_close(dataset[0]["target"], item["target"], rtol=0, atol=0)
    wrong_prior = PairedImageDataset(pairs, prior_source=_CoordinatePrior(h + 1, w), cache_images=False)
    wrong_prior._loader._images = dataset._loader._images
    with pytest.raises(ValueError, match="prior has shape"):
        wrong_prior[0]


def test_prior_folder_reads_safetensors_and_images(tmp_path):
    root = tmp_path / "ds"
    _img(root / "sceneA" / "blur" / "0001.png")
    _img(root / "sceneB" / "blur" / "0001.png")
    priors = tmp_path / "priors"
    a = np.random.default_rng(0).random((8, 10, 3)).astype(np.float32)
    save_prior_safetensors(priors / "sceneA" / "blur" / "0001.safetensors", a)
    write_image(priors / "sceneB" / "blur" / "0001.png", np.full((8, 10, 3), 0.2), bit_depth=16)
    source = PriorFolder(priors, dataset_root=root)
    np.testing.assert_array_equal(source.prior_for(root / "sceneA" / "blur" / "0001.png"), a)
    np.testing.assert_allclose(source.prior_for(root / "sceneB" / "blur" / "0001.png"), 0.2, atol=1e-5)
    by_stem = PriorFolder(priors / "sceneA" / "blur")
    np.testing.assert_array_equal(by_stem.prior_for(Path("/anywhere/0001.png")), a)
    with pytest.raises(PriorMissingError, match="0002.png: no prior file"):
        source.prior_for(root / "sceneA" / "blur" / "0002.png")
    with pytest.raises(PriorMissingError, match="not inside the dataset folder"):
        source.prior_for(tmp_path / "elsewhere.png")
    # a PriorFolder plugs into the patch dataset (alignment is checked with the coordinate prior above)
    pair = ImagePair(name="a", blurry=root / "sceneA" / "blur" / "0001.png", sharp=root / "sceneB" / "blur" / "0001.png")
    item = PairedPatchDataset([pair], patch_size=4, prior_source=source, seed=1)[0]
    assert item["input"].shape == (6, 4, 4)


def test_loader_refuses_a_pair_of_different_sizes(tmp_path):
    _img(tmp_path / "blurry.png", h=8, w=10)
    _img(tmp_path / "sharp.png", h=8, w=12)
    pair = ImagePair(name="x", blurry=tmp_path / "blurry.png", sharp=tmp_path / "sharp.png")
    with pytest.raises(ValueError, match=r"blurry.png: size 10×8 differs from its target sharp.png 12×8"):
        PairedImageDataset([pair])[0]
    with pytest.raises(ValueError, match="no image pairs"):
        PairedPatchDataset([], patch_size=8)
