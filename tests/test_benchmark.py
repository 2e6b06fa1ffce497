"""The benchmark command (``tools/benchmark.py``) end to end on its quick profile.

One run of ``--quick`` (a few minutes) makes the data, trains the prior and every ablation row
through the project's pipelines, scores them and renders the report. The tests check that the
report is what the command measured: scores recomputed independently from the files, every
row trained with the same budget, every figure of the Markdown taken from the JSON, and a
second invocation reusing the finished steps instead of running them again.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from swintormer.core.image_io import read_image
from swintormer.core.metrics import psnr

REPO_ROOT = Path(__file__).resolve().parents[1]
ROWS = {"mixed_prior", "no_prior", "window", "channel", "prior_T2", "loss_vgg", "loss_mae_local",
        "loss_mae_distribution", "sparse_gated"}


def run_benchmark(work: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "tools/benchmark.py", "--quick", "--work", str(work), "--threads", "1",
                           "--quiet"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1500)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    work = tmp_path_factory.mktemp("benchmark")
    done = run_benchmark(work)
    assert done.returncode == 0, done.stderr[-2000:]
    return work, json.loads((work / "BENCHMARKS.json").read_text())


def test_every_ablation_row_and_inference_mode_is_reported(quick_run: tuple[Path, dict]) -> None:
    work, results = quick_run
    assert {item["row"] for item in results["summary"]} == ROWS
    assert {entry["row"] for entry in results["inference"]} == {"whole", "stride24", "stride16"}
    for item in results["summary"]:
        for test_set in ("defocus", "motion"):
            assert 5 < item[f"{test_set}_psnr"] < 60
        assert item["cost"]["parameters"] > 0 and item["cost"]["gmacs_256"] > 0 and item["cost"]["seconds_per_mp"] > 0
    # The no-prior network takes 3 channels instead of 6; its first conv (after a 2× pixel-unshuffle,
    # 3×3 kernel, no bias) has 3·4·9·dim fewer weights, the only difference.
    dim = json.loads(next((work / "runs").glob("no_prior_s0_*/model/config.json")).read_text())["dim"]
    costs = {item["row"]: item["cost"] for item in results["summary"]}
    assert costs["mixed_prior"]["parameters"] - costs["no_prior"]["parameters"] == 3 * 4 * 9 * dim


def test_blurry_input_scores_match_an_independent_computation(quick_run: tuple[Path, dict]) -> None:
    work, results = quick_run
    for test_set in ("defocus", "motion"):
        split = work / "data" / f"test_{test_set}" / "test"
        values = [psnr(read_image(path).pixels, read_image(split / "target" / path.name).pixels)
                  for path in sorted((split / "inputC").iterdir())]
        reported = next(e for e in results["references"] if e["method"] == "blurry input" and e["test_set"] == test_set)
        assert reported["scores"]["psnr"] == pytest.approx(float(np.mean(values)), abs=1e-4)


def test_deconvolution_with_the_true_kernel_beats_the_blurry_input(quick_run: tuple[Path, dict]) -> None:
    _, results = quick_run
    scores = {(e["method"], e["test_set"]): e["scores"]["psnr"] for e in results["references"]}
    for test_set in ("defocus", "motion"):
        assert scores[("Richardson–Lucy (30 it.), true kernel", test_set)] > scores[("blurry input", test_set)] + 1


def test_every_row_trains_with_the_same_budget_and_only_its_own_change(quick_run: tuple[Path, dict]) -> None:
    work, _ = quick_run
    # Run folders are ROW_sSEED_TAG, TAG being a hash of the stage-two config file.
    configs = {run.name.rsplit("_", 1)[0]: yaml.safe_load((run / "config.yaml").read_text())
               for run in (work / "runs").iterdir()}
    assert {name.rsplit("_s", 1)[0] for name in configs} == ROWS
    budgets = {json.dumps(config["train"] | {"seed": None}, sort_keys=True) for config in configs.values()}
    assert len(budgets) == 1
    base = configs["mixed_prior_s0"]
    assert configs["window_s0"]["model"]["overrides"]["attention"] == "window"
    assert configs["no_prior_s0"]["model"]["in_channels"] == 3
    assert configs["loss_vgg_s0"]["loss"]["vgg"]["weight"] == 0.01
    for name, config in configs.items():  # before the loop below blanks what differs (base included)
        if not name.startswith("no_prior"):  # a prior row records the settings of the cache it read
            assert config["data"]["prior"]["expected"]["steps"] == (2 if name.startswith("prior_T2") else 4), name
    for name, config in configs.items():
        if name.startswith(("window", "channel")):
            config["model"]["overrides"].pop("attention")
        if name.startswith("no_prior"):
            config["model"]["in_channels"] = 6
        if name.startswith("sparse_gated"):
            config["model"]["preset"] = base["model"]["preset"]
        if name.startswith("loss"):
            config["loss"] = base["loss"]
        for config_part in (config, base):
            config_part["output_dir"] = None
            config_part["data"]["prior"]["path"] = None  # T differs between prior rows: checked below
            config_part["data"]["prior"]["expected"] = None  # filled from the cache (none without a prior)
        assert config["model"] == base["model"] and config["data"] == base["data"], name
    prior_paths = [yaml.safe_load(next((work / "runs").glob(f"{row}_s0_*/config.yaml")).read_text())["data"]["prior"]["path"]
                   for row in ("prior_T2", "mixed_prior")]
    assert [Path(p).parent.name for p in prior_paths] == ["T2", "T4"]


def test_markdown_figures_come_from_the_json(quick_run: tuple[Path, dict]) -> None:
    work, results = quick_run
    markdown = (work / "BENCHMARKS.md").read_text()
    for item in results["summary"]:
        line = next(line for line in markdown.splitlines() if line.startswith(f"| {item['group']} | {item['label']}"))
        assert f"{item['defocus_psnr']:.2f} ({item['defocus_delta']:+.2f})" in line
        assert f"{item['motion_psnr']:.2f} ({item['motion_delta']:+.2f})" in line
    for case in results["speed"]["deblur"]:
        assert f"| {case['image']} | {case['precision']} | {case['seconds']:.1f} s |" in markdown
    forward = {case["precision"]: case["latency_median_s"] for case in results["speed"]["forward"]["cases"]}
    assert set(forward) == {"fp32", "bf16"}
    for precision, median in forward.items():
        assert re.search(rf"\| {precision} \| {median:.3f} s \|", markdown)


def test_a_second_invocation_reuses_every_finished_step(quick_run: tuple[Path, dict]) -> None:
    work, _ = quick_run
    steps_before = (work / "steps.json").read_text()
    done = run_benchmark(work)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (work / "steps.json").read_text() == steps_before
    again = json.loads((work / "BENCHMARKS.json").read_text())
    assert again["summary"] == quick_run[1]["summary"]


def test_default_model_speed_rows_are_measured_per_precision(quick_run: tuple[Path, dict]) -> None:
    work, results = quick_run
    rows = results["default_speed"]
    assert [(row["model"], row["image"], row["precision"]) for row in rows] == [
        ("shipped", "384×256", "fp32"), ("shipped", "384×256", "bf16")]
    markdown = (work / "BENCHMARKS.md").read_text()
    for row in rows:
        assert row["seconds_per_mp"] == round(row["seconds"] / (384 * 256 / 1e6), 2)
        assert "--precision " + row["precision"] in row["command"] and row["peak_rss_mib"] > 0
        assert f"| {row['image']} | {row['precision']} | {row['seconds']:.1f} s | {row['seconds_per_mp']:.2f} |" in markdown


def test_only_default_model_updates_its_sections_and_keeps_the_rest(quick_run: tuple[Path, dict], tmp_path: Path) -> None:
    """``--only default-model`` reruns the default model's steps on a photo corpus and rewrites
    only their sections of an existing report."""
    from skimage import data

    from swintormer.core.image_io import write_image

    work, results = quick_run
    corpus = tmp_path / "corpus"
    files = []
    for split, name, photo in (("train", "cat", data.chelsea()), ("test", "coffee", data.coffee()),
                               ("test", "rocket", data.rocket())):
        write_image(corpus / split / f"{name}.png", photo[:112, :128].astype(np.float32) / 255)
        files.append({"split": split, "path": f"{split}/{name}.png", "bokeh": name == "coffee"})
    (corpus / "manifest.json").write_text(json.dumps({"files": files}))
    report = tmp_path / "report"
    report.mkdir()
    for name in ("BENCHMARKS.json", "BENCHMARKS.md"):
        (report / name).write_bytes((work / name).read_bytes())
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "tools/benchmark.py", "--quick", "--only", "default-model", "--work",
                           str(tmp_path / "work"), "--threads", "1", "--quiet", "--photo-corpus", str(corpus),
                           "--markdown", str(report / "BENCHMARKS.md")],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    updated = json.loads((report / "BENCHMARKS.json").read_text())
    for key in ("ablation", "references", "summary", "speed"):
        assert updated[key] == results[key], key  # nothing else was rerun or changed
    assert updated["default_by_kind"]["report"]["settings"]["photos"] == 2
    assert updated["meta"]["default_model_update"]["command"].endswith(f"--photo-corpus {corpus}")
    markdown = (report / "BENCHMARKS.md").read_text()
    assert "## Default model by kind of degradation" in markdown and "## Default model: deblur speed" in markdown
    assert "The default-model sections above were regenerated by `python tools/benchmark.py --quick --only" in markdown
    # Without a report to update, or without a corpus, it refuses with one line.
    missing = subprocess.run([sys.executable, "tools/benchmark.py", "--only", "default-model", "--json",
                              str(tmp_path / "absent.json"), "--photo-corpus", str(corpus)],
                             cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.startswith("error: --only needs an existing report")
