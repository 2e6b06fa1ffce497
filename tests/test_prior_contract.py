"""The prior a stage-two model was trained with, from the cache to the deblur command.

One cache per dataset root (every split), a check of every training and validation entry
before the first step, the prior contract in the saved model's ``pipeline.json``, and
``swintormer deblur`` holding caches and stage-one models to it, with a prior sampled at deblur
time equal to the cached one bit for bit.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ldm_prior.cache import PriorCache, entry_path
from ldm_prior.model import PriorModel
from ldm_prior.prior_source import SampledPriors
from pipelines.cache_priors import main as cache_priors
from pipelines.deblur import main as deblur
from pipelines.train_swintormer import main as train_swintormer
from swintormer.core.image_io import read_image
from swintormer.core.priors import PriorContract
from swintormer.pipeline import DeblurPipeline

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs/swintormer/cpu_tiny.yaml")
CACHE_ARGS = ["--mode", "quarter", "--seed", "3"]
SIX_CHANNELS = ["model.in_channels=6", "data.prior.source=cache", "train.logging.progress_bar=false",
                "validation.max_images=1"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict[str, Path]:
    """A synthetic dataset root (train/ and test/ splits), a tiny stage-one model and its
    2-step cache of the whole root, built as a user does."""
    root = tmp_path_factory.mktemp("contract")
    data = root / "data"
    subprocess.run([sys.executable, str(REPO / "tools/make_synthetic_blur.py"), "--out", str(data), "--max-size", "48",
                    "--crop", "48", "--per-image", "1", "--blur", "defocus", "--seed", "0", "--quiet"],
                   check=True, cwd=REPO)
    PriorModel.from_config("tiny", seed=1).save_pretrained(root / "prior")
    threads = torch.get_num_threads()
    try:
        assert cache_priors(["--prior", str(root / "prior"), "--data", str(data), "--out", str(root / "cache"),
                             "--steps", "2", *CACHE_ARGS]) == 0
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "data": data, "prior": root / "prior", "cache": root / "cache"}


def blurry_images(data: Path, split: str) -> list[Path]:
    return sorted((data / split / "inputC").glob("*.png"))


def test_one_cache_holds_every_split_of_the_dataset_root(dataset) -> None:
    cache = PriorCache(dataset["cache"])
    for split in ("train", "test"):
        images = blurry_images(dataset["data"], split)
        assert images
        for image in images:
            assert cache.entry_for(image) == entry_path(dataset["cache"], f"{split}/inputC/{image.name}")
            assert cache.entry_problem(image) is None
            assert cache.prior_for(image).shape == read_image(image).pixels.shape


def test_stage_two_records_the_prior_contract_in_the_saved_model(dataset, tmp_path) -> None:
    run = tmp_path / "run"
    code = train_swintormer(["--config", TINY, "--data", str(dataset["data"]), "--output", str(run),
                             "--max-steps", "2", *SIX_CHANNELS, f"data.prior.path={dataset['cache']}",
                             "data.prior.expected.steps=2"])  # natural types on the command line
    assert code == 0
    contract = PriorCache(dataset["cache"]).contract()
    assert contract.steps == 2 and contract.mode == "quarter" and contract.seed == 3
    assert contract.prior_fingerprint == PriorModel.from_pretrained(dataset["prior"]).fingerprint()
    saved = json.loads((run / "model/pipeline.json").read_text())
    assert PriorContract.model_validate(saved["prior_contract"]) == contract
    assert DeblurPipeline.from_pretrained(run / "model").prior_contract == contract
    # The run's config records the settings it held the cache to, filled from the cache.
    recorded = yaml.safe_load((run / "config.yaml").read_text())["data"]["prior"]["expected"]
    assert PriorContract.model_validate(recorded) == contract


def test_stage_two_stops_before_the_first_step_naming_an_image_without_a_prior(dataset, tmp_path, capsys) -> None:
    partial = tmp_path / "cache"
    shutil.copytree(dataset["cache"], partial)
    missing = blurry_images(dataset["data"], "test")[-1]
    entry_path(partial, f"test/inputC/{missing.name}").unlink()
    run = tmp_path / "run"
    code = train_swintormer(["--config", TINY, "--data", str(dataset["data"]), "--output", str(run),
                             "--max-steps", "2", *SIX_CHANNELS, f"data.prior.path={partial}"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: validation data: ") and f"{missing.name}.safetensors: missing" in err
    assert len(err.strip().splitlines()) == 1
    assert not (run / "checkpoints").exists()


def test_stage_two_refuses_a_cache_made_with_other_settings(dataset, tmp_path, capsys) -> None:
    code = train_swintormer(["--config", TINY, "--data", str(dataset["data"]), "--output", str(tmp_path / "run"),
                             *SIX_CHANNELS, f"data.prior.path={dataset['cache']}", "data.prior.expected.steps=50"])
    assert code == 2
    err = capsys.readouterr().err
    assert "steps is '2', expected '50'" in err
    # A value of the wrong type is blamed on the override that set it, not on the config file.
    code = train_swintormer(["--config", TINY, "--data", str(dataset["data"]), "--output", str(tmp_path / "run"),
                             *SIX_CHANNELS, f"data.prior.path={dataset['cache']}", "data.prior.expected.steps=many"])
    assert code == 2
    err = capsys.readouterr().err
    assert "command-line override data.prior.expected.steps" in err and "cpu_tiny.yaml" not in err


@pytest.fixture(scope="module")
def model_with_contract(dataset, tmp_path_factory) -> Path:
    """A 6-channel tiny model folder whose pipeline.json records the dataset cache's contract."""
    from swintormer.models import Swintormer, SwintormerConfig

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model") / "six"
    model = Swintormer(SwintormerConfig.preset("tiny", in_channels=6))
    DeblurPipeline(model, settings=None, prior_contract=PriorCache(dataset["cache"]).contract()).save_pretrained(folder)
    return folder


