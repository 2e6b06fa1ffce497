"""``accelerate launch -m pipelines.recipe --config RECIPE --output DIR``: the whole two-stage
chain as one command (also ``swintormer recipe``).

    accelerate launch -m pipelines.recipe --config configs/recipes/cpu_two_stage.yaml --output runs/two_stage \\
        [--data ROOT] [--plan] [--overwrite-changed] [key.sub=value ...]

A recipe (YAML, schema :class:`RecipeConfig`) names the data, the stage-one runs in order, the
prior cache, the stage-two runs and the evaluation. The recipe runs them as steps, each by
calling the pipeline's own ``main(argv)`` in this process (every process of an ``accelerate
launch`` calls it, as each pipeline expects), each in its own folder of ``--output``:

    DIR/data/               the synthetic dataset root (tools/make_synthetic_blur.py), unless the
                            recipe or --data names an existing root
    DIR/stage1/<run>/       pipelines.train_prior, one folder per stage-one run
    DIR/cache/              pipelines.cache_priors: the prior of every image of every split
    DIR/stage2/<run>/       pipelines.train_swintormer: the prior model (6 channels on the cache)
                            and the no-prior baseline (model.in_channels=3)
    DIR/eval/               blurry inputs, the cache exported as PNGs (cache_priors --export),
                            each stage-two model's deblurred test images (pipelines.deblur), and
                            every report of pipelines.evaluate
    DIR/results.md, DIR/results.json   the table: every row scored on the test split(s)
    DIR/recipe.yaml, DIR/status.json   the resolved recipe of the last run, and how it ended
                            (running, finished, stopped or failed; the step and its exit code)

Each step is judged before anything runs, and the plan says what each will do. A step is
**done** (skipped) when what it made matches what the recipe would run now: a finished training
run whose ``config.yaml`` equals the resolved config, a cache whose manifest holds the recipe's
settings and the stage-one model's fingerprint and whose ``cache_priors --verify`` passes, data
made with the same generator arguments (recorded in ``DIR/data/recipe_data.json``), results of
the same evaluation settings. An interrupted step is **resumed** (training with ``--resume
auto``; the cache job and the evaluation continue where they stopped). A step folder made with
other settings, or made before a step it depends on runs again, is **refused** (one ``error:``
line naming the step and the first differing setting, exit code 2) unless
``--overwrite-changed`` asks to redo it. ``--plan`` prints the plan with each step's command
and exits.

Exit codes: 0 every step done; 75 a step was stopped by SIGTERM, SIGINT or SIGUSR1 (it saved its
state: rerun the same command to continue); 2 bad recipe, settings or refused step folder; any
other code is the failing step's own (the recipe says which step; rerun the same command after
fixing the cause, and the steps already done are skipped).

Paths: a stage config path in a recipe is relative to the recipe file's folder; every other
path (``data.root``, a synthetic ``source``, ``evaluation.lpips_alexnet``, ``--data``,
``--output``) is relative to the current folder, as on every other command line.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import math
import re
import shlex
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from swintormer.core.config import ConfigError, StrictModel, load_config, save_config
from swintormer.core.files import atomic_write_text

EXIT_BAD_SETTINGS = 2
SPLIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
DATA_RECORD = "recipe_data.json"
EVAL_SETTINGS = "settings.json"
GENERATOR = Path(__file__).resolve().parents[1] / "tools" / "make_synthetic_blur.py"
METRIC_DIGITS = {"psnr": 3, "ssim": 4, "mae": 4, "lpips": 4}
METRIC_TITLES = {"psnr": "PSNR", "ssim": "SSIM", "mae": "MAE", "lpips": "LPIPS"}


# --------------------------------------------------------------------------- schema


def _check_name(name: str, what: str) -> str:
    if not SPLIT_NAME.match(name):
        raise ValueError(f"{what} {name!r}: use letters, digits, '_', '-' and '.' (it names a folder)")
    return name


class SyntheticSet(StrictModel):
    """One run of ``tools/make_synthetic_blur.py`` (an unset option keeps the generator's
    default) and which of the splits it makes go into the dataset root, under which name."""

    source: Path | None = None  # folder of sharp photos; default: scikit-image's bundled photos
    blur: Literal["defocus", "motion", "both"] | None = None
    seed: int | None = None
    per_image: int | None = Field(None, ge=1)
    max_size: int | None = Field(None, ge=8)
    crop: int | None = Field(None, ge=8)
    bit_depth: Literal[8, 16] | None = None
    test_fraction: float | None = Field(None, gt=0.0, lt=1.0)
    defocus_radius: tuple[float, float] | None = None
    motion_length: tuple[float, float] | None = None
    noise: tuple[float, float] | None = None
    # generated split (train, test) -> its folder name in the dataset root; splits not named are dropped
    splits: dict[str, str] = Field(default_factory=lambda: {"train": "train", "test": "test"})

    @model_validator(mode="after")
    def _splits_known(self) -> "SyntheticSet":
        if not self.splits:
            raise ValueError("splits: name at least one of the generated splits (train, test)")
        for made, name in self.splits.items():
            if made not in ("train", "test"):
                raise ValueError(f"splits: the generator makes 'train' and 'test', not {made!r}")
            _check_name(name, "split name")
        return self

    def generator_arguments(self) -> list[str]:
        """The options of ``make_synthetic_blur.py`` for the set fields."""
        arguments: list[str] = []
        for key, value in self.model_dump(exclude={"splits"}).items():
            if value is None:
                continue
            flag = "--" + key.replace("_", "-")
            values = value if isinstance(value, (tuple, list)) else (value,)
            arguments += [flag, *(str(item) for item in values)]
        return arguments


class DataSection(StrictModel):
    """The dataset root: an existing one (``root``, or ``--data``), or the synthetic sets the
    recipe generates into ``OUTPUT/data``."""

    root: Path | None = None
    synthetic: list[SyntheticSet] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_source(self) -> "DataSection":
        if self.root is not None and self.synthetic:
            raise ValueError("give either root (an existing dataset root) or synthetic (sets to generate), not both")
        names = [name for item in self.synthetic for name in item.splits.values()]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"synthetic: split {repeated[0]!r} is made by more than one set")
        return self


class StageOneRun(StrictModel):
    """A ``pipelines.train_prior`` run: its config file, the overrides it adds (a mapping that
    mirrors the config, ``{train: {max_steps: 3000}}``) and the earlier run whose ``model/`` it
    starts from (sets ``model.source``)."""

    config: Path
    start_from: str | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)


class CacheSection(StrictModel):
    """``pipelines.cache_priors`` over every split of the dataset root (its flags; unset tile
    options keep the command's defaults)."""

    prior_from: str | None = None  # the stage-one run whose model samples the priors (default: the last)
    steps: int = Field(50, ge=1)
    eta: float = Field(0.0, ge=0.0, le=1.0)
    mode: Literal["full", "quarter"] = "full"
    timestep_spacing: Literal["leading", "trailing"] = "leading"
    seed: int = 0
    tile: int | None = Field(None, ge=1)
    tile_stride: int | None = Field(None, ge=1)
    decode_tile: int | None = Field(None, ge=1)
    decode_stride: int | None = Field(None, ge=1)
    tile_batch: int | None = Field(None, ge=1)
    threads: int = Field(1, ge=1)  # CPU threads per process (the cache's bits depend on it)


class StageTwoRun(StrictModel):
    """A ``pipelines.train_swintormer`` run. ``prior: true`` trains on blurry ⊕ cached prior
    (``model.in_channels=6`` on the recipe's cache, held to its settings); ``prior: false`` is the
    no-prior baseline (``model.in_channels=3``)."""

    config: Path
    prior: bool
    label: str | None = None  # its row in the results table (default: the run's name)
    overrides: dict[str, Any] = Field(default_factory=dict)


class EvaluationSection(StrictModel):
    """What the final table scores: the splits of the dataset root, the metrics of
    ``pipelines.evaluate``, and how ``pipelines.deblur`` runs the stage-two models (unset: the
    window the model was trained at)."""

    splits: list[str] = Field(default_factory=lambda: ["test"], min_length=1)
    metrics: list[Literal["psnr", "ssim", "mae", "lpips"]] = Field(default_factory=lambda: ["psnr", "ssim"],
                                                                   min_length=1)
    lpips_alexnet: Path | None = None  # torchvision AlexNet weights for LPIPS (nothing is downloaded)
    tile: int | None = Field(None, ge=1)
    stride: int | None = Field(None, ge=1)
    whole: bool = False

    @model_validator(mode="after")
    def _unique(self) -> "EvaluationSection":
        for what, values in (("splits", self.splits), ("metrics", self.metrics)):
            if len(set(values)) != len(values):
                raise ValueError(f"{what}: each may be named once")
        for split in self.splits:
            _check_name(split, "split")
        return self


class RecipeConfig(StrictModel):
    """A whole two-stage chain (see the module docstring); unknown keys are errors."""

    data: DataSection = Field(default_factory=DataSection)
    stage_one: dict[str, StageOneRun] = Field(min_length=1)
    cache: CacheSection = Field(default_factory=CacheSection)
    stage_two: dict[str, StageTwoRun] = Field(min_length=1)
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)

    @model_validator(mode="after")
    def _names(self) -> "RecipeConfig":
        earlier: list[str] = []
        for name, run in self.stage_one.items():
            _check_name(name, "stage-one run")
            if run.start_from is not None and run.start_from not in earlier:
                raise ValueError(f"stage_one.{name}.start_from: {run.start_from!r} is not an earlier stage-one run "
                                 f"(earlier: {', '.join(earlier) or 'none'})")
            earlier.append(name)
        if self.cache.prior_from is not None and self.cache.prior_from not in self.stage_one:
            raise ValueError(f"cache.prior_from: {self.cache.prior_from!r} is not a stage-one run")
        for name in self.stage_two:
            _check_name(name, "stage-two run")
        return self

    @property
    def prior_run(self) -> str:
        return self.cache.prior_from or list(self.stage_one)[-1]


