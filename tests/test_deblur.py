"""Tests of ``swintormer deblur`` (``pipelines/deblur.py``)."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import deblur
from swintormer.core.image_io import quantize, read_image, write_image
from swintormer.inference import SlidingWindowInferencer
from swintormer.models import Swintormer, SwintormerConfig
from swintormer.models.cpu_inference import prepare_for_inference

REPO_ROOT = Path(__file__).resolve().parents[1]
TILE = 128  # the tiny preset pads to multiples of 128: smaller windows would only cost more


@pytest.fixture(scope="module")
def prior_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("models") / "tiny6"
    Swintormer(SwintormerConfig.preset("tiny", in_channels=6)).save_pretrained(directory)
    return directory


def random_pixels(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((height, width, 3), dtype=np.float32)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = deblur.main([*argv, "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def expected_output(model_dir: Path, path: Path, bit_depth: int, stride: int | None = None) -> np.ndarray:
    """What the command must write: the inferencer's result on the read image, quantised."""
    model = Swintormer.from_pretrained(model_dir)
    inferencer = SlidingWindowInferencer(model, tile=TILE, stride=stride, progress=False)
    return quantize(inferencer(read_image(path).pixels), bit_depth)


def read_samples(path: Path) -> np.ndarray:
    samples = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    return cv2.cvtColor(samples, cv2.COLOR_BGR2RGB)


# ---------------------------------------------------------------------------------------------
# Results


