"""The default-model evaluation by kind of degradation (``tools/evaluate_default_model.py``).

A tiny corpus of synthetic photos (edges, texture, one photo with a smooth out-of-focus
background flagged ``bokeh``) and two tiny models stand in for the real corpus and weights: a
random-weight ``tiny`` network and an identity network (the same network with its last
convolution zeroed: the Swintormer adds its input to the output of that convolution). One run of
the tool on 96-px crops goes through the project's deblur and evaluate commands; the tests check
its sets, its figures and its report against independent computations.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from swintormer.core.image_io import read_image, write_image
from swintormer.core.metrics import psnr
from swintormer.models import Swintormer, SwintormerConfig
from tools.evaluate_default_model import (
    CLASSICAL,
    INPUT,
    KINDS,
    StepError,
    bokeh_texture_ratio,
    export_checkpoint,
    main,
    masked_psnr,
)

QUICK = ["--crop", "96", "--radii", "2", "4", "--sheet-tile", "64", "--quiet"]


def synthetic_photo(seed: int, height: int, width: int, bokeh: bool = False) -> np.ndarray:
    """A photo-like image: a shaded background, sharp-edged shapes and fine texture; with
    ``bokeh`` the background is smooth (strongly blurred) behind one sharp textured object."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width] / max(height, width)
    image = np.stack([0.3 + 0.4 * xs, 0.4 + 0.3 * ys, 0.5 - 0.2 * xs * ys], axis=2)
    for _ in range(6):
        colour = rng.uniform(0.05, 0.95, 3)
        top, left = rng.integers(0, height - 20), rng.integers(0, width - 20)
        h, w = rng.integers(10, height // 2), rng.integers(10, width // 2)
        if rng.uniform() < 0.5:
            image[top: top + h, left: left + w] = colour
        else:
            cv2.circle(image, (int(left), int(top)), int(min(h, w) // 2), colour.tolist(), -1)
    image += 0.08 * np.sin(xs * 90 + 3 * ys)[..., None] * rng.uniform(0.5, 1.0, 3)
    if bokeh:
        image = cv2.GaussianBlur(image, (0, 0), 6)
        object_mask = np.zeros((height, width), bool)
        object_mask[height // 3: 2 * height // 3, width // 3: 2 * width // 3] = True
        texture = 0.5 + 0.3 * np.sign(np.sin(xs * 200))[..., None] * np.array([1.0, 0.8, 0.6])
        image[object_mask] = texture[object_mask]
    image += rng.normal(0, 0.01, image.shape)
    return np.clip(image, 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    photos = [("train", "ridge", 150, 130, False), ("test", "edges", 128, 160, False),
              ("test", "texture", 120, 136, False), ("test", "flower", 128, 144, True)]
    files = []
    for index, (split, name, height, width, bokeh) in enumerate(photos):
        write_image(root / split / f"{name}.png", synthetic_photo(index, height, width, bokeh))
        files.append({"split": split, "path": f"{split}/{name}.png", "bokeh": bokeh})
    (root / "manifest.json").write_text(json.dumps({"files": files}))
    return root


def identity_state(model: Swintormer) -> dict[str, torch.Tensor]:
    """The model's weights with the last convolution zeroed (the last 4-D weight registered)."""
    state = model.state_dict()
    last_conv = [name for name, tensor in state.items() if tensor.ndim == 4][-1]
    state[last_conv] = torch.zeros_like(state[last_conv])
    return state


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    model = Swintormer(SwintormerConfig.preset("tiny", in_channels=3)).eval()
    model.save_pretrained(root / "random")
    identity = Swintormer(SwintormerConfig.preset("tiny", in_channels=3)).eval()
    identity.load_state_dict(identity_state(model))
    x = torch.rand(1, 3, 40, 56)
    with torch.no_grad():
        assert torch.allclose(identity(x), x, atol=1e-6)  # zeroing the last conv gives the identity
        assert not torch.allclose(model(x), x, atol=1e-3)
    identity.save_pretrained(root / "identity")
    return {"random": root / "random", "identity": root / "identity"}


@pytest.fixture(scope="module")
def run(corpus: Path, models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("evaluation")
    code = main(["--corpus", str(corpus), "--out", str(out), "--model", f"random={models['random']}",
                 "--model", f"identity={models['identity']}", *QUICK])
    assert code == 0
    return out, json.loads((out / "report.json").read_text())


def test_sets_are_deterministic_for_a_seed(corpus: Path, tmp_path: Path) -> None:
    folders = []
    for index, seed in enumerate((0, 0, 1)):
        out = tmp_path / f"sets{index}"
        assert main(["--corpus", str(corpus), "--out", str(out), "--seed", str(seed), "--sets-only", *QUICK]) == 0
        folders.append(out / "sets")
    files = sorted(p.relative_to(folders[0]) for p in folders[0].rglob("*") if p.is_file())
    assert {p.parts[0] for p in files} == {*KINDS, "bokeh"}
    # One radius per photo, in turn over the photos in name order.
    assert sorted(p.name for p in files if p.parts[:2] == ("defocus_uniform", "input")) == [
        "edges_r2.png", "flower_r4.png", "texture_r2.png"]
    for path in files:
        assert (folders[0] / path).read_bytes() == (folders[1] / path).read_bytes(), path
    changed = folders[2] / "motion" / "input" / "edges.png"
    assert changed.read_bytes() != (folders[0] / "motion" / "input" / "edges.png").read_bytes()
    # Only the test split is used, and the bokeh set is the flagged photo itself.
    assert not any("ridge" in p.name for p in files)
    assert [p.name for p in files if p.parts[0] == "bokeh"] == ["flower.png"]


def test_set_contents(run: tuple[Path, dict], corpus: Path) -> None:
    out, _ = run
    sets = out / "sets"
    for path in sorted((sets / "sharp_clean" / "target").iterdir()):
        assert path.read_bytes() == (sets / "sharp_clean" / "input" / path.name).read_bytes()
    for kind in ("sharp_noise", "defocus_uniform", "motion"):
        for path in sorted((sets / kind / "target").iterdir()):
            blurry, sharp = read_image(sets / kind / "input" / path.name).pixels, read_image(path).pixels
            assert blurry.shape == sharp.shape and 12 < psnr(blurry, sharp) < 60
    for kind in ("defocus_uniform", "motion"):
        kernels = sorted((sets / kind / "kernels").glob("*.safetensors"))
        assert len(kernels) == len(list((sets / kind / "input").iterdir()))
    photo = read_image(corpus / "test" / "edges.png").pixels
    target = read_image(sets / "sharp_clean" / "target" / "edges.png").pixels
    assert target.shape == (96, 96, 3)
    assert np.array_equal(target, photo[16:112, 32:128])  # the centre crop, unchanged
    flower = read_image(corpus / "test" / "flower.png").pixels
    assert np.array_equal(read_image(sets / "bokeh" / "input" / "flower.png").pixels, flower[16:112, 24:120])
    for path in sorted((sets / "defocus_varying" / "radius").glob("*.npy")):
        radius = np.load(path)
        assert radius.shape == (96, 96)
        assert np.mean(radius == 0) >= 0.1 and np.mean(radius >= 1.5) >= 0.1
        blurry = read_image(sets / "defocus_varying" / "input" / f"{path.stem}.png").pixels
        sharp = read_image(sets / "defocus_varying" / "target" / f"{path.stem}.png").pixels
        # Only noise in focus, blur beyond: the in-focus pixels are much closer to the target.
        assert masked_psnr(blurry, sharp, radius == 0) > masked_psnr(blurry, sharp, radius >= 1.5) + 3


def test_report_has_every_kind_method_and_field(run: tuple[Path, dict]) -> None:
    out, report = run
    assert set(report["scores"]) == set(KINDS)
    for kind, methods in report["scores"].items():
        expected = {INPUT, "random", "identity"} | (set(CLASSICAL) if kind in ("defocus_uniform", "motion") else set())
        assert set(methods) == expected
        for scores in methods.values():
            assert {"psnr", "ssim", "mae", "count", "gain_psnr", "gain_ssim", "per_image_psnr"} <= set(scores)
            assert scores["count"] == 3
    assert set(report["regions"]) == {INPUT, "random", "identity"}
    assert set(report["defocus_uniform_by_radius"][INPUT]) == {"2", "4"}
    assert set(report["bokeh"]) == {"random", "identity"} and set(report["bokeh"]["random"]) == {"flower"}
    assert set(report["sharp_clean_worst"]) == {"random", "identity"}
    assert report["meta"]["machine"]["cpu"] and report["meta"]["date_utc"] and report["meta"]["seconds_total"] > 0
    markdown = (out / "report.md").read_text()
    for text in (*KINDS, "in focus", "flower", "worst PSNR", "Richardson–Lucy"):
        assert text in markdown
    sheet = read_image(out / "contact_sheet.png").pixels
    assert sheet.shape[0] == 20 + 6 * 64 and sheet.shape[1] == 150 + 4 * 64  # 5 kinds + bokeh; blurry|2 models|sharp
    assert (out / "contact_sheet.png").stat().st_size < 1.5e6


def test_scores_match_an_independent_computation(run: tuple[Path, dict]) -> None:
    out, report = run
    for kind in KINDS:
        for method, folder in ((INPUT, out / "sets" / kind / "input"), ("random", out / "restored" / "random" / kind)):
            values = [psnr(read_image(folder / p.name).pixels, read_image(p).pixels)
                      for p in sorted((out / "sets" / kind / "target").iterdir())]
            assert report["scores"][kind][method]["psnr"] == pytest.approx(float(np.mean(values)), abs=1e-6)
    # Deconvolution with the true kernel (in linear light, as the blur) beats the blurry input.
    for kind in ("defocus_uniform", "motion"):
        assert report["scores"][kind]["richardson_lucy"]["gain_psnr"] > 1.0
        assert report["scores"][kind]["wiener"]["gain_psnr"] > 0.5


def test_identity_model_scores_the_blurry_input(run: tuple[Path, dict]) -> None:
    out, report = run
    for kind in KINDS:
        assert report["scores"][kind]["identity"]["psnr"] == report["scores"][kind][INPUT]["psnr"]
        assert report["scores"][kind]["identity"]["gain_psnr"] == (None if kind == "sharp_clean" else 0.0)
    assert report["regions"]["identity"]["in_focus_psnr"] == report["regions"][INPUT]["in_focus_psnr"]
    assert report["regions"]["identity"]["defocused_psnr"] == report["regions"][INPUT]["defocused_psnr"]
    assert report["bokeh"]["identity"]["flower"]["ratio"] == 1.0
    assert report["sharp_clean_worst"]["identity"]["psnr"] == 100.0  # identical images: the evaluator's cap
    worst = report["sharp_clean_worst"]["random"]
    assert worst["psnr"] == min(report["scores"]["sharp_clean"]["random"]["per_image_psnr"].values())
    assert worst["meets_target"] == (worst["psnr"] >= 38)


def test_masked_psnr_equals_a_hand_computation() -> None:
    target = np.zeros((2, 3, 3), np.float32)
    restored = target.copy()
    restored[0, 0] = 0.1  # inside the mask: 3 channels off by 0.1
    restored[1, 2] = 0.5  # outside the mask: ignored
    mask = np.array([[True, True, False], [False, False, False]])
    mse = (3 * 0.1**2) / (2 * 3)  # two pixels of three channels
    assert masked_psnr(restored, target, mask) == pytest.approx(10 * math.log10(1 / mse), abs=1e-5)
    assert masked_psnr(restored, target, ~mask & np.array([[0, 0, 1], [1, 0, 0]], bool)) == 100.0
    with pytest.raises(ValueError):
        masked_psnr(restored, target, np.zeros((2, 3), bool))


def test_bokeh_texture_ratio() -> None:
    photo = synthetic_photo(3, 128, 144, bokeh=True)
    assert bokeh_texture_ratio(photo, photo)["ratio"] == 1.0
    rng = np.random.default_rng(0)
    textured = np.clip(photo + rng.normal(0, 0.04, photo.shape), 0, 1).astype(np.float32)
    assert bokeh_texture_ratio(textured, photo)["ratio"] > 2
    smoothed = cv2.GaussianBlur(photo, (0, 0), 2)
    assert bokeh_texture_ratio(smoothed, photo)["ratio"] < 0.5


def test_checkpoint_export_uses_the_ema_weights(models: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import save_file

    run_dir = tmp_path / "run"
    (run_dir / "config.yaml").parent.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("model:\n  preset: tiny\n  in_channels: 3\n  overrides: {}\n")
    trained = Swintormer.from_pretrained(models["random"]).state_dict()
    ema = Swintormer.from_pretrained(models["identity"]).state_dict()
    for step in (100, 200):
        folder = run_dir / "checkpoints" / f"step_{step:08d}"
        folder.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in trained.items()}, str(folder / "model.safetensors"))
        save_file({k: (v if step == 200 else v + 1).contiguous() for k, v in ema.items()}, str(folder / "ema.safetensors"))
        (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
    # The training's average also holds the non-persistent buffers (derived tables): skipped.
    network = Swintormer.from_pretrained(models["identity"])
    derived = {name: buffer for name, buffer in network.named_buffers() if name not in ema}
    assert derived  # the tiny network has such tables
    save_file({**{k: v.contiguous() for k, v in ema.items()}, **{k: v.float().contiguous() for k, v in derived.items()}},
              str(folder / "ema.safetensors"))
    info = export_checkpoint(run_dir, tmp_path / "exported")
    assert info["step"] == 200 and info["checkpoint"] == "step_00000200"
    exported = Swintormer.from_pretrained(tmp_path / "exported").state_dict()
    assert all(torch.equal(exported[k], ema[k]) for k in ema)
    save_file({**{k: v.contiguous() for k, v in ema.items()}, "stranger.weight": torch.zeros(2)}, str(folder / "ema.safetensors"))
    with pytest.raises(StepError, match="stranger"):
        export_checkpoint(run_dir, tmp_path / "exported_again")


def test_benchmark_section_renders_the_report(run: tuple[Path, dict]) -> None:
    from tools.benchmark import render_default_by_kind

    _, report = run
    lines = render_default_by_kind({"command": "python tools/evaluate_default_model.py ...", "seconds": 12.0,
                                    "report": report}, "data/photos")
    text = "\n".join(lines)
    assert lines[0].startswith("## Default model by kind of degradation")
    assert all(kind in text for kind in KINDS) and "identity" in text
    assert "Left out" in "\n".join(render_default_by_kind(None, "data/photos"))
