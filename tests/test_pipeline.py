"""``DeblurPipeline``: loading, saving, settings, priors, and agreement with the inferencers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from swintormer.core.image_io import read_image, write_image
from swintormer.core.metrics import psnr
from swintormer.core.priors import PriorFolder, save_prior_safetensors
from swintormer.inference import SlidingWindowInferencer, WholeImageInferencer
from swintormer.models import Swintormer, SwintormerConfig
from swintormer.pipeline import DEFAULT_MODEL_DIR, PIPELINE_CONFIG_NAME, DeblurPipeline, InferenceSettings, PriorRequiredError

REPO = Path(__file__).resolve().parents[1]


def _model(in_channels: int = 3, seed: int = 0) -> Swintormer:
    torch.manual_seed(seed)
    model = Swintormer(SwintormerConfig.preset("tiny", in_channels=in_channels)).eval()
    with torch.no_grad():  # random weights large enough that the output differs from the input
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return model


def _image(height: int = 70, width: int = 90, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, size=(height, width, 3)).astype(np.float32)


def test_the_readme_lines_deblur_the_sample_with_the_shipped_model():
    pipe = DeblurPipeline.from_pretrained()
    restored = pipe(REPO / "samples" / "coffee_04_blurry.png")
    sharp = read_image(REPO / "samples" / "coffee_04_sharp.png").pixels
    blurry = read_image(REPO / "samples" / "coffee_04_blurry.png").pixels
    assert restored.shape == sharp.shape and restored.dtype == np.float32
    # The shipped model gains 0.45 dB on this sample (swintormer/weights/default/TRAINING.md).
    assert psnr(np.clip(restored, 0, 1), sharp) > psnr(blurry, sharp) + 0.3


def test_pipeline_output_equals_the_sliding_window_inferencer(tmp_path):
    model = _model()
    settings = InferenceSettings(tile=32, stride=24, batch_size=3, blend="feather")
    pipe = DeblurPipeline(model, settings=settings)
    image = _image()
    expected = SlidingWindowInferencer(model, tile=32, stride=24, batch_size=3, blend="feather", progress=False)(image)
    np.testing.assert_array_equal(pipe(image), expected)
    whole = DeblurPipeline(model, settings=InferenceSettings(whole=True))
    np.testing.assert_array_equal(whole(image), WholeImageInferencer(model)(image))


def test_save_and_load_keep_model_and_settings_and_overrides_win(tmp_path):
    model = _model(seed=3)
    DeblurPipeline(model, settings=InferenceSettings(tile=48, stride=40, blend="feather")).save_pretrained(tmp_path / "p")
    saved = json.loads((tmp_path / "p" / PIPELINE_CONFIG_NAME).read_text())
    assert saved["tile"] == 48 and saved["blend"] == "feather"
    loaded = DeblurPipeline.from_pretrained(tmp_path / "p", fast_cpu=False)
    assert loaded.settings == InferenceSettings(tile=48, stride=40, blend="feather")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value)
    image = _image(seed=4)
    np.testing.assert_array_equal(loaded(image), DeblurPipeline(model, settings=loaded.settings)(image))
    overridden = DeblurPipeline.from_pretrained(tmp_path / "p", tile=64, stride=None, fast_cpu=False)
    assert overridden.settings.tile == 64 and overridden.settings.stride == 40  # None keeps the saved value


def test_the_cpu_engine_gives_the_plain_outputs(tmp_path):
    model = _model(seed=5)
    DeblurPipeline(model).save_pretrained(tmp_path / "p")
    image = _image(96, 80, seed=6)
    plain = DeblurPipeline.from_pretrained(tmp_path / "p", fast_cpu=False)(image)
    fast = DeblurPipeline.from_pretrained(tmp_path / "p", fast_cpu=True)(image)
    np.testing.assert_allclose(fast, plain, atol=1e-5)


def test_a_bare_model_folder_loads_with_default_settings(tmp_path):
    _model().save_pretrained(tmp_path / "m")
    assert DeblurPipeline.from_pretrained(tmp_path / "m").settings == InferenceSettings()


def test_bad_saved_settings_are_one_clear_error(tmp_path):
    DeblurPipeline(_model()).save_pretrained(tmp_path / "p")
    (tmp_path / "p" / PIPELINE_CONFIG_NAME).write_text(json.dumps({"tile": 64, "tiles": 3}))
    with pytest.raises(ValueError, match="tiles"):
        DeblurPipeline.from_pretrained(tmp_path / "p")
    (tmp_path / "p" / PIPELINE_CONFIG_NAME).write_text(json.dumps({"tile": 64}))
    with pytest.raises(ValueError, match="stride 99 is larger than the tile 64"):
        DeblurPipeline.from_pretrained(tmp_path / "p", stride=99, fast_cpu=False)
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        DeblurPipeline.from_pretrained(tmp_path / "missing")


def test_a_six_channel_model_takes_its_prior_from_the_source_or_the_call(tmp_path):
    model = _model(in_channels=6, seed=7)
    image, prior = _image(seed=8), _image(seed=9)
    expected = SlidingWindowInferencer(model, tile=32, stride=24, progress=False)(np.concatenate([image, prior], axis=2))
    settings = InferenceSettings(tile=32, stride=24)
    pipe = DeblurPipeline(model, settings=settings)
    with pytest.raises(PriorRequiredError):
        pipe(image)
    np.testing.assert_array_equal(pipe(image, prior=prior), expected)

    write_image(tmp_path / "photo.png", image)
    save_prior_safetensors(tmp_path / "priors" / "photo.safetensors", prior)
    with_source = DeblurPipeline(model, prior=PriorFolder(tmp_path / "priors"), settings=settings)
    decoded = read_image(tmp_path / "photo.png").pixels
    expected_file = SlidingWindowInferencer(model, tile=32, stride=24, progress=False)(
        np.concatenate([decoded, prior], axis=2))
    np.testing.assert_array_equal(with_source(tmp_path / "photo.png"), expected_file)
    with pytest.raises(PriorRequiredError, match="path"):
        with_source(image)


def test_a_three_channel_model_refuses_a_prior():
    with pytest.raises(ValueError, match="no prior"):
        DeblurPipeline(_model(), prior=PriorFolder(DEFAULT_MODEL_DIR))
    with pytest.raises(ValueError, match="no prior"):
        DeblurPipeline(_model())(_image(), prior=_image())


class OutOfMemoryAbove(torch.nn.Module):
    """Wraps a model and raises CUDA's out-of-memory error for batches of more than ``limit`` windows."""

    def __init__(self, model: torch.nn.Module, limit: int) -> None:
        super().__init__()
        self.inner, self.limit, self.batches = model, limit, []
        self.config = model.config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (fake, batch {x.shape[0]})")
        return self.inner(x)


