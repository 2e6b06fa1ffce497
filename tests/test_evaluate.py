"""The evaluation pipeline: matching by stem, per-image and mean metrics, DPDD indoor/outdoor
groups, bad files reported while the rest is scored, LPIPS present or clearly skipped."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines import cli
from pipelines.evaluate import main
from swintormer.core.image_io import read_image, write_image
from swintormer.core.metrics import mae, psnr, ssim


@pytest.fixture
def folders(tmp_path):
    rng = np.random.default_rng(0)
    target_dir, restored_dir = tmp_path / "DPDD" / "test" / "target", tmp_path / "restored"
    for index in range(1, 5):
        sharp = rng.random((24, 20, 3))
        write_image(target_dir / f"img{index}.png", sharp, bit_depth=16)
        write_image(restored_dir / f"img{index}.png", np.clip(sharp + rng.normal(0, 0.02 * index, sharp.shape), 0, 1), bit_depth=16)
    return tmp_path, target_dir, restored_dir


def _direct(restored_dir: Path, target_dir: Path, stem: str) -> dict:
    r = read_image(restored_dir / f"{stem}.png").pixels
    t = read_image(target_dir / f"{stem}.png").pixels
    return {"psnr": psnr(r, t), "ssim": ssim(r, t), "mae": mae(r, t)}


def test_report_holds_per_image_and_mean_scores(folders, capsys):
    tmp_path, target_dir, restored_dir = folders
    report_path = tmp_path / "out" / "report.json"
    code = main(["--restored", str(restored_dir), "--target", str(target_dir.parent), "--report", str(report_path), "--quiet",
                 "--lpips-alexnet", str(tmp_path / "no_alexnet.pth")])
    assert code == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if "LPIPS" in line]
    assert len(warnings) == 1 and "no_alexnet.pth" in warnings[0]
    assert "PSNR" in captured.out and "all" in captured.out
    report = json.loads(report_path.read_text())
    assert [row["name"] for row in report["per_image"]] == ["img1", "img2", "img3", "img4"]
    for row in report["per_image"]:
        expected = _direct(restored_dir, target_dir, row["name"])
        for key in ("psnr", "ssim", "mae"):
            assert abs(row[key] - expected[key]) < 1e-9
        assert "lpips" not in row
    assert set(report["mean"]) == {"psnr", "ssim", "mae"}
    for key in ("psnr", "ssim", "mae"):
        assert abs(report["mean"][key] - np.mean([row[key] for row in report["per_image"]])) < 1e-9
    assert report["per_image"][0]["psnr"] > report["per_image"][3]["psnr"]  # less noise, higher PSNR
    assert report["lpips_unavailable"] and report["errors"] == [] and report["missing_restored"] == []


def test_one_bad_file_is_reported_and_the_rest_scored(folders, capsys):
    tmp_path, target_dir, restored_dir = folders
    (restored_dir / "img2.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)  # corrupt
    write_image(restored_dir / "img3.png", np.zeros((10, 10, 3)))  # wrong size
    (restored_dir / "img4.png").unlink()  # missing
    write_image(restored_dir / "extra.png", np.zeros((24, 20, 3)))  # no target: warning only
    report_path = tmp_path / "r.json"
    code = main(["--restored", str(restored_dir), "--target", str(target_dir), "--report", str(report_path), "--quiet", "--no-lpips"])
    assert code == 1
    err = capsys.readouterr().err
    assert "img2.png: corrupt" in err
    assert "img3.png: size 10×10 differs from target" in err
    assert "img4.png: no restored image" in err
    assert "extra.png: no target" in err
    report = json.loads(report_path.read_text())
    assert [row["name"] for row in report["per_image"]] == ["img1"]
    assert len(report["errors"]) == 2 and len(report["missing_restored"]) == 1 and len(report["unmatched_restored"]) == 1
    assert abs(report["mean"]["psnr"] - _direct(restored_dir, target_dir, "img1")["psnr"]) < 1e-9


def test_indoor_outdoor_groups_from_one_based_labels(folders):
    tmp_path, target_dir, restored_dir = folders
    # DPDD convention: 1-based indices into the naturally sorted targets, files beside 'target'
    np.save(target_dir.parent / "indoor_labels.npy", np.array([1, 3]))
    np.save(target_dir.parent / "outdoor_labels.npy", np.array([2, 4]))
    write_image(target_dir / "img10.png", np.zeros((24, 20, 3)))  # natural order: img10 is last
    write_image(restored_dir / "img10.png", np.zeros((24, 20, 3)))
    report_path = tmp_path / "g.json"
    assert main(["--restored", str(restored_dir), "--target", str(target_dir), "--report", str(report_path), "--quiet", "--no-lpips"]) == 0
    report = json.loads(report_path.read_text())
    groups = {row["name"]: row.get("group") for row in report["per_image"]}
    assert groups == {"img1": "indoor", "img2": "outdoor", "img3": "indoor", "img4": "outdoor", "img10": None}
    rows = {row["name"]: row for row in report["per_image"]}
    assert report["groups"]["indoor"]["count"] == 2
    assert abs(report["groups"]["indoor"]["psnr"] - (rows["img1"]["psnr"] + rows["img3"]["psnr"]) / 2) < 1e-9
    assert abs(report["groups"]["outdoor"]["mae"] - (rows["img2"]["mae"] + rows["img4"]["mae"]) / 2) < 1e-9
    assert report["per_image"][-1]["psnr"] == 100.0  # identical images: the documented cap


def test_lpips_reported_with_local_weights(folders, tmp_path):
    _, target_dir, restored_dir = folders
    generator = torch.Generator().manual_seed(0)
    shapes = {0: (64, 3, 11), 3: (192, 64, 5), 6: (384, 192, 3), 8: (256, 384, 3), 10: (256, 256, 3)}
    state = {}
    for index, (cout, cin, k) in shapes.items():
        state[f"features.{index}.weight"] = torch.randn(cout, cin, k, k, generator=generator) * (2 / (cin * k * k)) ** 0.5
        state[f"features.{index}.bias"] = torch.zeros(cout)
    weights = tmp_path / "alexnet.pth"
    torch.save(state, weights)
    for path in list(target_dir.iterdir()) + list(restored_dir.iterdir()):  # LPIPS needs ≥ 32 px
        write_image(path, np.kron(read_image(path).pixels, np.ones((3, 3, 1))), bit_depth=16)
    report_path = tmp_path / "l.json"
    assert main(["--restored", str(restored_dir), "--target", str(target_dir), "--report", str(report_path),
                 "--quiet", "--lpips-alexnet", str(weights), "--device", "cpu"]) == 0
    report = json.loads(report_path.read_text())
    assert set(report["mean"]) == {"psnr", "ssim", "mae", "lpips"}
    values = [row["lpips"] for row in report["per_image"]]
    assert all(value > 0 for value in values) and report["lpips_unavailable"] is None


def test_usage_errors_and_console_dispatch(folders, capsys):
    tmp_path, target_dir, restored_dir = folders
    assert main(["--restored", str(tmp_path / "nope"), "--target", str(target_dir), "--no-lpips"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: restored folder not found") and "Traceback" not in err
    assert main(["--restored", str(restored_dir), "--target", str(tmp_path / "nope"), "--no-lpips"]) == 2
    assert cli.main(["evaluate", "--restored", str(restored_dir), "--target", str(target_dir), "--no-lpips", "--quiet"]) == 0
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "DPDD" in capsys.readouterr().out


def test_images_below_the_ssim_window_are_scored_without_ssim(folders, capsys):
    tmp_path, target_dir, restored_dir = folders
    rng = np.random.default_rng(5)
    sharp = rng.random((5, 5, 3))
    write_image(target_dir / "tiny.png", sharp, bit_depth=16)
    write_image(restored_dir / "tiny.png", np.clip(sharp + 0.05, 0, 1), bit_depth=16)
    report_path = tmp_path / "tiny.json"
    code = main(["--restored", str(restored_dir), "--target", str(target_dir), "--report", str(report_path),
                 "--quiet", "--no-lpips"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Traceback" not in captured.err and "error" not in captured.err
    report = json.loads(report_path.read_text())
    rows = {row["name"]: row for row in report["per_image"]}
    assert rows["tiny"]["ssim"] is None
    expected = _direct(restored_dir, target_dir, "img1")
    tiny_psnr = psnr(read_image(restored_dir / "tiny.png").pixels, read_image(target_dir / "tiny.png").pixels)
    assert abs(rows["tiny"]["psnr"] - tiny_psnr) < 1e-9 and abs(rows["img1"]["ssim"] - expected["ssim"]) < 1e-9
    assert report["ssim_unavailable"] == ["tiny"] and report["ssim_count"] == 4 and report["count"] == 5
    others = [rows[f"img{index}"]["ssim"] for index in range(1, 5)]
    assert abs(report["mean"]["ssim"] - np.mean(others)) < 1e-9  # the mean over the images that have one
    assert abs(report["mean"]["psnr"] - np.mean([row["psnr"] for row in rows.values()])) < 1e-9


def test_a_5x5_pair_alone_scores_without_traceback(tmp_path, capsys):
    rng = np.random.default_rng(6)
    sharp = rng.random((5, 5, 3))
    write_image(tmp_path / "target" / "a.png", sharp)
    write_image(tmp_path / "restored" / "a.png", sharp)
    code = main(["--restored", str(tmp_path / "restored"), "--target", str(tmp_path / "target"), "--quiet",
                 "--no-lpips", "--report", str(tmp_path / "r.json")])
    captured = capsys.readouterr()
    assert code == 0 and "Traceback" not in captured.err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["mean"] == {"psnr": 100.0, "mae": 0.0} and report["per_image"][0]["ssim"] is None
    assert "-" in captured.out.splitlines()[-1]  # the table shows no SSIM


def test_an_unwritable_report_fails_before_scoring(folders, capsys, monkeypatch):
    tmp_path, target_dir, restored_dir = folders
    import pipelines.evaluate as evaluate

    def must_not_score(*args, **kwargs):
        raise AssertionError("scored before checking the report")

    monkeypatch.setattr(evaluate, "evaluate_folders", must_not_score)
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where the report's folder should be")
    code = main(["--restored", str(restored_dir), "--target", str(target_dir), "--quiet", "--no-lpips",
                 "--report", str(blocker / "reports" / "scores.json")])
    assert code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: cannot write the report {blocker / 'reports' / 'scores.json'} (")
    (tmp_path / "folder.json").mkdir()
    assert main(["--restored", str(restored_dir), "--target", str(target_dir), "--quiet", "--no-lpips",
                 "--report", str(tmp_path / "folder.json")]) == 2
    assert capsys.readouterr().err.strip() == f"error: --report {tmp_path / 'folder.json'} is a folder; give a file name"
