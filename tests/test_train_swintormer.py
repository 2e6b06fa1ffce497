"""End-to-end tests of ``pipelines.train_swintormer`` on synthetic pairs (tiny network, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipelines.train_swintormer import main

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs/swintormer/cpu_tiny.yaml")
QUIET = ["train.logging.progress_bar=false"]

@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """12 training and 4 test pairs: 64×64 scikit-image photos under mild defocus (radius 1–2.5 px)."""
    out = tmp_path_factory.mktemp("synthetic")
    subprocess.run([sys.executable, str(REPO / "tools/make_synthetic_blur.py"), "--out", str(out), "--max-size", "64",
                    "--crop", "64", "--per-image", "2", "--blur", "defocus", "--seed", "0",
                    "--defocus-radius", "1", "2.5", "--noise", "0", "0.002", "--quiet"],
                   check=True, cwd=REPO)
    return out


def validation_lines(run: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run / "logs/metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "val/psnr" in line]


def test_small_cpu_config_beats_the_blurry_input(synthetic, tmp_path):
    run = tmp_path / "run"
    assert main(["--config", TINY, "--data", str(synthetic), "--output", str(run), *QUIET]) == 0
    last = validation_lines(run)[-1]
    assert last["step"] == 30
    assert last["val/psnr"] > last["val/input_psnr"] + 0.1, last  # measured: 24.67 vs 24.43 dB
    # the first four validation images, blurry | output | sharp side by side, the output's PSNR in the name
    images = sorted((run / "validation/step_00000030").iterdir())
    assert len(images) == 4 and all("_output_" in p.name and p.name.endswith("dB.png") for p in images)
    from swintormer.core.image_io import read_image

    for image in images:
        sharp = read_image(synthetic / "test/target" / f"{image.name.split('_output_')[0][3:]}.png").pixels
        height, width = sharp.shape[:2]  # under the 256 px crop: whole
        pixels = read_image(image).pixels
        assert pixels.shape == (height, 3 * width + 2 * 2, 3)
        np.testing.assert_allclose(pixels[:, 2 * width + 4:], sharp, atol=0.5 / 255)
    # the run folder: resolved config, final checkpoint, EMA model saved with save_pretrained
    assert (run / "config.yaml").is_file() and (run / "checkpoints/step_00000030/trainer_state.json").is_file()
    from swintormer.models import Swintormer

    exported = Swintormer.from_pretrained(run / "model").state_dict()
    ema = load_file(run / "checkpoints/step_00000030/ema.safetensors")
    trained = load_file(run / "checkpoints/step_00000030/model.safetensors")
    shared = [k for k in ema if k in exported]
    assert shared and all(torch.equal(exported[k], ema[k]) for k in shared)  # EMA weights exported
    assert any(not torch.equal(trained[k], ema[k]) for k in shared if k in trained)


def test_pipeline_resume_is_exact(synthetic, tmp_path):
    common = ["--config", TINY, "--data", str(synthetic), *QUIET, "train.batch_size=2", "train.logging.every_steps=1",
              "validation.max_images=1"]
    assert main([*common, "--output", str(tmp_path / "straight"), "--max-steps", "2"]) == 0
    assert main([*common, "--output", str(tmp_path / "split"), "--max-steps", "2", "--stop-after-steps", "1"]) == 0
    assert main([*common, "--output", str(tmp_path / "split"), "--max-steps", "2", "--resume", "latest"]) == 0
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        a = load_file(tmp_path / "straight/checkpoints/step_00000002" / name)
        b = load_file(tmp_path / "split/checkpoints/step_00000002" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    first = load_file(tmp_path / "split/checkpoints/step_00000001/model.safetensors")
    second = load_file(tmp_path / "split/checkpoints/step_00000002/model.safetensors")
    assert any(not torch.equal(first[k], second[k]) for k in first)  # the resumed step did train


def test_prior_from_files_trains_six_channel_model(synthetic, tmp_path):
    from swintormer.core.image_io import read_image
    from swintormer.core.priors import save_prior_safetensors

    priors = tmp_path / "priors"
    for blurry in sorted(synthetic.glob("*/inputC/*.png")):  # a stand-in prior: the sharp image, darkened
        sharp = read_image(blurry.parent.parent / "target" / blurry.name).pixels
        save_prior_safetensors(priors / blurry.relative_to(synthetic).with_suffix(".safetensors"), 0.9 * sharp)
    run = tmp_path / "run"
    code = main(["--config", TINY, "--data", str(synthetic), "--output", str(run), "--max-steps", "2", *QUIET,
                 "model.in_channels=6", "data.prior.source=folder", f"data.prior.path={priors}",
                 "validation.max_images=1", "validation.mode=sliding", "validation.tile=32", "validation.stride=16",
                 "train.validate_every_steps=1", "train.logging.tensorboard=true"])
    assert code == 0
    # validation with the sliding-window inferencer after step 1, and training went on after it
    assert [line["step"] for line in validation_lines(run)] == [1, 2]
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "logs/tensorboard").iterdir())
    # the 6-channel network's validation images show the prior it saw: blurry | prior | output | sharp
    from swintormer.core.image_io import read_image

    for step in (1, 2):
        [image] = (run / f"validation/step_0000000{step}").iterdir()
        pixels = read_image(image).pixels
        sharp = read_image(synthetic / "test/target" / f"{image.name.split('_output_')[0][3:]}.png").pixels
        height, width = sharp.shape[:2]
        assert pixels.shape == (height, 4 * width + 3 * 2, 3)
        np.testing.assert_allclose(pixels[:, width + 2: 2 * width + 2], 0.9 * sharp, atol=1 / 255)  # the stand-in prior
        np.testing.assert_allclose(pixels[:, 3 * width + 6:], sharp, atol=0.5 / 255)
    assert json.loads((run / "model/config.json").read_text())["in_channels"] == 6
    weights = load_file(run / "checkpoints/step_00000002/model.safetensors")
    assert any(t.ndim == 4 and t.shape[1] == 24 for t in weights.values())  # 6 channels pixel-unshuffled


def test_init_from_starts_a_new_schedule_from_a_saved_model(synthetic, tmp_path, capsys):
    common = ["--config", TINY, "--data", str(synthetic), *QUIET, "train.batch_size=2", "validation.max_images=1",
              "train.ema.enabled=false"]  # the exported model is then the trained weights, not their average
    assert main([*common, "--output", str(tmp_path / "first"), "--max-steps", "2"]) == 0
    first = tmp_path / "first/model"
    from swintormer.models import Swintormer

    saved = Swintormer.from_pretrained(first).state_dict()
    # one step at a vanishing rate: with init_from the model is the saved one, without it a fresh init
    still = [*common, "--max-steps", "1", "train.optimizer.lr=1e-30", "train.optimizer.weight_decay=0"]
    assert main([*still, "--output", str(tmp_path / "same"), f"model.init_from={first}"]) == 0
    assert main([*still, "--output", str(tmp_path / "fresh")]) == 0
    again = Swintormer.from_pretrained(tmp_path / "same/model").state_dict()
    fresh = Swintormer.from_pretrained(tmp_path / "fresh/model").state_dict()
    assert all(torch.allclose(again[k], saved[k], atol=1e-6) for k in saved)
    assert any(not torch.allclose(fresh[k], saved[k], atol=1e-3) for k in saved)
    # a folder of another architecture, or no model at all: a one-line error naming it, nothing trained
    assert main([*common, "--output", str(tmp_path / "other"), f"model.init_from={first}", "model.overrides.dim=12"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model.init_from:") and "dim" in err and err.count("\n") == 1
    assert main([*common, "--output", str(tmp_path / "other"), f"model.init_from={tmp_path / 'absent'}"]) == 2
    assert "absent" in capsys.readouterr().err
    assert not (tmp_path / "other/checkpoints").exists()


def test_validation_crops_of_photos_degraded_on_the_fly_do_not_depend_on_the_training_seed(tmp_path):
    from skimage import data as photos

    from swintormer.core.image_io import write_image

    for split, images in (("train", [photos.astronaut(), photos.coffee()]), ("test", [photos.chelsea()])):
        for index, image in enumerate(images):
            write_image(tmp_path / "photos" / split / f"p{index}.png", image[:96, :96].astype(np.float32) / 255)

    def input_psnr(name: str, *overrides: str) -> float:
        assert main(["--config", TINY, "--data", str(tmp_path / "photos"), "--output", str(tmp_path / name),
                     "--max-steps", "1", *QUIET, "train.batch_size=2", "data.degradation={}",
                     "data.validation_crop=64", *overrides]) == 0
        return validation_lines(tmp_path / name)[-1]["val/input_psnr"]

    first = input_psnr("seed0")
    assert input_psnr("seed1", "train.seed=1") == first  # the same degraded crops
    assert input_psnr("other", "data.validation_seed=1") != first


def test_user_errors_exit_2_before_training(synthetic, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["--config", TINY, "--data", str(synthetic), "--output", str(run), "train.optimizer.lrr=1"]) == 2
    assert "unknown key 'train.optimizer.lrr'" in capsys.readouterr().err
    missing = tmp_path / "weights/mae_pretrain_vit_base.pth"
    assert main(["--config", TINY, "--data", str(synthetic), "--output", str(run),
                 f"loss.mae={{weights_path: {missing}, local_weight: 0.1}}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(missing) in err
    assert main(["--config", TINY, "--data", str(synthetic), "--output", str(run), "model.in_channels=6"]) == 2
    assert "data.prior.source" in capsys.readouterr().err
    assert main(["--config", TINY, "--data", str(tmp_path / "absent"), "--output", str(run)]) == 2
    assert "absent" in capsys.readouterr().err
    assert not (run / "checkpoints").exists()


def test_two_processes_see_different_data_and_only_main_writes(synthetic, tmp_path, accelerate_launch):
    """Two CPU processes (gloo) launched as users do (see the ``accelerate_launch`` fixture)."""
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [*accelerate_launch(2), "-m", "pipelines.train_swintormer", "--config", TINY, "--data", str(synthetic), "--output", str(run),
               "--max-steps", "2", *QUIET, "train.batch_size=2", "data.repeat=1", "train.logging.every_steps=1",
               "debug.log_sample_names=true", "validation.max_images=1"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = [(run / f"debug/samples_rank{rank}.txt").read_text().split() for rank in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 4  # 2 steps × batch 2 on each process
    assert not set(seen[0]) & set(seen[1])  # within one epoch the processes' samples are disjoint
    state = json.loads((run / "checkpoints/step_00000002/trainer_state.json").read_text())
    assert state["num_processes"] == 2 and set(state["rng"]) == {"0", "1"}
    rng = load_file(run / "checkpoints/step_00000002/rng.safetensors")
    assert not torch.equal(rng["rank0.torch"], rng["rank1.torch"])  # both processes' RNG kept, by the main one
    steps = [json.loads(line)["step"] for line in (run / "logs/metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2]  # one writer: no duplicated log lines
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002"]
    assert (run / "model/model.safetensors").is_file() and (run / "config.yaml").is_file()