def test_out_of_memory_retries_the_image_with_half_the_window_batch():
    model = _model(seed=10)
    image = _image(80, 100, seed=11)
    settings = InferenceSettings(tile=32, stride=24, batch_size=8)
    expected = DeblurPipeline(model, settings=settings)(image)
    wrapped = OutOfMemoryAbove(model, limit=2)
    pipe = DeblurPipeline(wrapped, settings=settings)
    with pytest.warns(RuntimeWarning) as warned:
        restored = pipe(image)
    assert [str(w.message).split("; ")[0] for w in warned] == [f"out of device memory with {n} windows per batch" for n in (8, 4)]
    np.testing.assert_array_equal(restored, expected)
    assert pipe.window_batch == 2 and wrapped.batches[:2] == [8, 4] and set(wrapped.batches[2:]) <= {1, 2}
    wrapped.batches.clear()
    np.testing.assert_array_equal(pipe(image), expected)  # the next image starts at the batch that fitted
    assert max(wrapped.batches) == 2
    # one window that does not fit, or the whole image in one pass: the error stands
    with pytest.raises(torch.cuda.OutOfMemoryError), pytest.warns(RuntimeWarning):
        DeblurPipeline(OutOfMemoryAbove(model, limit=0), settings=settings)(image)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        DeblurPipeline(OutOfMemoryAbove(model, limit=0), settings=InferenceSettings(whole=True))(image)


def test_the_cpu_engine_is_never_left_on_a_model_for_another_device():
    from swintormer.models.cpu_inference import is_prepared, prepare_for_inference

    prepared = prepare_for_inference(_model(seed=12))
    DeblurPipeline(prepared, device="cpu")
    assert is_prepared(prepared)
    DeblurPipeline(prepared, device="cuda")  # only the device's type is read here: runs without a GPU
    assert not is_prepared(prepared)