# --------------------------------------------------------------------------- small helpers


class RecipeError(Exception):
    """A bad recipe, setting or step folder: one ``error:`` line, exit code 2."""


class _DataStepFailed(Exception):
    """The data step's generator failed; ``code`` is its exit code (the staged data is dropped)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def flatten_overrides(tree: dict[str, Any], where: str, prefix: str = "") -> list[str]:
    """``{train: {max_steps: 3000}}`` as ``["train.max_steps=3000"]``, the pipelines' override
    form (the value written so that their YAML parsing gives it back unchanged)."""
    items: list[str] = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            items += flatten_overrides(value, where, name + ".")
            continue
        text = value if isinstance(value, str) and _yaml_gives_back(value) else json.dumps(value)
        items.append(f"{name}={text}")
    keys = [item.partition("=")[0] for item in items]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated and not prefix:
        raise RecipeError(f"{where}: {repeated[0]} is set twice")
    return items


def _yaml_gives_back(text: str) -> bool:
    try:
        return yaml.safe_load(text) == text and "\n" not in text
    except yaml.YAMLError:
        return False


def first_difference(found: Any, wanted: Any, prefix: str = "") -> str | None:
    """The first setting where a recorded config (``found``) and the one the recipe would run
    (``wanted``) differ, in words; None when they are equal."""
    if isinstance(found, dict) and isinstance(wanted, dict):
        for key in [*wanted, *(key for key in found if key not in wanted)]:
            name = f"{prefix}{key}"
            if key not in found:
                return f"{name} is not set there, the recipe sets it to {_short(wanted[key])}"
            if key not in wanted:
                return f"{name} is {_short(found[key])} there, the recipe does not set it"
            difference = first_difference(found[key], wanted[key], name + ".")
            if difference:
                return difference
        return None
    if isinstance(found, list) and isinstance(wanted, list) and len(found) == len(wanted):
        for index, (item, wanted_item) in enumerate(zip(found, wanted)):
            difference = first_difference(item, wanted_item, f"{prefix}{index}.")
            if difference:
                return difference
        return None
    if found != wanted:
        return f"{prefix.rstrip('.')} is {_short(found)} there, the recipe asks for {_short(wanted)}"
    return None


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 70 else text[:67] + "..."


def _as_recorded(config: StrictModel) -> Any:
    """A config as its ``config.yaml`` reads back (``save_config``'s YAML, loaded again)."""
    return yaml.safe_load(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, default_flow_style=None))


