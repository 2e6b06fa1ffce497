"""The whole two-stage chain as one command (``pipelines.recipe``).

A tiny recipe (the shipped stage configs, shrunk by the recipe's overrides to a few steps of the
"tiny" prior and Swintormer) runs end to end once per module: synthetic data, three chained
stage-one runs, the cache of every split, stage two with and without the prior, and the final
table. Then: a rerun that finds every step done and touches nothing, refusals of step folders
made with other settings, and the shipped recipes checked through ``--plan``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import yaml

from ldm_prior.cache import PriorCache
from pipelines.recipe import first_difference, flatten_overrides, main as recipe
from swintormer.core.config import apply_overrides
from swintormer.core.priors import PriorContract

REPO = Path(__file__).resolve().parents[1]
STAGE_ONE_RUNS = ("vq", "unet", "decoder")
STAGE_TWO_RUNS = ("prior", "no_prior")
SHORT = {"max_steps": 2, "batch_size": 2, "validate_every_steps": 2, "checkpoint": {"every_steps": 2},
         "logging": {"progress_bar": False}}


def tiny_recipe() -> dict:
    """The CPU recipe's chain at test size: validation on in every training run."""
    prior = REPO / "configs/prior"
    return {
        "data": {"synthetic": [{"blur": "defocus", "seed": 0, "per_image": 1, "max_size": 48,
                                "defocus_radius": [1, 2]}]},
        "stage_one": {
            "vq": {"config": str(prior / "cpu_small_vq.yaml"),
                   "overrides": {"model": {"source": "tiny"}, "train": SHORT,
                                 "validation": {"max_images": 1, "crop": 32}}},
            "unet": {"config": str(prior / "cpu_small.yaml"), "start_from": "vq",
                     "overrides": {"train": SHORT, "validation": {"max_images": 1, "crop": 32, "noise_draws": 1,
                                                                  "prior_steps": 1}}},
            "decoder": {"config": str(prior / "cpu_small_decoder.yaml"), "start_from": "unet",
                        "overrides": {"train": SHORT, "validation": {"max_images": 1, "crop": 32}}},
        },
        "cache": {"steps": 1, "timestep_spacing": "trailing", "mode": "full", "seed": 0},
        "stage_two": {
            name: {"config": str(REPO / "configs/swintormer/cpu_tiny.yaml"), "prior": name == "prior",
                   "label": "tiny + prior" if name == "prior" else "tiny, no prior",
                   "overrides": {"train": {key: value for key, value in SHORT.items() if key != "batch_size"},
                                 "validation": {"max_images": 1}}}
            for name in STAGE_TWO_RUNS
        },
        "evaluation": {"splits": ["test"], "metrics": ["psnr", "ssim"]},
    }


def run_recipe(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = recipe(argv)
    return code, out.getvalue(), err.getvalue()


def plan_states(out: str) -> dict[str, str]:
    """Step key → state word, from the plan the recipe prints first."""
    states = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].rstrip(".").isdigit() and parts[0].endswith("."):
            states[parts[1]] = parts[2].rstrip(",")
    return states


def modification_times(folder: Path) -> dict[str, int]:
    return {str(path.relative_to(folder)): path.stat().st_mtime_ns for path in folder.rglob("*") if path.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("recipe")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_recipe(), sort_keys=False))
    output = root / "out"
    code, out, err = run_recipe(["--config", str(config), "--output", str(output)])
    assert code == 0, err[-3000:]
    return {"config": config, "output": output, "out": out}


def test_the_recipe_runs_every_step_and_leaves_what_each_makes(finished) -> None:
    output = finished["output"]
    status = json.loads((output / "status.json").read_text())
    assert status["state"] == "finished" and status["exit_code"] == 0
    assert plan_states(finished["out"]) == {key: "run" for key in (
        "data", *(f"stage1/{name}" for name in STAGE_ONE_RUNS), "cache", *(f"stage2/{name}" for name in STAGE_TWO_RUNS),
        "eval")}
    record = json.loads((output / "data/recipe_data.json").read_text())
    assert record["sets"][0]["per_image"] == 1 and record["sets"][0]["blur"] == "defocus"
    assert not [path for path in output.iterdir() if path.name.startswith(".data.")]  # no staging left
    for name in STAGE_ONE_RUNS:
        run = output / "stage1" / name
        assert json.loads((run / "status.json").read_text())["state"] == "finished"
        assert (run / "model/unet").is_dir() and (run / "model/vqvae").is_dir()
    # Each stage-one run starts from the one before it.
    unet = yaml.safe_load((output / "stage1/unet/config.yaml").read_text())
    assert unet["model"]["source"] == str(output / "stage1/vq/model")
    # One cache holds every image of every split, made by the last stage-one model.
    cache = PriorCache(output / "cache")
    for split in ("train", "test"):
        images = sorted((output / "data" / split / "inputC").glob("*.png"))
        assert images
        for image in images:
            assert cache.entry_problem(image) is None
    assert cache.settings["steps"] == "1" and cache.settings["timestep_spacing"] == "trailing"
    # The 6-channel model records the prior it was trained on; the baseline takes none.
    prior_model = json.loads((output / "stage2/prior/model/pipeline.json").read_text())
    assert PriorContract.model_validate(prior_model["prior_contract"]) == cache.contract()
    assert json.loads((output / "stage2/prior/model/config.json").read_text())["in_channels"] == 6
    assert json.loads((output / "stage2/no_prior/model/config.json").read_text())["in_channels"] == 3
    assert not json.loads((output / "stage2/no_prior/model/pipeline.json").read_text()).get("prior_contract")
    for name in STAGE_TWO_RUNS:  # validation ran during training
        logged = [json.loads(line) for line in (output / "stage2" / name / "logs/metrics.jsonl").read_text().splitlines()]
        assert any("val/psnr" in record for record in logged)
    # The prior alone is the cache exported as PNGs, for the evaluated split only.
    assert sorted(path.name for path in (output / "eval/prior").iterdir() if path.is_dir()) == ["test"]