def test_outputs_keep_name_and_bit_depth_and_hold_the_tiled_result(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = tmp_path / "blurry"
    write_image(inputs / "deep.png", random_pixels(90, 150, 1), bit_depth=16)
    cv2.imwrite(str(inputs / "photo.jpg"), (random_pixels(60, 70, 2) * 255).astype(np.uint8))
    before = {path.name: digest(path) for path in inputs.iterdir()}

    code, out, err = run([str(inputs), "--output", str(tmp_path / "out"), "--model", str(model_dir),
                          "--tile", str(TILE), "--stride", "100"], capsys)

    assert code == 0, err
    assert "wrote 2 of 2" in out
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["deep.png", "photo.jpg"]
    deep = read_samples(tmp_path / "out" / "deep.png")
    assert deep.dtype == np.uint16 and deep.shape == (90, 150, 3)
    np.testing.assert_array_equal(deep, expected_output(model_dir, inputs / "deep.png", 16, stride=100))
    # JPEG in, JPEG out: the expected pixels encoded by Pillow at quality 95 with the input's
    # 4:2:0 subsampling (OpenCV's default) decode to exactly what the command wrote.
    with Image.open(tmp_path / "out" / "photo.jpg") as written:
        assert written.format == "JPEG" and written.mode == "RGB" and written.size == (70, 60)
        photo = np.asarray(written)
    buffer = io.BytesIO()
    Image.fromarray(expected_output(model_dir, inputs / "photo.jpg", 8, stride=100)).save(
        buffer, "JPEG", quality=95, subsampling=2)
    np.testing.assert_array_equal(photo, np.asarray(Image.open(buffer)))
    assert {path.name: digest(path) for path in inputs.iterdir()} == before  # inputs untouched


def test_whole_runs_each_image_in_one_forward(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "in" / "wide.png"
    write_image(source, random_pixels(70, 300, 4), bit_depth=16)

    code, _, err = run([str(source), "--output", str(tmp_path / "out"), "--model", str(model_dir), "--whole"], capsys)

    assert code == 0, err
    # The command runs the CPU engine's modules; so does the direct forward it is held to.
    model = prepare_for_inference(Swintormer.from_pretrained(model_dir).eval())
    with torch.no_grad():
        direct = model(torch.from_numpy(read_image(source).pixels).permute(2, 0, 1)[None])[0].permute(1, 2, 0)
    np.testing.assert_array_equal(read_samples(tmp_path / "out" / "wide.png"), quantize(direct.numpy(), 16))


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_a_six_channel_model_gets_the_prior_from_the_prior_model(
    prior_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], spacing: str
) -> None:
    pytest.importorskip("ldm_prior.sampling")
    from ldm_prior.model import PriorModel
    from ldm_prior.cache import file_sha256, storage_precision
    from ldm_prior.sampling import PriorSampler, SamplingSettings, image_seed

    PriorModel.from_config("tiny", seed=0).save_pretrained(tmp_path / "prior")
    source = tmp_path / "in" / "scene.png"
    write_image(source, random_pixels(40, 56, 3))

    code, _, err = run([str(source), "--output", str(tmp_path / "out"), "--model", str(prior_model_dir),
                        "--tile", str(TILE), "--prior-model", str(tmp_path / "prior"), "--prior-steps", "2",
                        "--prior-seed", "7", "--prior-timestep-spacing", spacing], capsys)
    assert code == 0, err

    pixels = read_image(source).pixels
    sampler = PriorSampler(PriorModel.from_pretrained(tmp_path / "prior"), SamplingSettings(steps=2, timestep_spacing=spacing))
    # Seeded from the file's bytes and rounded as a cache entry is, as the prior cache does.
    prior = storage_precision(sampler.sample(pixels, seed=image_seed(7, file_sha256(source))))
    model = Swintormer.from_pretrained(prior_model_dir)
    restored = SlidingWindowInferencer(model, tile=TILE, progress=False)(np.concatenate([pixels, prior], axis=2))
    np.testing.assert_array_equal(read_samples(tmp_path / "out" / "scene.png"), quantize(restored, 8))


def make_prior_cache(cache: Path, data_root: Path, priors: dict[Path, np.ndarray]) -> None:
    from ldm_prior.cache import CacheSettings, PriorCacheWriter, file_sha256, prepare_cache
    from ldm_prior.sampling import SamplingSettings

    settings = CacheSettings(prior_fingerprint="test-prior", sampling=SamplingSettings().as_metadata(), seed=0)
    prepare_cache(cache, settings, data_root)
    writer = PriorCacheWriter(cache, data_root, settings)
    for image, prior in priors.items():
        writer.write(image, prior, file_sha256(image), image_seed=0)


def test_priors_from_a_prior_cache_are_used_and_a_stale_entry_is_reported(
    prior_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    fresh, stale = data / "fresh.png", data / "stale.png"
    write_image(fresh, random_pixels(48, 64, 20))
    write_image(stale, random_pixels(48, 64, 21))
    prior = random_pixels(48, 64, 22)
    make_prior_cache(tmp_path / "cache", data, {fresh: prior, stale: prior})
    write_image(stale, random_pixels(48, 64, 23))  # the image changed after its prior was cached

    code, _, err = run([str(data), "--output", str(tmp_path / "out"), "--model", str(prior_model_dir),
                        "--tile", str(TILE), "--prior-cache", str(tmp_path / "cache")], capsys)

    assert code == 1
    [line] = error_lines(err)
    assert "stale entry" in line and str(stale) in line
    cached_prior = prior.astype(np.float16).astype(np.float32)  # entries hold float16
    model = Swintormer.from_pretrained(prior_model_dir)
    restored = SlidingWindowInferencer(model, tile=TILE, progress=False)(
        np.concatenate([read_image(fresh).pixels, cached_prior], axis=2)
    )
    np.testing.assert_array_equal(read_samples(tmp_path / "out" / "fresh.png"), quantize(restored, 8))
    assert not (tmp_path / "out" / "stale.png").exists()


def test_a_folder_that_is_not_a_prior_cache_is_refused(
    prior_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_image(tmp_path / "in.png", random_pixels(20, 20, 24))
    (tmp_path / "not_a_cache").mkdir()
    code, _, err = run([str(tmp_path / "in.png"), "--output", str(tmp_path / "out"), "--model", str(prior_model_dir),
                        "--prior-cache", str(tmp_path / "not_a_cache")], capsys)
    assert code == 2
    [line] = error_lines(err)
    assert "no cache manifest" in line and str(tmp_path / "not_a_cache") in line


def test_priors_from_a_prior_folder(prior_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from swintormer.core.priors import save_prior_safetensors

    source = tmp_path / "in" / "view.png"
    write_image(source, random_pixels(30, 140, 25))
    write_image(tmp_path / "in" / "no_prior.png", random_pixels(30, 40, 26))
    prior = random_pixels(30, 140, 27)
    save_prior_safetensors(tmp_path / "priors" / "view.safetensors", prior)

    code, _, err = run([str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model", str(prior_model_dir),
                        "--tile", str(TILE), "--prior-folder", str(tmp_path / "priors")], capsys)

    assert code == 1
    [line] = error_lines(err)
    assert str(tmp_path / "in" / "no_prior.png") in line and "no prior file" in line
    model = Swintormer.from_pretrained(prior_model_dir)
    restored = SlidingWindowInferencer(model, tile=TILE, progress=False)(
        np.concatenate([read_image(source).pixels, prior], axis=2)
    )
    np.testing.assert_array_equal(read_samples(tmp_path / "out" / "view.png"), quantize(restored, 8))


# ---------------------------------------------------------------------------------------------
# Bad inputs: one clear line each, the other images still processed, exit code 1


def test_bad_inputs_are_reported_and_the_rest_is_processed(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "mixed"
    write_image(folder / "good.png", random_pixels(50, 60, 4))
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # PNG signature, no image
    empty_folder = tmp_path / "nothing_here"
    empty_folder.mkdir()
    (empty_folder / "notes.txt").write_text("not an image")
    missing = tmp_path / "missing.png"

    code, _, err = run([str(missing), str(folder), str(empty_folder), "--output", str(tmp_path / "out"),
                        "--model", str(model_dir), "--tile", str(TILE)], capsys)

    assert code == 1
    assert (tmp_path / "out" / "good.png").is_file()
    assert not (tmp_path / "out" / "corrupt.png").exists()
    errors = error_lines(err)
    assert len(errors) == 3, err
    assert any(str(missing) in line and "no such file" in line for line in errors)
    assert any(str(folder / "corrupt.png") in line and "corrupt" in line for line in errors)
    assert any(str(empty_folder) in line and "no images" in line for line in errors)
    assert "Traceback" not in err


def test_two_inputs_with_the_same_name_do_not_overwrite_each_other(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_image(tmp_path / "a" / "same.png", random_pixels(30, 30, 5))
    write_image(tmp_path / "b" / "same.png", random_pixels(30, 30, 6))
    code, _, err = run([str(tmp_path / "a" / "same.png"), str(tmp_path / "b" / "same.png"), "--output",
                        str(tmp_path / "out"), "--model", str(model_dir), "--tile", str(TILE)], capsys)
    assert code == 1
    [line] = error_lines(err)
    assert str(tmp_path / "b" / "same.png") in line and "already the output of" in line
    np.testing.assert_array_equal(
        read_samples(tmp_path / "out" / "same.png"), expected_output(model_dir, tmp_path / "a" / "same.png", 8)
    )


# ---------------------------------------------------------------------------------------------
# Inputs are never overwritten


def test_output_folder_equal_to_an_input_folder_is_refused(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_image(tmp_path / "photos" / "x.png", random_pixels(20, 20, 7))
    before = digest(tmp_path / "photos" / "x.png")
    code, _, err = run([str(tmp_path / "photos"), "--output", str(tmp_path / "photos" / "."),
                        "--model", str(model_dir)], capsys)
    assert code == 2
    [line] = error_lines(err)
    assert "is an input folder" in line
    assert digest(tmp_path / "photos" / "x.png") == before


def test_an_output_that_would_overwrite_an_input_file_is_refused(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "x.png"
    write_image(source, random_pixels(20, 20, 8))
    other = tmp_path / "y.jpg"
    cv2.imwrite(str(other), (random_pixels(20, 20, 9) * 255).astype(np.uint8))
    before = digest(source)
    code, _, err = run([str(source), str(other), "--output", str(tmp_path), "--model", str(model_dir),
                        "--tile", str(TILE), "--format", "png"], capsys)
    assert code == 1
    [line] = error_lines(err)
    assert str(source) in line and "would overwrite an input" in line
    assert digest(source) == before
    assert (tmp_path / "y.png").is_file()  # y.jpg → y.png (--format png) overwrites nothing


# ---------------------------------------------------------------------------------------------
# Problems that stop the run: exit code 2, one line, nothing written


def test_output_folder_not_writable(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_image(tmp_path / "in.png", random_pixels(20, 20, 10))
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where the output folder should go")
    code, _, err = run([str(tmp_path / "in.png"), "--output", str(blocker / "out"), "--model", str(model_dir)],
                       capsys)
    assert code == 2
    [line] = error_lines(err)
    assert f"output folder {blocker / 'out'} is not writable" in line


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores folder permissions")
def test_output_folder_without_write_permission(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_image(tmp_path / "in.png", random_pixels(20, 20, 11))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, _, err = run([str(tmp_path / "in.png"), "--output", str(locked), "--model", str(model_dir)], capsys)
    finally:
        locked.chmod(0o700)
    assert code == 2
    assert f"output folder {locked} is not writable" in error_lines(err)[0]


def test_model_folder_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_image(tmp_path / "in.png", random_pixels(20, 20, 12))
    code, _, err = run([str(tmp_path / "in.png"), "--output", str(tmp_path / "out"),
                        "--model", str(tmp_path / "no_model")], capsys)
    assert code == 2
    [line] = error_lines(err)
    assert f"model folder not found: {tmp_path / 'no_model'}" in line
    assert not (tmp_path / "out").exists()


def test_default_model_missing_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # As on an installation whose package data lacks the weights.
    monkeypatch.setattr(deblur, "DEFAULT_MODEL_DIR", tmp_path / "weights" / "default")
    write_image(tmp_path / "in.png", random_pixels(20, 20, 13))
    code, _, err = run([str(tmp_path / "in.png"), "--output", str(tmp_path / "out")], capsys)
    assert code == 2
    [line] = error_lines(err)
    assert "shipped default model is not installed" in line


@pytest.mark.parametrize("removed", ["model.safetensors", "config.json"])
def test_model_folder_incomplete(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], removed: str
) -> None:
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("config.json", "model.safetensors"):
        if name != removed:
            (partial / name).write_bytes((model_dir / name).read_bytes())
    write_image(tmp_path / "in.png", random_pixels(20, 20, 14))
    code, _, err = run([str(tmp_path / "in.png"), "--output", str(tmp_path / "out"), "--model", str(partial)],
                       capsys)
    assert code == 2
    [line] = error_lines(err)
    assert "incomplete" in line and removed in line


def test_damaged_model_weights(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    (damaged / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes()[:500])
    write_image(tmp_path / "in.png", random_pixels(20, 20, 15))
    code, _, err = run([str(tmp_path / "in.png"), "--output", str(tmp_path / "out"), "--model", str(damaged)],
                       capsys)
    assert code == 2
    [line] = error_lines(err)
    assert str(damaged / "model.safetensors") in line


def test_prior_model_without_a_prior_source_and_the_reverse(
    model_dir: Path, prior_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_image(tmp_path / "in.png", random_pixels(20, 20, 16))
    code, _, err = run([str(tmp_path / "in.png"), "--output", str(tmp_path / "out"),
                        "--model", str(prior_model_dir)], capsys)
    assert code == 2
    [line] = error_lines(err)
    assert "needs a prior" in line and "--prior-cache" in line

    code, _, err = run([str(tmp_path / "in.png"), "--output", str(tmp_path / "out"), "--model", str(model_dir),
                        "--prior-model", str(tmp_path / "prior")], capsys)
    assert code == 2
    [line] = error_lines(err)
    assert "takes no prior" in line


def test_prior_model_folder_missing(prior_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_image(tmp_path / "in.png", random_pixels(20, 20, 17))
    code, _, err = run([str(tmp_path / "in.png"), "--output", str(tmp_path / "out"), "--model",
                        str(prior_model_dir), "--prior-model", str(tmp_path / "no_prior")], capsys)
    assert code == 2
    [line] = error_lines(err)
    assert str(tmp_path / "no_prior") in line


def test_stride_larger_than_tile_is_refused(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run([str(tmp_path), "--output", str(tmp_path / "out"), "--model", str(model_dir),
                        "--tile", "64", "--stride", "65"], capsys)
    assert code == 2
    assert "--stride 65 is larger than --tile 64" in error_lines(err)[0]


def test_command_line_error_has_no_traceback(tmp_path: Path) -> None:
    """Through a real process: ``python -m pipelines.deblur`` exits 2 with one line for a user error."""
    finished = subprocess.run(
        [sys.executable, "-m", "pipelines.deblur", str(tmp_path / "x.png"), "--output", str(tmp_path / "out"),
         "--model", str(tmp_path / "missing_model")],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
    )
    assert finished.returncode == 2
    assert finished.stderr.strip() == f"error: model folder not found: {tmp_path / 'missing_model'}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_unavailable_device_is_refused(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_image(tmp_path / "in.png", random_pixels(20, 20, 30))
    code, _, err = run([str(tmp_path / "in.png"), "--output", str(tmp_path / "out"), "--model", str(model_dir),
                        "--device", "cuda"], capsys)
    assert code == 2
    assert "CUDA is not available" in error_lines(err)[0]


def test_the_swintormer_command_dispatches_to_deblur(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipelines import cli

    write_image(tmp_path / "in" / "a.png", random_pixels(24, 36, 31))
    code = cli.main(["deblur", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model", str(model_dir),
                     "--tile", str(TILE), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    np.testing.assert_array_equal(
        read_samples(tmp_path / "out" / "a.png"), expected_output(model_dir, tmp_path / "in" / "a.png", 8)
    )


@pytest.mark.slow
def test_two_processes_share_the_images_and_match_one_process(
    model_dir: Path, tmp_path: Path, accelerate_launch
) -> None:
    """``accelerate launch`` with two CPU processes: each image done once, same bytes as one process."""
    for index in range(3):
        write_image(tmp_path / "in" / f"img{index}.png", random_pixels(30, 40, 40 + index))
    launch = [*accelerate_launch(2), "-m", "pipelines.deblur",
              str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model", str(model_dir), "--tile", str(TILE),
              "--no-progress"]
    finished = subprocess.run(launch, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "process 0/2: wrote 2 of 2" in finished.stdout and "process 1/2: wrote 1 of 1" in finished.stdout
    for index in range(3):
        source = tmp_path / "in" / f"img{index}.png"
        np.testing.assert_array_equal(read_samples(tmp_path / "out" / f"img{index}.png"),
                                      expected_output(model_dir, source, 8))