def deblur_one(image: Path, model: Path, out: Path, *options: str) -> int:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the cache job samples (results depend on the thread count at the last bit)
    try:
        return deblur([str(image), "--output", str(out), "--model", str(model), "--tile", "32", "--no-progress",
                       *options])
    finally:
        torch.set_num_threads(threads)


def test_deblur_refuses_a_cache_made_with_other_steps_and_accepts_the_matching_one(
        dataset, model_with_contract, tmp_path, capsys) -> None:
    other = tmp_path / "cache5"
    assert cache_priors(["--prior", str(dataset["prior"]), "--data", str(dataset["data"]), "--out", str(other),
                         "--steps", "5", *CACHE_ARGS]) == 0
    image = blurry_images(dataset["data"], "test")[0]
    capsys.readouterr()

    assert deblur_one(image, model_with_contract, tmp_path / "refused", "--prior-cache", str(other)) == 2
    err = capsys.readouterr().err
    assert "steps is '5', expected '2'" in err and "--allow-prior-mismatch" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "refused").exists()

    assert deblur_one(image, model_with_contract, tmp_path / "matching", "--prior-cache", str(dataset["cache"])) == 0
    assert (tmp_path / "matching" / image.name).is_file()
    assert deblur_one(image, model_with_contract, tmp_path / "forced", "--prior-cache", str(other),
                      "--allow-prior-mismatch") == 0
    assert not np.array_equal(read_image(tmp_path / "forced" / image.name).pixels,
                              read_image(tmp_path / "matching" / image.name).pixels)
    # Sampling with other settings than the contract is refused the same way.
    assert deblur_one(image, model_with_contract, tmp_path / "refused", "--prior-model", str(dataset["prior"]),
                      "--prior-steps", "5") == 2
    assert "steps is '5', expected '2'" in capsys.readouterr().err


def test_a_prior_sampled_at_deblur_time_equals_the_cached_one_bit_for_bit(
        dataset, model_with_contract, tmp_path) -> None:
    cache = PriorCache(dataset["cache"])
    model = PriorModel.from_pretrained(dataset["prior"])
    # Copied elsewhere: the seed follows the file's bytes, not where it lies.
    image = tmp_path / "elsewhere" / "photo.png"
    image.parent.mkdir()
    source = blurry_images(dataset["data"], "test")[0]
    shutil.copy(source, image)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sampled = SampledPriors.from_contract(model, cache.contract()).prior_for(image)
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(sampled, cache.prior_for(source))
    assert SampledPriors.from_contract(model, cache.contract()).contract() == cache.contract()

    # The command: --prior-model with the model's contract gives the output --prior-cache gives.
    assert deblur_one(source, model_with_contract, tmp_path / "cached", "--prior-cache", str(dataset["cache"])) == 0
    assert deblur_one(source, model_with_contract, tmp_path / "sampled", "--prior-model", str(dataset["prior"])) == 0
    assert (tmp_path / "cached" / source.name).read_bytes() == (tmp_path / "sampled" / source.name).read_bytes()