def test_the_final_table_scores_four_rows_on_the_test_split(finished) -> None:
    output = finished["output"]
    results = json.loads((output / "results.json").read_text())
    labels = [row["label"] for row in results["rows"]]
    assert labels == ["blurry input", "prior alone (stage one, T=1 trailing)", "tiny + prior", "tiny, no prior"]
    tests = len(list((output / "data/test/inputC").glob("*.png")))
    for row in results["rows"]:
        scores = row["scores"]["test"]
        assert scores["count"] == tests
        assert math.isfinite(scores["psnr"]) and 5 < scores["psnr"] < 100
        assert math.isfinite(scores["ssim"]) and 0 < scores["ssim"] <= 1
    table = (output / "results.md").read_text()
    assert "| method | test PSNR | test SSIM |" in table
    for row in results["rows"]:
        assert f"| {row['label']} | {row['scores']['test']['psnr']:.3f} | {row['scores']['test']['ssim']:.4f} |" in table
    assert table.strip() in finished["out"]  # printed at the end, too
    # The blurry row scores the inputs themselves, as the evaluate command does.
    blurry = json.loads((output / "eval/blurry/test.json").read_text())
    assert blurry["mean"]["psnr"] == results["rows"][0]["scores"]["test"]["psnr"]


def test_a_rerun_finds_every_step_done_and_touches_nothing(finished) -> None:
    output = finished["output"]
    before = modification_times(output)
    code, out, err = run_recipe(["--config", str(finished["config"]), "--output", str(output)])
    assert code == 0, err
    states = plan_states(out)
    assert len(states) == 8 and set(states.values()) == {"done"}
    assert "running" not in out and "resuming" not in out
    after = modification_times(output)
    for record in ("recipe.yaml", "status.json", ".lock"):  # the records of the last invocation (and its pid)
        del before[record], after[record]
    assert after == before
    assert json.loads((output / "status.json").read_text())["state"] == "finished"
    assert (output / "results.md").read_text().strip() in out


def test_a_step_folder_made_with_other_settings_is_refused(finished) -> None:
    output = finished["output"]
    before = modification_times(output)
    code, out, err = run_recipe(["--config", str(finished["config"]), "--output", str(output),
                                 "stage_two.no_prior.overrides.train.max_steps=3"])
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: step stage2/no_prior: ")
    assert "train.max_steps is 2 there, the recipe asks for 3" in err and "--overwrite-changed" in err
    states = plan_states(out)
    assert states["stage2/no_prior"] == "REFUSED" and states["stage2/prior"] == "done"
    assert states["eval"] == "REFUSED"  # made from the run that would change
    # Other generator settings: the data step is named, and every step made from the data too.
    code, out, err = run_recipe(["--config", str(finished["config"]), "--output", str(output),
                                 "data.synthetic=[{blur: motion, seed: 0, per_image: 1, max_size: 48}]"])
    assert code == 2 and err.startswith("error: step data: ") and "blur is 'defocus' there" in err
    assert set(plan_states(out).values()) == {"REFUSED"}
    assert modification_times(output) == before


def test_a_failing_step_stops_the_recipe_with_its_code_and_names_it(tmp_path) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_recipe(), sort_keys=False))
    output = tmp_path / "out"
    # A model that does not exist fails when the run sets up, not when the recipe is read.
    code, out, err = run_recipe(["--config", str(config), "--output", str(output),
                                 "stage_one.vq.overrides.model.source=no_such_model"])
    assert code == 2
    assert "error: model.source 'no_such_model'" in err
    assert err.strip().splitlines()[-1].startswith("error: step stage1/vq failed (exit code 2)")
    assert "rerun the same command" in err
    assert "[1/8] data: finished" in out and "stage1/unet" not in out.split("[2/8]")[-1]
    status = json.loads((output / "status.json").read_text())
    assert status["state"] == "failed" and status["step"] == "stage1/vq" and status["exit_code"] == 2
    assert not (output / "stage1/unet").exists()