def _is_empty(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _remove(path: Path) -> int:
    """Delete a file or folder (a step's own output, redone); returns 0, an exit code."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    return 0


def _command(module: str, argv: list[str]) -> str:
    return shlex.join(["python", "-m", module, *argv])


@dataclass
class Step:
    """One step of the plan: ``key`` names it (``stage1/vq``), ``outputs`` are what it writes
    (their existence tells a fresh step from one made before), ``needs`` the steps whose outputs
    it reads. ``judge`` says, when every need is done, whether the step is done, to resume or
    changed (with why); ``run`` carries the step out in a state."""

    key: str
    outputs: list[Path]
    needs: list[str]
    summary: str
    commands: list[str]
    judge: Callable[[], tuple[str, str]]
    run: Callable[[str], int]
    state: str = "run"
    note: str = ""


# --------------------------------------------------------------------------- the recipe


class Recipe:
    """The steps of one recipe in one output folder, judged, printed and run."""

    def __init__(self, config: RecipeConfig, recipe_path: Path, output: Path, overwrite_changed: bool) -> None:
        from swintormer.core.distributed import process_state

        self.config = config
        self.recipe_path = recipe_path
        self.output = output
        self.overwrite_changed = overwrite_changed
        self.state = process_state()
        self.synthetic = config.data.root is None
        self.root = (output / "data") if self.synthetic else config.data.root
        self.cache_dir = output / "cache"
        self.eval_dir = output / "eval"
        self._fingerprints: dict[Path, str] = {}
        self.steps: list[Step] = []
        self._add_data_step()
        self._add_stage_one_steps()
        self._add_cache_step()
        self._add_stage_two_steps()
        self._add_evaluation_step()

    # ------------------------------------------------------------------ output

    def say(self, line: str = "", error: bool = False) -> None:
        if self.state.is_main_process:
            print(line, file=sys.stderr if error else sys.stdout, flush=True)

    def _relative(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.output))
        except ValueError:
            return str(path)

    # ------------------------------------------------------------------ data

    def _data_record(self) -> dict:
        return {"generator": "tools/make_synthetic_blur.py",
                "sets": [item.model_dump(mode="json") for item in self.config.data.synthetic]}

    def _add_data_step(self) -> None:
        if not self.synthetic:
            step = Step("data", [], [], f"the dataset root {self.root} (given)", [], lambda: ("given", ""),
                        lambda state: 0, state="given")
            self.steps.append(step)
            return
        sets = self.config.data.synthetic
        commands = []
        for index, item in enumerate(sets):
            kept = ", ".join(f"{made} as {name}" for made, name in item.splits.items())
            commands.append(shlex.join(["python", "tools/make_synthetic_blur.py", "--out", f"TMP/set{index}",
                                        *item.generator_arguments()]) + f"   # keeps {kept}")
        splits = ", ".join(name for item in sets for name in item.splits.values())
        summary = f"{len(sets)} synthetic set(s) (tools/make_synthetic_blur.py) → data/ ({splits})"
        self.steps.append(Step("data", [self.root], [], summary, commands, self._judge_data, self._make_data))

    def _judge_data(self) -> tuple[str, str]:
        record = _read_json(self.root / DATA_RECORD)
        if record is None:
            return "changed", f"{self.root} holds no readable {DATA_RECORD}: it was not made by a recipe"
        difference = first_difference(record, self._data_record())
        if difference:
            return "changed", f"{self.root} was made with other generator settings ({difference})"
        return "done", ""

    def _make_data(self, state: str) -> int:
        from swintormer.core.files import atomic_folder, remove_stale_temporaries

        def make() -> int:
            if state == "changed":
                _remove(self.root)
            # DIR/data appears whole or not at all (atomic_folder), so the generator only ever
            # writes into a new folder; what a killed data step left beside it goes first.
            for stale in remove_stale_temporaries(self.output, self.root.name):
                self.say(f"removed {stale}, left by an interrupted data step")
            generator = _load_generator()
            try:
                with atomic_folder(self.root) as staged:
                    sets = staged / ".sets"  # each set's own folder; its splits move up into the root
                    for index, item in enumerate(self.config.data.synthetic):
                        made = sets / f"set{index}"
                        code = generator.main(["--out", str(made), *item.generator_arguments()])
                        if code:
                            raise _DataStepFailed(code)
                        for split, name in item.splits.items():
                            if not (made / split).is_dir():
                                print(f"error: synthetic set {index}: the generator made no {split!r} split",
                                      file=sys.stderr)
                                raise _DataStepFailed(1)
                            (made / split).rename(staged / name)
                            if (made / "manifest.json").is_file():
                                shutil.copyfile(made / "manifest.json", staged / name / "generator_manifest.json")
                    _remove(sets)
                    (staged / DATA_RECORD).write_text(json.dumps(self._data_record(), indent=1) + "\n")
            except _DataStepFailed as failed:
                return failed.code
            return 0

        return self._on_main(make)

    # ------------------------------------------------------------------ stage one

    def _stage_one_argv(self, name: str, run: StageOneRun) -> list[str]:
        where = f"stage_one.{name}.overrides"
        overrides = flatten_overrides(run.overrides, where)
        if run.start_from is not None:
            _refuse_override(overrides, ["model.source"], where, "start_from sets it")
            overrides.append(f"model.source={self.output / 'stage1' / run.start_from / 'model'}")
        return ["--config", str(run.config), "--data", str(self.root), "--output", str(self.output / "stage1" / name),
                *overrides]

    def _add_stage_one_steps(self) -> None:
        from pipelines import train_prior

        for name, run in self.config.stage_one.items():
            key = f"stage1/{name}"
            argv = self._stage_one_argv(name, run)
            config = self._resolve(key, train_prior.PriorTrainConfig, train_prior, argv)
            needs = ["data"] + ([f"stage1/{run.start_from}"] if run.start_from else [])
            start = f", from stage1/{run.start_from}" if run.start_from else ""
            summary = f"train_prior {run.config.name}: {config.objective}, {config.train.max_steps} steps{start}"
            self._add_training_step(key, train_prior, argv, needs, summary,
                                    lambda config=config: _as_recorded(config))

    # ------------------------------------------------------------------ cache

    def _cache_argv(self) -> list[str]:
        cache = self.config.cache
        argv = ["--data", str(self.root), "--out", str(self.cache_dir), "--steps", str(cache.steps),
                "--eta", repr(cache.eta), "--mode", cache.mode, "--timestep-spacing", cache.timestep_spacing,
                "--seed", str(cache.seed), "--threads", str(cache.threads)]
        for field_name in ("tile", "tile_stride", "decode_tile", "decode_stride", "tile_batch"):
            value = getattr(cache, field_name)
            if value is not None:
                argv += ["--" + field_name.replace("_", "-"), str(value)]
        return argv

    def _prior_model(self) -> Path:
        return self.output / "stage1" / self.config.prior_run / "model"

    def _add_cache_step(self) -> None:
        cache = self.config.cache
        build = ["--prior", str(self._prior_model()), *self._cache_argv()]
        summary = (f"cache_priors from stage1/{self.config.prior_run}: T={cache.steps} {cache.timestep_spacing}, "
                   f"eta {cache.eta:g}, {cache.mode} mode, seed {cache.seed}, every split")
        self.steps.append(Step(
            "cache", [self.cache_dir], ["data", f"stage1/{self.config.prior_run}"], summary,
            [_command("pipelines.cache_priors", build)], self._judge_cache, self._make_cache))

    def _wanted_manifest(self) -> dict:
        from ldm_prior.cache import CacheSettings, manifest_dict
        from pipelines import cache_priors

        model = self._prior_model()
        if model not in self._fingerprints:
            from ldm_prior.model import load_prior

            self._fingerprints[model] = load_prior(str(model)).fingerprint()
        args = cache_priors.build_parser().parse_args(["--prior", str(model), *self._cache_argv()])
        try:
            sampling = cache_priors.sampling_settings(args).as_metadata()
        except cache_priors.UserError as exc:
            raise RecipeError(f"cache: {exc}") from None
        settings = CacheSettings(prior_fingerprint=self._fingerprints[model], sampling=sampling,
                                 seed=self.config.cache.seed)
        return manifest_dict(settings, self.root)

    def _judge_cache(self) -> tuple[str, str]:
        from ldm_prior.cache import SETTINGS_KEYS, PriorCacheError, read_manifest
        from pipelines import cache_priors

        try:
            found = read_manifest(self.cache_dir)
        except PriorCacheError:
            return "changed", f"{self.cache_dir} is not a prior cache (no readable manifest.json)"
        wanted = self._wanted_manifest()
        for key in SETTINGS_KEYS:
            there, asked = found["settings"].get(key), wanted["settings"][key]
            if there != asked:
                return "changed", (f"{self.cache_dir} was made with other settings ({key} is {there!r} there, "
                                   f"the recipe asks for {asked!r})")
        if found["data_root"] != wanted["data_root"]:
            return "changed", f"{self.cache_dir} holds the priors of {found['data_root']}, not of {wanted['data_root']}"
        output = io.StringIO()
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            code = cache_priors.main([*self._cache_argv(), "--verify"])
        if code == 0:
            return "done", ""
        lines = [line for line in output.getvalue().splitlines() if line.startswith("verified")]
        return "resume", (lines[-1] if lines else f"cache_priors --verify exit code {code}")

    def _make_cache(self, state: str) -> int:
        from pipelines import cache_priors

        if state == "changed":
            code = self._on_main(lambda: _remove(self.cache_dir))
            if code:
                return code
        return cache_priors.main(["--prior", str(self._prior_model()), *self._cache_argv()])

    # ------------------------------------------------------------------ stage two

    def _stage_two_argv(self, name: str, run: StageTwoRun) -> list[str]:
        where = f"stage_two.{name}.overrides"
        overrides = flatten_overrides(run.overrides, where)
        decided = ["model.in_channels"]
        added = [f"model.in_channels={6 if run.prior else 3}"]
        if run.prior:
            cache = self.config.cache
            decided += ["data.prior.source", "data.prior.path", "data.prior.data_root", "data.prior.expected"]
            added += ["data.prior.source=cache", f"data.prior.path={self.cache_dir}",
                      # held to the recipe's cache settings; the rest is filled from the cache by the run
                      f"data.prior.expected.steps={cache.steps}", f"data.prior.expected.eta={cache.eta!r}",
                      f"data.prior.expected.mode={cache.mode}",
                      f"data.prior.expected.timestep_spacing={cache.timestep_spacing}",
                      f"data.prior.expected.seed={cache.seed}"]
        _refuse_override(overrides, decided, where, f"'prior: {str(run.prior).lower()}' sets it")
        return ["--config", str(run.config), "--data", str(self.root), "--output", str(self.output / "stage2" / name),
                *overrides, *added]

    def _add_stage_two_steps(self) -> None:
        from pipelines import train_swintormer

        for name, run in self.config.stage_two.items():
            key = f"stage2/{name}"
            argv = self._stage_two_argv(name, run)
            config = self._resolve(key, train_swintormer.SwintormerTrainConfig, train_swintormer, argv)
            needs = ["data"] + (["cache"] if run.prior else [])
            channels = "6 channels: blurry ⊕ cached prior" if run.prior else "3 channels: no prior"
            summary = f"train_swintormer {run.config.name}: {channels}, {config.train.max_steps} steps"
            self._add_training_step(key, train_swintormer, argv, needs, summary,
                                    lambda key=key, config=config: self._stage_two_wanted(key, config))

    def _stage_two_wanted(self, key: str, config: Any) -> Any:
        """The config a stage-two run records: with a cache, the run fills the prior settings it
        was not given from the cache's manifest, so the same is done here."""
        from pipelines import train_swintormer

        config = config.model_copy(deep=True)
        try:
            train_swintormer.prior_source(config)
        except ConfigError as exc:
            raise RecipeError(f"step {key}: {exc}") from None
        return _as_recorded(config)

    # ------------------------------------------------------------------ training steps

    def _resolve(self, key: str, schema: type, module: Any, argv: list[str]) -> Any:
        """The config a training step will run, resolved as the pipeline resolves it."""
        from pipelines.training_setup import load_run_config

        try:
            config, _ = load_run_config(schema, module.build_parser(), argv)
        except ConfigError as exc:
            raise RecipeError(f"step {key}: {exc}") from None
        return config

    def _add_training_step(self, key: str, pipeline: Any, argv: list[str], needs: list[str], summary: str,
                           wanted: Callable[[], Any]) -> None:
        """A step that runs ``pipeline.main`` in ``DIR/<key>``; ``wanted`` gives the config the
        run must have recorded for the step to count as done."""
        folder = self.output / key
        self.steps.append(Step(
            key, [folder], needs, summary, [_command(pipeline.__name__, [*argv, "--resume", "auto"])],
            lambda: self._judge_training(folder, wanted()),
            lambda state: self._train(pipeline.main, argv, state)))

    def _judge_training(self, folder: Path, wanted: Any) -> tuple[str, str]:
        record = folder / "config.yaml"
        if not record.is_file():
            if not _is_empty(folder / "checkpoints"):
                return "changed", f"{folder} holds checkpoints but no config.yaml"
            # What a run stopped before writing its config leaves: --resume auto clears it (and
            # refuses files no run writes).
            return "run", ""
        try:
            found = yaml.safe_load(record.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            return "changed", f"{record} is unreadable"
        difference = first_difference(found, wanted)
        if difference:
            return "changed", f"{folder} was made with other settings ({difference})"
        status = _read_json(folder / "status.json") or {}
        if status.get("state") == "finished" and (folder / "model").is_dir():
            return "done", ""
        where = f"{status.get('state', 'no status')} at step {status.get('step', '?')} of {status.get('max_steps', '?')}"
        return "resume", where

    def _train(self, main: Callable[[list[str]], int], argv: list[str], state: str) -> int:
        flags = ["--overwrite"] if state == "changed" else ["--resume", "auto"]
        return main([*argv, *flags])

    # ------------------------------------------------------------------ evaluation

    def _rows(self) -> list[dict]:
        cache = self.config.cache
        rows = [{"key": "blurry", "label": "blurry input"},
                {"key": "prior", "label": f"prior alone (stage one, T={cache.steps} {cache.timestep_spacing})"}]
        for name, run in self.config.stage_two.items():
            rows.append({"key": f"stage2/{name}", "label": run.label or name, "prior": run.prior})
        return rows

    def _eval_settings(self) -> dict:
        evaluation = self.config.evaluation
        return {"splits": evaluation.splits, "metrics": evaluation.metrics,
                "lpips_alexnet": str(evaluation.lpips_alexnet) if evaluation.lpips_alexnet else None,
                "tile": evaluation.tile, "stride": evaluation.stride, "whole": evaluation.whole, "rows": self._rows()}

    def _add_evaluation_step(self) -> None:
        evaluation = self.config.evaluation
        rows = self._rows()
        summary = (f"{', '.join(evaluation.splits)}: {', '.join(evaluation.metrics)} of {len(rows)} rows "
                   f"(blurry input, prior alone, {', '.join(self.config.stage_two)})")
        commands = []
        for split in evaluation.splits:
            try:  # the data may not exist yet: the plan then shows where the folders will be
                blurry, sharp = self._split_folders(split)
            except RecipeError:
                blurry, sharp = self.root / split / "BLURRY", self.root / split / "SHARP"
            prior_pngs = self.eval_dir / "prior"
            commands.append(_command("pipelines.cache_priors", ["--data", str(self.root), "--out", str(self.cache_dir),
                                                                "--export", str(prior_pngs), "--split", split]))
            for name, run in self.config.stage_two.items():
                commands.append(_command("pipelines.deblur", self._deblur_argv(name, run, blurry, split)))
            for row in rows:
                restored = {"blurry": blurry, "prior": prior_pngs / split}.get(
                    row["key"], self.eval_dir / row["key"] / split)
                report = self.eval_dir / row["key"] / f"{split}.json"
                commands.append(_command("pipelines.evaluate", self._evaluate_argv(restored, sharp, report)))
        needs = ["data", "cache", *(f"stage2/{name}" for name in self.config.stage_two)]
        self.steps.append(Step("eval", [self.eval_dir, self.output / "results.json", self.output / "results.md"],
                               needs, summary, commands, self._judge_evaluation, self._evaluate))

    def _deblur_argv(self, name: str, run: StageTwoRun, blurry: Path, split: str) -> list[str]:
        evaluation = self.config.evaluation
        argv = [str(blurry), "--output", str(self.eval_dir / "stage2" / name / split),
                "--model", str(self.output / "stage2" / name / "model"), "--skip-existing"]
        if run.prior:
            argv += ["--prior-cache", str(self.cache_dir)]
        if evaluation.tile is not None:
            argv += ["--tile", str(evaluation.tile)]
        if evaluation.stride is not None:
            argv += ["--stride", str(evaluation.stride)]
        if evaluation.whole:
            argv.append("--whole")
        return argv

    def _evaluate_argv(self, restored: Path, target: Path, report: Path) -> list[str]:
        evaluation = self.config.evaluation
        argv = ["--restored", str(restored), "--target", str(target), "--report", str(report), "--quiet"]
        if "lpips" not in evaluation.metrics:
            argv.append("--no-lpips")
        elif evaluation.lpips_alexnet is not None:
            argv += ["--lpips-alexnet", str(evaluation.lpips_alexnet)]
        return argv

    def _judge_evaluation(self) -> tuple[str, str]:
        wanted = self._eval_settings()
        results = _read_json(self.output / "results.json")
        if results is not None:
            difference = first_difference(results.get("settings"), wanted)
            if difference:
                return "changed", f"{self.output / 'results.json'} was made with other settings ({difference})"
            return "done", ""
        if (self.output / "results.md").exists():
            return "changed", f"{self.output / 'results.md'} exists without results.json"
        if _is_empty(self.eval_dir):
            return "run", ""
        recorded = _read_json(self.eval_dir / EVAL_SETTINGS)
        difference = first_difference(recorded, wanted) if recorded is not None else "no settings.json"
        if difference:
            return "changed", f"{self.eval_dir} was made with other settings ({difference})"
        return "resume", ""

    def _split_folders(self, split: str) -> tuple[Path, Path]:
        """The blurry and the sharp folder of a split (restorations are matched to targets by
        file stem, so a pair's two files must share it)."""
        from swintormer.core.data.paired import discover_pairs

        folder = self.root / split
        try:
            pairs = discover_pairs(folder, check_sizes=False).pairs
        except (FileNotFoundError, ValueError) as exc:
            raise RecipeError(f"evaluation split {split}: {exc}") from None
        if not pairs:
            raise RecipeError(f"evaluation split {split}: no blurry/sharp pairs in {folder}")
        blurry = {pair.blurry.parent for pair in pairs}
        sharp = {pair.sharp.parent for pair in pairs}
        if len(blurry) != 1 or len(sharp) != 1:
            raise RecipeError(f"evaluation split {split}: its blurry (or sharp) images lie in several folders")
        mismatch = next((pair for pair in pairs if pair.blurry.stem != pair.sharp.stem), None)
        if mismatch is not None:
            raise RecipeError(f"evaluation split {split}: {mismatch.blurry.name} and {mismatch.sharp.name} differ "
                              "in stem; the evaluation matches restorations to targets by stem")
        return blurry.pop(), sharp.pop()

    def _evaluate(self, state: str) -> int:
        from pipelines import cache_priors, deblur

        evaluation = self.config.evaluation
        settings = self._eval_settings()

        def prepare() -> int:
            if state == "changed":
                for path in (self.eval_dir, self.output / "results.json", self.output / "results.md"):
                    _remove(path)
            self.eval_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.eval_dir / EVAL_SETTINGS, json.dumps(settings, indent=1) + "\n")
            return 0

        code = self._on_main(prepare)
        if code:
            return code
        reports: dict[str, dict[str, Path]] = {row["key"]: {} for row in settings["rows"]}
        for split in evaluation.splits:
            blurry, sharp = self._split_folders(split)
            for name, run in self.config.stage_two.items():
                self.say(f"deblurring {split} with stage2/{name}")
                code = self._agree(deblur.main(self._deblur_argv(name, run, blurry, split)))
                if code:
                    return code
            export = ["--data", str(self.root), "--out", str(self.cache_dir), "--export", str(self.eval_dir / "prior"),
                      "--split", split]
            code = self._on_main(lambda export=export: _quietly(cache_priors.main, export))
            if code:
                return code
            for row in settings["rows"]:
                restored = {"blurry": blurry, "prior": self.eval_dir / "prior" / split}.get(
                    row["key"], self.eval_dir / row["key"] / split)
                report = self.eval_dir / row["key"] / f"{split}.json"
                code = self._on_main(lambda restored=restored, report=report: self._score(restored, sharp, report))
                if code:
                    return code
                reports[row["key"]][split] = report
        return self._on_main(lambda: self._write_results(settings, reports))

    def _score(self, restored: Path, target: Path, report: Path) -> int:
        from pipelines import evaluate

        code = _quietly(evaluate.main, self._evaluate_argv(restored, target, report))
        scores = _read_json(report) if code == 0 else None
        if scores is not None:
            means = ", ".join(f"{METRIC_TITLES[m]} {scores['mean'][m]:.{METRIC_DIGITS[m]}f}"
                              for m in self.config.evaluation.metrics if m in scores["mean"])
            self.say(f"  scored {self._relative(restored)}: {means} ({scores['count']} images)")
        return code

    def _write_results(self, settings: dict, reports: dict[str, dict[str, Path]]) -> int:
        rows = []
        for row in settings["rows"]:
            scores = {}
            for split, path in reports[row["key"]].items():
                report = _read_json(path) or {}
                scores[split] = {"count": report.get("count"), **{m: report.get("mean", {}).get(m)
                                                                   for m in settings["metrics"]}}
            rows.append({**row, "scores": scores})
        results = {"recipe": str(self.recipe_path), "data_root": str(self.root), "settings": settings, "rows": rows}
        atomic_write_text(self.output / "results.md", format_results(results))
        atomic_write_text(self.output / "results.json", json.dumps(results, indent=1, allow_nan=False) + "\n")
        return 0

    # ------------------------------------------------------------------ processes

    def _on_main(self, action: Callable[[], int]) -> int:
        """Run ``action`` on the main process only; every process gets its exit code."""
        code = [0]
        if self.state.is_main_process:
            try:
                code = [int(action() or 0)]
            except Exception:  # the other processes must hear of it rather than wait forever
                traceback.print_exc()
                code = [1]
        if self.state.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(code)
        return code[0]

    def _agree(self, code: int) -> int:
        """One exit code for all processes: the first non-zero one any process returned."""
        if self.state.num_processes == 1:
            return code
        from accelerate.utils import gather_object

        return next((value for value in gather_object([code]) if value), 0)

    # ------------------------------------------------------------------ plan and run

    def judge(self) -> None:
        """Set every step's state: done/given, run, resume or changed (see the module docstring)."""
        states: dict[str, str] = {}
        for step in self.steps:
            if step.state != "given":
                waiting = [need for need in step.needs if states.get(need) not in ("done", "given")]
                if all(_is_empty(path) for path in step.outputs):
                    step.state, step.note = "run", ""
                elif waiting:
                    step.state, step.note = "changed", f"made from an earlier {waiting[0]}, which runs now"
                else:
                    step.state, step.note = step.judge()
            states[step.key] = step.state
        splits = self._available_splits()
        missing = [split for split in self.config.evaluation.splits if splits is not None and split not in splits]
        if missing:
            raise RecipeError(f"evaluation.splits: {missing[0]!r} is not a split of the dataset root "
                              f"({', '.join(sorted(splits)) or 'none'})")

    def _available_splits(self) -> set[str] | None:
        if self.synthetic and not (self.root / DATA_RECORD).is_file():
            return {name for item in self.config.data.synthetic for name in item.splits.values()}
        if not self.root.is_dir():
            raise RecipeError(f"data root not found: {self.root}")
        return {child.name for child in self.root.iterdir() if child.is_dir()}

    def print_plan(self, commands: bool) -> None:
        words = {"done": "done, skip", "given": "given", "run": "run", "resume": "resume", "changed":
                 "redo" if self.overwrite_changed else "REFUSED"}
        self.say(f"recipe {self.recipe_path} → {self.output} ({len(self.steps)} steps)")
        width = max(len(step.key) for step in self.steps)
        for index, step in enumerate(self.steps, 1):
            note = f"  [{step.note}]" if step.note else ""
            self.say(f"{index:>3}. {step.key:<{width}}  {words[step.state]:<10} {step.summary}{note}")
            if commands:
                for command in step.commands:
                    self.say(f"        {command}")

    def refusal(self) -> str | None:
        changed = [step for step in self.steps if step.state == "changed"]
        if not changed or self.overwrite_changed:
            return None
        step = changed[0]
        more = f" ({len(changed) - 1} more step(s) likewise)" if len(changed) > 1 else ""
        return (f"step {step.key}: {step.note}; pass --overwrite-changed to redo it and the steps made from "
                f"it{more}")

    def run(self) -> int:
        """Run the steps in order; ``DIR/status.json`` says how it ended (for job scripts, whose
        launcher may replace the exit code)."""
        from swintormer.core.run_control import RunFolderError, RunFolderLock, answer_from_main_process

        # A second recipe on this folder would start the same steps beside the first one.
        lock = RunFolderLock(self.output, what="recipe folder")

        def take_lock() -> None:
            lock.acquire()

        _, refused = answer_from_main_process(self.state, take_lock, catch=(RunFolderError,))
        if refused is not None:
            self.say(f"error: {refused}", error=True)
            return EXIT_BAD_SETTINGS
        try:
            return self._run_locked()
        finally:
            lock.release()

    def _run_locked(self) -> int:
        from swintormer.core.run_control import EXIT_STOPPED, write_status

        if self.state.is_main_process:
            save_config(self.config, self.output / "recipe.yaml")
            write_status(self.output, "running", steps=len(self.steps))
        self.state.wait_for_everyone()
        try:
            code, key = self._run_steps()
        except RecipeError as exc:
            self.say(f"error: {exc}", error=True)
            code, key = EXIT_BAD_SETTINGS, "eval"
        if self.state.is_main_process:
            state = "finished" if code == 0 else "stopped" if code == EXIT_STOPPED else "failed"
            write_status(self.output, state, step=key, exit_code=code)
        if code == 0:
            results = _read_json(self.output / "results.json")
            if results is not None:
                self.say()
                self.say(format_results(results))
                self.say(f"results: {self.output / 'results.md'}, {self.output / 'results.json'}")
        return code

    def _run_steps(self) -> tuple[int, str | None]:
        """(exit code, the step it stopped at, or None when every step is done)."""
        from swintormer.core.run_control import EXIT_STOPPED, signal_name, stop_signals
        from swintormer.core.training import format_duration

        total = len(self.steps)
        with stop_signals() as signals:
            for index, step in enumerate(self.steps, 1):
                if signals.requested is not None:
                    self.say(f"recipe stopped by {signal_name(signals.requested)} before step {step.key}; rerun the "
                             "same command to continue", error=True)
                    return EXIT_STOPPED, step.key
                if step.state in ("done", "given"):
                    self.say(f"[{index}/{total}] {step.key}: {'done' if step.state == 'done' else 'given'}, skipped")
                    continue
                verb = {"run": "running", "resume": "resuming", "changed": "redoing"}[step.state]
                self.say(f"[{index}/{total}] {step.key}: {verb}: {step.summary}")
                started = time.monotonic()
                code = self._agree(step.run(step.state))
                self.state.wait_for_everyone()
                if code == EXIT_STOPPED:
                    self.say(f"recipe stopped in step {step.key} (exit code {code}, its state saved); rerun the same "
                             "command to continue", error=True)
                    return code, step.key
                if code:
                    self.say(f"error: step {step.key} failed (exit code {code}); the recipe stopped there. Fix the "
                             "cause and rerun the same command: the steps done are skipped", error=True)
                    return code, step.key
                self.say(f"[{index}/{total}] {step.key}: finished in {format_duration(time.monotonic() - started)}")
        return 0, None


# --------------------------------------------------------------------------- module helpers


def _refuse_override(overrides: list[str], keys: list[str], where: str, why: str) -> None:
    for item in overrides:
        key = item.partition("=")[0]
        for decided in keys:
            if key == decided or key.startswith(decided + ".") or decided.startswith(key + "."):
                raise RecipeError(f"{where}: {key} is decided by the recipe ({why})")


def _quietly(main: Callable[[list[str]], int], argv: list[str]) -> int:
    """Run a pipeline's ``main`` without its table on stdout (its errors still reach stderr)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return main(argv)


def _load_generator() -> Any:
    """``tools/make_synthetic_blur.py`` (a script of the source tree, not of the package)."""
    if not GENERATOR.is_file():
        raise RecipeError(f"data.synthetic needs {GENERATOR} (a source checkout of the project)")
    spec = importlib.util.spec_from_file_location("make_synthetic_blur", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def format_results(results: dict) -> str:
    """The results table in Markdown: one row per method, a PSNR/SSIM/... column per split."""
    settings = results["settings"]
    splits, metrics = settings["splits"], settings["metrics"]
    header = ["method", *(f"{split} {METRIC_TITLES[metric]}" for split in splits for metric in metrics)]
    lines = [f"Scored on {', '.join(splits)} of {results['data_root']} by pipelines.evaluate (mean over the images; "
             "PSNR in dB).", "", "| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    for row in results["rows"]:
        cells = [row["label"]]
        for split in splits:
            scores = row["scores"].get(split, {})
            for metric in metrics:
                value = scores.get(metric)
                ok = isinstance(value, (int, float)) and math.isfinite(value)
                cells.append(f"{value:.{METRIC_DIGITS[metric]}f}" if ok else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def load_recipe(path: Path, overrides: list[str], data: Path | None) -> RecipeConfig:
    """The recipe file with its overrides, ``--data`` applied, and every path made absolute (a
    stage config against the recipe's folder, data paths against the current folder)."""
    try:
        recipe = load_config(RecipeConfig, path, overrides)
    except ConfigError as exc:
        raise RecipeError(str(exc)) from None
    if data is not None:
        recipe.data = DataSection(root=data)
    if recipe.data.root is None and not recipe.data.synthetic:
        raise RecipeError(f"{path}: the recipe names no data: pass --data ROOT (a dataset root with train/ and "
                          "test/ splits)")
    base = path.resolve().parent
    for run in [*recipe.stage_one.values(), *recipe.stage_two.values()]:
        run.config = run.config if run.config.is_absolute() else (base / run.config).resolve()
    if recipe.data.root is not None:
        recipe.data.root = recipe.data.root.resolve()
    for item in recipe.data.synthetic:
        if item.source is not None:
            item.source = item.source.resolve()
    if recipe.evaluation.lpips_alexnet is not None:
        recipe.evaluation.lpips_alexnet = recipe.evaluation.lpips_alexnet.resolve()
    return recipe


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recipe",
        description="Run a whole two-stage chain (data, stage-one runs, prior cache, stage-two runs, evaluation) "
                    "as one command, each step in its own folder of --output by the step's own pipeline. Steps "
                    "already done are skipped, interrupted ones resumed; a step folder made with other settings "
                    "is refused unless --overwrite-changed. Override any recipe value with key.sub=value "
                    "(parsed as YAML), e.g. stage_one.vq.overrides.train.max_steps=10 cache.steps=5.",
        epilog="Exit codes: 0 every step done; 75 a step was stopped by SIGTERM, SIGINT or SIGUSR1 with its state "
               "saved (rerun the same command to continue); 2 bad recipe or settings, or a refused step folder; "
               "other codes are the failing step's own (rerun the same command after fixing the cause).")
    parser.add_argument("--config", type=Path, required=True,
                        help="the recipe (YAML), e.g. configs/recipes/cpu_two_stage.yaml")
    parser.add_argument("--output", type=Path, required=True, help="folder of the steps' folders and the results")
    parser.add_argument("--data", type=Path, default=None,
                        help="an existing dataset root to use instead of the recipe's data (train/ and test/ splits)")
    parser.add_argument("--plan", action="store_true", help="print the plan and every step's command, run nothing")
    parser.add_argument("--overwrite-changed", action="store_true",
                        help="redo a step whose folder was made with other settings (deleting what it made there) "
                             "and the steps made from it, instead of refusing")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override a recipe value")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        recipe = load_recipe(args.config, args.overrides, args.data)
        runner = Recipe(recipe, args.config, args.output.resolve(), args.overwrite_changed)
        runner.judge()
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    runner.state.wait_for_everyone()  # every process has judged before anything changes
    runner.print_plan(commands=args.plan)
    refusal = runner.refusal()
    if refusal:
        runner.say(f"error: {refusal}", error=True)
        return EXIT_BAD_SETTINGS
    if args.plan:
        return 0
    return runner.run()


if __name__ == "__main__":
    from swintormer.core.run_control import exit_code_of_finished_job

    sys.exit(exit_code_of_finished_job(main()))
