"""Classical baselines: Wiener and Richardson–Lucy with the true kernel beat the blurry input,
and their output is scored by the evaluator like any method."""

from __future__ import annotations

import json

import numpy as np

from pipelines.evaluate import main as evaluate_main
from swintormer.core.data.synthetic_blur import blur_image, disc_kernel
from tools.classical_baselines import main as baselines_main, wiener_deconvolve
from tools.make_synthetic_blur import main as make_main


def test_wiener_inverts_a_known_blur_away_from_the_border():
    rng = np.random.default_rng(0)
    # a smooth image (low frequencies survive the disc's spectral zeros)
    sharp = np.stack([np.kron(rng.random((8, 8)), np.ones((8, 8))) for _ in range(3)], axis=2)
    from scipy.ndimage import gaussian_filter

    sharp = gaussian_filter(sharp, sigma=(2, 2, 0))
    blurry = blur_image(sharp, disc_kernel(2.5))
    restored = wiener_deconvolve(blurry, disc_kernel(2.5), nsr=1e-4)
    inner = (slice(8, -8), slice(8, -8))
    error_blurry = np.abs(blurry - sharp)[inner].mean()
    error_restored = np.abs(restored - sharp)[inner].mean()
    assert error_restored < 0.25 * error_blurry


def test_baselines_beat_the_blurry_input_on_a_synthetic_split(tmp_path, capsys):
    data = tmp_path / "synth"
    assert make_main(["--out", str(data), "--blur", "defocus", "--max-size", "96", "--noise", "0.002", "0.002", "--quiet"]) == 0
    out = tmp_path / "classical"
    assert baselines_main(["--data", str(data / "test"), "--out", str(out), "--rl-iterations", "20", "--quiet"]) == 0
    scores = {}
    for method, folder in (("blurry", data / "test" / "inputC"), ("wiener", out / "wiener"), ("richardson_lucy", out / "richardson_lucy")):
        report = tmp_path / f"{method}.json"
        assert evaluate_main(["--restored", str(folder), "--target", str(data / "test"), "--report", str(report), "--no-lpips", "--quiet"]) == 0
        scores[method] = json.loads(report.read_text())["mean"]["psnr"]
    assert scores["wiener"] > scores["blurry"] + 1.0
    assert scores["richardson_lucy"] > scores["blurry"] + 1.0
    timing = json.loads((out / "timing.json").read_text())
    assert timing["failures"] == 0 and timing["images"] == len(list((data / "test" / "inputC").iterdir()))


def test_missing_kernels_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "inputC").mkdir()
    assert baselines_main(["--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "kernels not found" in capsys.readouterr().err