def test_a_recipe_folder_another_recipe_is_running_in_is_refused(tmp_path) -> None:
    from swintormer.core.run_control import RunFolderLock

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_recipe(), sort_keys=False))
    output = tmp_path / "out"
    with RunFolderLock(output):  # as the first recipe holds it while it runs
        code, out, err = run_recipe(["--config", str(config), "--output", str(output)])
        assert code == 2 and err.count("\n") == 1
        assert err.startswith(f"error: recipe folder {output} is in use by pid ")
        assert sorted(path.name for path in output.iterdir()) == [".lock"]  # no step started
        # --plan only reads: it still answers while the recipe runs
        code, out, err = run_recipe(["--config", str(config), "--output", str(output), "--plan"])
        assert code == 0 and plan_states(out)["data"] == "run"


def test_the_shipped_cpu_recipe_plans_the_measured_chain(tmp_path) -> None:
    output = tmp_path / "run"
    code, out, err = run_recipe(["--config", str(REPO / "configs/recipes/cpu_two_stage.yaml"), "--output", str(output),
                                 "--plan"])
    assert code == 0, err
    assert not output.exists()  # a plan makes nothing
    states = plan_states(out)
    assert list(states) == ["data", "stage1/vq", "stage1/vq_long", "stage1/unet", "stage1/decoder_all_t",
                            "stage1/decoder", "cache", "stage2/prior", "stage2/no_prior", "eval"]
    assert set(states.values()) == {"run"}
    lines = {line.split()[1]: line for line in out.splitlines() if line.split()[:1] and line.split()[0][:-1].isdigit()}
    steps = {key: int(line.split(" steps")[0].split()[-1]) for key, line in lines.items() if key.startswith("stage1/")}
    assert steps == {"stage1/vq": 1500, "stage1/vq_long": 3000, "stage1/unet": 4000, "stage1/decoder_all_t": 1500,
                     "stage1/decoder": 1000}
    assert "T=1 trailing" in lines["cache"] and "from stage1/decoder:" in lines["cache"]
    # Every step's command is shown, with the stage configs found beside the recipe's folder.
    assert f"--config {REPO / 'configs/prior/cpu_small_decoder.yaml'}" in out
    assert "model.pixel_residual=false loss.min_timestep=0 train.max_steps=1500" in out


def test_the_shipped_dpdd_recipe_needs_a_data_root(tmp_path) -> None:
    recipe_file = str(REPO / "configs/recipes/dpdd_paper.yaml")
    code, out, err = run_recipe(["--config", recipe_file, "--output", str(tmp_path / "run"), "--plan"])
    assert code == 2 and err.startswith("error: ") and "--data ROOT" in err and err.count("\n") == 1
    root = tmp_path / "DPDD"
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
    code, out, err = run_recipe(["--config", recipe_file, "--output", str(tmp_path / "run"), "--plan", "--data", str(root),
                                 "stage_one.finetune.overrides.model.source=/weights/ldm"])
    assert code == 0, err
    assert "T=50 leading" in out and "model.source=/weights/ldm" in out
    assert plan_states(out)["data"] == "given"


@pytest.mark.parametrize("override, message", [
    ("stage_one.vq.unknown=1", "unknown key 'stage_one.vq.unknown'"),
    ("stage_one.vq.start_from=decoder", "not an earlier stage-one run"),
    ("stage_two.prior.overrides.model.in_channels=3", "model.in_channels is decided by the recipe"),
    ("evaluation.splits=[val]", "'val' is not a split"),
])
def test_bad_recipe_settings_stop_before_anything_runs(tmp_path, override, message) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_recipe(), sort_keys=False))
    code, out, err = run_recipe(["--config", str(config), "--output", str(tmp_path / "out"), override])
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "out").exists()


def test_overrides_are_flattened_to_what_the_pipelines_parse_back() -> None:
    tree = {"train": {"max_steps": 3000, "optimizer": {"lr": 1.0e-3}}, "model": {"source": "runs/a b", "flag": True},
            "loss": {"layers": [1, 2]}, "name": "123", "empty": {}, "unset": None, "data.root": "x"}
    flat = flatten_overrides(tree, "here")
    assert "train.max_steps=3000" in flat and "data.root=x" in flat
    rebuilt = apply_overrides({}, flat)
    assert rebuilt["train"] == tree["train"] and rebuilt["model"] == tree["model"] and rebuilt["name"] == "123"
    assert rebuilt["loss"] == {"layers": [1, 2]} and rebuilt["empty"] == {} and rebuilt["unset"] is None
    assert first_difference({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}}) == "a.c is 2 there, the recipe asks for 3"
    assert first_difference({"a": [1]}, {"a": [1]}) is None
    assert first_difference({"s": [{"b": 1}]}, {"s": [{"b": 2}]}) == "s.0.b is 1 there, the recipe asks for 2"


def test_the_recipe_is_a_swintormer_subcommand() -> None:
    from pipelines.cli import SUBCOMMANDS

    assert SUBCOMMANDS["recipe"][0] == "pipelines.recipe"
