"""Reproduce the papers' tables at CPU scale and regenerate ``BENCHMARKS.md`` with one command.

    python tools/benchmark.py                       # full profile: a few hours on a 2-core CPU
    python tools/benchmark.py --quick               # the same tables on a tiny budget, minutes
    python tools/benchmark.py --work runs/bench --markdown BENCHMARKS.md --json BENCHMARKS.json

Everything runs through the project's own commands, each in a fresh process whose wall time and
peak resident memory are recorded:

1. **Data** (``tools/make_synthetic_blur.py``): a training set of defocus and motion blur (one
   kernel family drawn per image) from the training split of scikit-image's bundled photos, and
   a defocus and a motion test set from the test split: photos that no model here trained on.
2. **Stage one** (``pipelines.train_prior``): a small VQGAN, then the conditional UNet, from
   random weights (no pretrained LDM can be downloaded), then ``pipelines.cache_priors`` for the
   training and test images at every DDIM step count T of the ablation.
3. **Stage two** (``pipelines.train_swintormer``): one run per ablation row with the same config
   file (``configs/benchmark/swintormer_<profile>.yaml``: same steps, batch, schedule), changed
   only by the row's own setting; headline rows are trained with several seeds.
4. **Scoring**: ``pipelines.deblur`` (sliding windows at the training size, unless the row says
   otherwise) and ``pipelines.evaluate`` (the project's PSNR/SSIM/MAE protocol) per test set,
   next to the blurry input, the priors themselves, Wiener and Richardson–Lucy with the true
   kernels (``tools/classical_baselines.py``) and the shipped default model.
5. **Cost**: parameters, GMACs at 256×256 (``swintormer.models.complexity``), and seconds per
   megapixel and peak memory of sliding-window inference measured in a fresh process per
   architecture; the prior's sampling time per megapixel from the cache job.
6. **Default model by kind of degradation** (``tools/evaluate_default_model.py``): the shipped
   default model (and, with ``--previous-default DIR``, the one it replaced) on fixed degraded
   sets of the real-photo corpus' test split (``--photo-corpus``, made by
   ``tools/make_photo_corpus.py``): uniform and varying defocus, motion, sharp photos with noise
   and clean, next to the blurry input and Wiener / Richardson–Lucy with the true kernels, plus
   the bokeh texture ratio on real out-of-focus backgrounds and a contact sheet
   (``docs/default_model_contact_sheet.png`` for the full profile). The step runs whenever the
   corpus folder exists, in the quick profile on 96-px crops with one defocus radius; without
   the corpus it is left out and the report says so (the corpus is built from Debian packages
   and scikit-image, so CI, which runs ``--quick``, does not need it).
7. **Speed table**: ``tools/benchmark_forward.py`` for the ``paper`` preset and the deblur command
   with the ``paper`` network (random weights) on a 1680×1120 and a 3840×2160 image, fp32 and
   bf16, with the fp32 matmul rate measured just before each.

Results go to ``--json`` and ``--markdown``; the Markdown is rendered from the JSON only, so every
figure in it comes from a command that this script ran. Finished steps are recorded under
``--work`` and skipped when the script is run again with the same arguments (delete the folder,
or pass ``--fresh``, to start over); a recorded step whose command or config file has changed
is an error rather than a stale reuse. Stage-two run names carry a hash of the stage-two config,
so a new stage-two budget retrains and rescores stage two in the same folder and reuses the rest. Losses that need pretrained backbones (VGG-19, MAE) use the
files given with ``--vgg-weights`` / ``--mae-weights``; without them the rows are trained with
random-weight backbones and labelled so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

PYTHON = sys.executable
TEST_SETS = ("defocus", "motion")


# --------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class Profile:
    """Budgets of one benchmark run. Every trained row of a profile shares its config file."""

    name: str
    max_size: int  # longer side of the photos (tools/make_synthetic_blur.py --max-size)
    train_per_image: int
    test_per_image: int
    swintormer_config: str
    prior_vq_config: str
    prior_unet_config: str
    prior_steps: tuple[int, ...]  # the ablation's DDIM step counts T
    headline_steps: int  # T of the headline (paper) configuration
    seeds: tuple[int, ...]  # training seeds of the headline rows
    strides: tuple[int, int]  # the inference ablation's two sliding-window strides
    speed_image: int  # side of the square image for the per-architecture inference cost
    forward_runs: int
    forward_size: int  # side of the square input of the `paper` forward timing
    forward_warmup: int
    deblur_sizes: tuple[tuple[int, int], ...]  # (width, height) for the speed table
    records: bool  # also run the standalone measurement tools (prior sampling, cache kill/resume, training step)
    default_eval_options: tuple[str, ...] = ()  # extra options of tools/evaluate_default_model.py
    # (width, height) of the default model's speed rows: 4K UHD and a 12-megapixel 4:3 photo
    default_speed_sizes: tuple[tuple[int, int], ...] = ((3840, 2160), (4000, 3000))


PROFILES = {
    "full": Profile(
        name="full", max_size=192, train_per_image=6, test_per_image=3,
        swintormer_config="configs/benchmark/swintormer_full.yaml",
        prior_vq_config="configs/benchmark/prior_vq_full.yaml",
        prior_unet_config="configs/benchmark/prior_unet_full.yaml",
        prior_steps=(5, 10, 20, 50), headline_steps=50, seeds=(0, 1), strides=(48, 32),
        speed_image=512, forward_runs=10, forward_size=256, forward_warmup=3,
        deblur_sizes=((1680, 1120), (3840, 2160)), records=True,
    ),
    "quick": Profile(
        name="quick", max_size=64, train_per_image=1, test_per_image=1,
        swintormer_config="configs/benchmark/swintormer_quick.yaml",
        prior_vq_config="configs/benchmark/prior_vq_quick.yaml",
        prior_unet_config="configs/benchmark/prior_unet_quick.yaml",
        prior_steps=(2, 4), headline_steps=4, seeds=(0,), strides=(24, 16),
        speed_image=128, forward_runs=1, forward_size=64, forward_warmup=1, deblur_sizes=((256, 192),),
        records=False,
        default_eval_options=("--crop", "96", "--radii", "4", "--sheet-tile", "64"),
        default_speed_sizes=((384, 256),),
    ),
}


@dataclass(frozen=True)
class Row:
    """One trained configuration of the ablation: a name, its group and its config overrides."""

    key: str
    group: str  # headline | attention | prior | loss | block
    label: str
    overrides: tuple[str, ...] = ()
    prior_steps: int | None = None  # None: the no-prior network (3 input channels)
    seeds: tuple[int, ...] = (0,)
    random_backbone: bool = False


def ablation_rows(profile: Profile, vgg_weights: Path | None, mae_weights: Path | None) -> list[Row]:
    """The paper's Table 6 at CPU scale, plus the loss and block-family rows of seeds 000 and 001."""
    T = profile.headline_steps
    seeds = profile.seeds
    rows = [
        Row("mixed_prior", "headline", f"mixed attention + prior (T={T}), L1 (paper)", prior_steps=T, seeds=seeds),
        Row("no_prior", "headline", "mixed attention, no prior", ("model.in_channels=3",), None, seeds),
        Row("window", "attention", "window attention only (SWDA)", ("model.overrides.attention=window",), T),
        Row("channel", "attention", "channel attention only (MDTA)", ("model.overrides.attention=channel",), T),
    ]
    rows += [Row(f"prior_T{t}", "prior", f"prior with T={t} DDIM steps", (), t) for t in profile.prior_steps if t != T]

    def backbone(option: str, path: Path | None) -> tuple[str, ...]:
        return (f"{option}={path}",) if path is not None else ("loss.allow_random_weights=true",)

    rows += [
        Row("loss_vgg", "loss", "L1 + 0.01·VGG-19 perceptual",
            ("loss.vgg={weight: 0.01}", *backbone("loss.vgg.weights_path", vgg_weights)), T,
            random_backbone=vgg_weights is None),
        Row("loss_mae_local", "loss", "L1 + 0.1·MAE local",
            ("loss.mae={local_weight: 0.1}", *backbone("loss.mae.weights_path", mae_weights)), T,
            random_backbone=mae_weights is None),
        Row("loss_mae_distribution", "loss", "L1 + 1e-4·MAE distribution",
            ("loss.mae={local_weight: 0.0, distribution_weight: 1.0e-4}", *backbone("loss.mae.weights_path", mae_weights)),
            T, random_backbone=mae_weights is None),
        Row("sparse_gated", "block", "sparse gated blocks (seed 001) + prior", ("model.preset=sparse_gated_small",), T),
    ]
    return rows


# --------------------------------------------------------------------------- running commands


class BenchmarkError(RuntimeError):
    """A step failed; the message names the command and its log."""


@dataclass
class Bench:
    """The work folder: runs each command once, records its cost, skips it when already done.

    ``run`` may be called from several threads at once (``--jobs``): each call waits on its own
    child process, and the record file is written under a lock.
    """

    work: Path
    threads: int
    quiet: bool = False
    records: dict[str, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    used: set[str] = field(default_factory=set)  # steps this report draws on (run now or reused)

    def __post_init__(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "logs").mkdir(exist_ok=True)
        record_file = self.work / "steps.json"
        if record_file.is_file():
            self.records = json.loads(record_file.read_text())

    def run(self, name: str, command: list[str], *, threads: int | None = None) -> dict[str, Any]:
        """Run ``command`` unless step ``name`` already finished with the same command and config
        files; returns its record. A step recorded with another command is an error, not reused."""
        fingerprint = _config_fingerprint(command)
        with self.lock:
            self.used.add(name)
        if name in self.records:
            recorded = self.records[name]
            if recorded["command"] != _display(command) or recorded.get("config_sha256") != fingerprint:
                raise BenchmarkError(f"step {name} in {self.work} was run with another command or config file; "
                                     "use a new --work folder or --fresh")
            return self.records[name]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads or self.threads), PYTHONHASHSEED="0")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        log_path = self.work / "logs" / f"{name}.log"
        if not self.quiet:
            print(f"[{_now()}] {name}", flush=True)
        start = time.perf_counter()
        with open(log_path, "w") as log:
            log.write("$ " + " ".join(command) + "\n")
            log.flush()
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)
            # wait4 gives this child's own resource use: its peak resident set size.
            _, status, usage = os.wait4(process.pid, 0)
            process.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        if process.returncode != 0:
            tail = log_path.read_text().strip().splitlines()[-3:]
            raise BenchmarkError(f"step {name} failed (exit {process.returncode}); see {log_path}: " + " | ".join(tail))
        record = {"command": _display(command), "config_sha256": fingerprint, "seconds": round(seconds, 2),
                  "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "finished_utc": _now()}
        with self.lock:
            self.records[name] = record
            _write_json(self.work / "steps.json", self.records)
        return record

    def output_of(self, name: str) -> str:
        return (self.work / "logs" / f"{name}.log").read_text()


def _config_fingerprint(command: list[str]) -> str | None:
    """SHA-256 of the config file a command names (with the command, what decides its result)."""
    import hashlib

    for option, value in zip(command, command[1:]):
        if option == "--config" and (REPO_ROOT / value).is_file():  # not a named configuration
            return hashlib.sha256((REPO_ROOT / value).read_bytes()).hexdigest()
    return None


def _display(command: list[str]) -> str:
    """The command as a reader would type it: ``python`` for this interpreter, paths from the repo."""
    shown = []
    for part in command:
        if part == PYTHON:
            part = "python"
        shown.append(part.replace(str(REPO_ROOT) + os.sep, ""))
    return " ".join(shown)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _write_json(path: Path, data: Any) -> None:
    from swintormer.core.files import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def matmul_gflops() -> float:
    from tools.benchmark_forward import matmul_gflops as measure

    return round(measure(), 1)


# --------------------------------------------------------------------------- the steps


def make_data(bench: Bench, profile: Profile) -> dict[str, Path]:
    """The training set (both kernel families) and the two test sets; returns their split folders."""
    data = bench.work / "data"
    common = ["--max-size", str(profile.max_size), "--quiet"]
    bench.run("data_train", [PYTHON, "tools/make_synthetic_blur.py", "--out", str(data / "train_both"), "--blur", "both",
                             "--seed", "0", "--per-image", str(profile.train_per_image), *common])
    for seed, blur in enumerate(TEST_SETS, start=1):
        bench.run(f"data_{blur}", [PYTHON, "tools/make_synthetic_blur.py", "--out", str(data / f"test_{blur}"),
                                   "--blur", blur, "--seed", str(seed), "--per-image", str(profile.test_per_image), *common])
    return {"train": data / "train_both" / "train", **{blur: data / f"test_{blur}" / "test" for blur in TEST_SETS}}


def train_prior(bench: Bench, profile: Profile, train: Path) -> Path:
    """Stage one from random weights: the VQGAN, then the conditional UNet on top of it."""
    runs = bench.work / "prior"
    bench.run("prior_vq", [PYTHON, "-m", "pipelines.train_prior", "--config", profile.prior_vq_config,
                           "--data", str(train), "--output", str(runs / "vq"), "--resume", "auto"])
    bench.run("prior_unet", [PYTHON, "-m", "pipelines.train_prior", "--config", profile.prior_unet_config,
                             "--data", str(train), "--output", str(runs / "unet"), "--resume", "auto",
                             f"model.source={runs / 'vq' / 'model'}"])
    return runs / "unet" / "model"


def cache_priors(bench: Bench, profile: Profile, prior_model: Path, splits: dict[str, Path]) -> dict[int, dict[str, Path]]:
    """A prior cache per (T, split), quarter conditioning, seed 0."""
    caches: dict[int, dict[str, Path]] = {}
    for steps in profile.prior_steps:
        caches[steps] = {}
        for split, folder in splits.items():
            out = bench.work / "priors" / f"T{steps}" / split
            bench.run(f"cache_T{steps}_{split}", [PYTHON, "-m", "pipelines.cache_priors", "--prior", str(prior_model),
                                                  "--data", str(folder), "--out", str(out), "--steps", str(steps),
                                                  "--mode", "quarter", "--seed", "0", "--threads", str(bench.threads)])
            caches[steps][split] = out
    return caches


def export_priors(bench: Bench, name: str, cache: Path, split: Path) -> Path:
    """The cached priors of ``split`` as 16-bit PNGs named after their images, for scoring like
    any output."""
    out = bench.work / "outputs" / name
    bench.run(f"export_{name}", [PYTHON, "-m", "pipelines.cache_priors", "--data", str(split), "--out", str(cache),
                                 "--export", str(out)])
    return out


def score(bench: Bench, name: str, restored: Path, test_split: Path) -> dict[str, float]:
    report = bench.work / "scores" / f"{name}.json"
    report.parent.mkdir(exist_ok=True)
    bench.run(f"score_{name}", [PYTHON, "-m", "pipelines.evaluate", "--restored", str(restored), "--target",
                                str(test_split), "--report", str(report), "--no-lpips", "--quiet"])
    means = json.loads(report.read_text())["mean"]
    return {metric: round(float(means[metric]), 4) for metric in ("psnr", "ssim", "mae")}


def deblur_and_score(bench: Bench, name: str, model: Path, test_split: Path, options: list[str]) -> dict[str, float]:
    out = bench.work / "outputs" / name
    bench.run(f"deblur_{name}", [PYTHON, "-m", "pipelines.deblur", str(test_split / "inputC"), "--output", str(out),
                                 "--model", str(model), "--device", "cpu", "--no-progress", *options])
    return score(bench, name, out, test_split)


def model_cost(bench: Bench, model: Path, tile: int, size: int) -> dict[str, float]:
    """Parameters, GMACs at 256×256, and inference s/MP and peak memory (fresh process, sliding windows).

    Cost depends on the architecture, not the weights: it is measured once per architecture, on
    a copy of the network with random weights, so rows that share an architecture share one
    measurement (and one command).
    """
    import torch

    from swintormer.models import Swintormer
    from swintormer.models.swintormer import load_config_file

    config = load_config_file(model / "config.json")
    key = "cost_arch_" + _short_hash(json.dumps(config.to_dict(), sort_keys=True) + f"{tile}/{size}")
    probe = bench.work / "cost" / key
    if not (probe / "config.json").is_file():
        torch.manual_seed(0)
        Swintormer(config).save_pretrained(probe)
    record = bench.run(key, [PYTHON, str(Path(__file__).resolve()), "--measure-inference", str(probe),
                             "--tile", str(tile), "--size", str(size)])
    measured = json.loads(bench.output_of(key).strip().splitlines()[-1])
    return {**measured, "peak_rss_mib": record["peak_rss_mib"]}


def _short_hash(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:10]


def measure_inference(model_dir: Path, tile: int, size: int) -> dict[str, float]:
    """(Run in its own process.) Sliding-window inference of a random ``size``² image at ``tile``."""
    import numpy as np
    import torch

    from swintormer.inference import SlidingWindowInferencer
    from swintormer.models import Swintormer
    from swintormer.models.complexity import count_macs

    model = Swintormer.from_pretrained(model_dir)
    channels = model.config.in_channels
    with torch.device("meta"):
        meta = Swintormer(model.config)
    macs = count_macs(meta, torch.empty(1, channels, 256, 256, device="meta")).total
    inferencer = SlidingWindowInferencer(model, tile=tile, batch_size=1, progress=False)
    image = np.random.default_rng(0).random((size, size, channels), dtype=np.float32)
    inferencer(image[:tile, :tile])  # warm-up: the first call of each kernel pays one-off setup
    start = time.perf_counter()
    inferencer(image)
    seconds = time.perf_counter() - start
    return {"parameters": sum(p.numel() for p in model.parameters()), "gmacs_256": round(macs / 1e9, 3),
            "seconds_per_mp": round(seconds / (size * size / 1e6), 3)}


def stage_two_tag(profile: Profile) -> str:
    """A short hash of the stage-two config file, part of every run and output name of stage two.

    Editing the stage-two budget thus retrains and rescores stage two in the same work folder,
    while the data, the prior, its caches and the other measurements are reused.
    """
    import hashlib

    return hashlib.sha256((REPO_ROOT / profile.swintormer_config).read_bytes()).hexdigest()[:8]


def run_ablation(bench: Bench, profile: Profile, rows: list[Row], caches: dict[int, dict[str, Path]],
                 splits: dict[str, Path], tile: int, jobs: int) -> list[dict[str, Any]]:
    """Train every row (``jobs`` at a time, the cores shared out between them), then score each."""
    tag = stage_two_tag(profile)
    trainings = []
    for row in rows:
        for seed in row.seeds:
            run_name = f"{row.key}_s{seed}_{tag}"
            command = [PYTHON, "-m", "pipelines.train_swintormer", "--config", profile.swintormer_config,
                       "--data", str(splits["train"]), "--output", str(bench.work / "runs" / run_name), "--resume", "auto",
                       f"train.seed={seed}", *row.overrides]
            if row.prior_steps is not None:
                command.append(f"data.prior.path={caches[row.prior_steps]['train']}")
            trainings.append((f"train_{run_name}", command))
    threads = max(1, bench.threads // jobs)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in [pool.submit(bench.run, name, command, threads=threads) for name, command in trainings]:
            future.result()  # re-raises the first failure
    results = []
    for row in rows:
        for seed in row.seeds:
            run_name = f"{row.key}_s{seed}_{tag}"
            run_dir = bench.work / "runs" / run_name
            train_record = bench.records[f"train_{run_name}"]
            model = run_dir / "model"
            prior_options = [] if row.prior_steps is None else ["--prior-cache"]
            scores = {}
            for test_set in TEST_SETS:
                options = ["--tile", str(tile)]
                if row.prior_steps is not None:
                    options += [*prior_options, str(caches[row.prior_steps][test_set])]
                scores[test_set] = deblur_and_score(bench, f"{run_name}_{test_set}", model, splits[test_set], options)
            results.append({"row": row.key, "group": row.group, "label": row.label, "seed": seed,
                            "prior_steps": row.prior_steps, "random_backbone": row.random_backbone,
                            "train_seconds": train_record["seconds"], "scores": scores,
                            "cost": model_cost(bench, model, tile, profile.speed_image)})
    return results


def run_inference_ablation(bench: Bench, profile: Profile, caches: dict[int, dict[str, Path]],
                           splits: dict[str, Path], tile: int) -> list[dict[str, Any]]:
    """The headline models deblurred whole (padded) and with sliding windows at two strides."""
    results = []
    T = profile.headline_steps
    tag = stage_two_tag(profile)
    modes = [("whole", "whole image, padded", ["--whole"])]
    modes += [(f"stride{s}", f"sliding {tile}×{tile}, stride {s}", ["--tile", str(tile), "--stride", str(s)])
              for s in profile.strides]
    for seed in profile.seeds:
        run_name = f"mixed_prior_s{seed}_{tag}"
        model = bench.work / "runs" / run_name / "model"
        for key, label, options in modes:
            scores = {}
            for test_set in TEST_SETS:
                prior = ["--prior-cache", str(caches[T][test_set])]
                scores[test_set] = deblur_and_score(bench, f"inference_{key}_{run_name}_{test_set}", model,
                                                    splits[test_set], options + prior)
            results.append({"row": key, "label": label, "seed": seed, "scores": scores})
    return results


def run_references(bench: Bench, profile: Profile, caches: dict[int, dict[str, Path]],
                   splits: dict[str, Path]) -> list[dict[str, Any]]:
    """Methods that are not trained here: the blurry input, classical deconvolution, the priors, the shipped model."""
    results = []
    for test_set in TEST_SETS:
        split = splits[test_set]
        results.append({"method": "blurry input", "test_set": test_set,
                        "scores": score(bench, f"blurry_{test_set}", split / "inputC", split)})
        out = bench.work / "outputs" / f"classical_{test_set}"
        record = bench.run(f"classical_{test_set}", [PYTHON, "tools/classical_baselines.py", "--data", str(split),
                                                     "--out", str(out), "--quiet"])
        images = len(list((split / "inputC").iterdir()))
        for method, label in (("wiener", "Wiener, true kernel"), ("richardson_lucy", "Richardson–Lucy (30 it.), true kernel")):
            results.append({"method": label, "test_set": test_set, "run_seconds_both_methods": record["seconds"],
                            "images": images, "scores": score(bench, f"{method}_{test_set}", out / method, split)})
        for steps in profile.prior_steps:
            exported = export_priors(bench, f"prior_T{steps}_{test_set}", caches[steps][test_set], split)
            results.append({"method": f"prior alone (T={steps})", "test_set": test_set,
                            "scores": score(bench, f"prior_T{steps}_{test_set}", exported, split)})
        shipped = REPO_ROOT / "swintormer" / "weights" / "default"
        results.append({"method": "shipped default model (no prior)", "test_set": test_set,
                        "scores": deblur_and_score(bench, f"shipped_{test_set}", shipped, split, [])})
    return results


def default_model_by_kind(bench: Bench, profile: Profile, corpus: Path, previous: Path | None) -> dict[str, Any] | None:
    """The shipped default model (and the previous default, if given) by kind of degradation on
    the photo corpus' test split (``tools/evaluate_default_model.py``); None without the corpus."""
    if not (corpus / "manifest.json").is_file():
        return None
    out = bench.work / "default_by_kind"
    sheet = (REPO_ROOT / "docs" / "default_model_contact_sheet.png" if profile.name == "full"
             else out / "contact_sheet.png")
    command = [PYTHON, "tools/evaluate_default_model.py", "--corpus", str(corpus), "--out", str(out),
               "--model", f"shipped={REPO_ROOT / 'swintormer' / 'weights' / 'default'}", "--sheet", str(sheet)]
    if previous is not None:
        command += ["--model", f"previous={previous}"]
    record = bench.run("default_by_kind", [*command, *profile.default_eval_options, "--quiet"])
    report = json.loads((out / "report.json").read_text())
    return {"command": record["command"], "seconds": record["seconds"], "report": report}


def default_model_speed(bench: Bench, profile: Profile, previous: Path | None) -> list[dict[str, Any]]:
    """Seconds per megapixel and peak memory of ``swintormer deblur`` with the shipped default
    model (and the previous default, if given) at its own defaults (the window size its
    pipeline.json records), fp32 and bf16, one fresh process per case."""
    models = {"shipped": REPO_ROOT / "swintormer" / "weights" / "default"}
    if previous is not None:
        models["previous"] = previous
    images = bench.work / "default_speed" / "images"
    sizes = profile.default_speed_sizes
    if not all((images / f"{width}x{height}.jpg").is_file() for width, height in sizes):
        _write_photo_inputs(images, sizes)
    rows = []
    for label, model in models.items():
        for width, height in sizes:
            for precision in ("fp32", "bf16"):
                name = f"default_speed_{label}_{width}x{height}_{precision}"
                rate = matmul_gflops() if name not in bench.records else None
                out = bench.work / "default_speed" / f"out_{label}_{precision}"
                shutil.rmtree(out, ignore_errors=True)  # the command refuses to overwrite
                record = bench.run(name, [PYTHON, "-m", "pipelines.deblur", str(images / f"{width}x{height}.jpg"),
                                          "--output", str(out), "--model", str(model), "--precision", precision,
                                          "--device", "cpu", "--no-progress"])
                if "matmul_gflops" not in record:
                    record["matmul_gflops"] = rate
                    _write_json(bench.work / "steps.json", bench.records)
                rows.append({"model": label, "path": _display([str(model)]), "image": f"{width}×{height}",
                             "precision": precision, "seconds": record["seconds"],
                             "seconds_per_mp": round(record["seconds"] / (width * height / 1e6), 2),
                             "peak_rss_mib": record["peak_rss_mib"], "matmul_gflops": record["matmul_gflops"],
                             "command": record["command"], "finished_utc": record["finished_utc"]})
    return rows


def _write_photo_inputs(images: Path, sizes: tuple[tuple[int, int], ...]) -> None:
    """A blurry sample photo resized to each (width, height), as a JPEG like a camera's."""
    import cv2
    import numpy as np
    from PIL import Image

    from swintormer.core.image_io import read_image

    photo = read_image(REPO_ROOT / "samples" / "coffee_04_blurry.png").pixels
    images.mkdir(parents=True, exist_ok=True)
    for width, height in sizes:
        resized = np.clip(cv2.resize(photo, (width, height), interpolation=cv2.INTER_CUBIC), 0, 1)
        Image.fromarray(np.rint(resized * 255).astype(np.uint8)).save(images / f"{width}x{height}.jpg", quality=92)


def prior_sampling_cost(bench: Bench, profile: Profile, splits: dict[str, Path]) -> list[dict[str, float]]:
    """Seconds per megapixel of the cache job (sampling + decode + writing) on the test images, per T."""
    from swintormer.core.image_io import read_image

    megapixels = 0.0
    for test_set in TEST_SETS:
        for path in sorted((splits[test_set] / "inputC").iterdir()):
            height, width = read_image(path).pixels.shape[:2]
            megapixels += height * width / 1e6
    rows = []
    for steps in profile.prior_steps:
        seconds = sum(bench.records[f"cache_T{steps}_{test_set}"]["seconds"] for test_set in TEST_SETS)
        rows.append({"steps": steps, "seconds": round(seconds, 2), "megapixels": round(megapixels, 4),
                     "seconds_per_mp": round(seconds / megapixels, 1)})
    return rows


def speed_table(bench: Bench, profile: Profile) -> dict[str, Any]:
    """The ``paper`` forward (tools/benchmark_forward.py) and the deblur command on large images."""
    forward_json = bench.work / "speed" / "forward.json"
    forward_json.parent.mkdir(exist_ok=True)
    side = str(profile.forward_size)
    bench.run("speed_forward", [PYTHON, "tools/benchmark_forward.py", "--preset", "paper", "--size", side, side,
                                "--warmup", str(profile.forward_warmup), "--runs", str(profile.forward_runs),
                                "--json", str(forward_json)])
    forward = json.loads(forward_json.read_text())
    model = bench.work / "speed" / "paper_random"
    images = bench.work / "speed" / "images"
    if not (model / "config.json").is_file() or not images.is_dir():
        _write_speed_inputs(model, images, profile.deblur_sizes)
    deblur = []
    for width, height in profile.deblur_sizes:
        for precision in ("fp32", "bf16"):
            name = f"speed_deblur_{width}x{height}_{precision}"
            if name not in bench.records:
                rate = matmul_gflops()
            record = bench.run(name, [PYTHON, "-m", "pipelines.deblur", str(images / f"{width}x{height}.png"),
                                      "--output", str(bench.work / "speed" / f"out_{precision}"), "--model", str(model),
                                      "--prior-folder", str(images / "priors"), "--precision", precision,
                                      "--batch", "1", "--device", "cpu", "--no-progress"])
            if "matmul_gflops" not in record:
                record["matmul_gflops"] = rate
                _write_json(bench.work / "steps.json", bench.records)
            deblur.append({"image": f"{width}×{height}", "precision": precision, "seconds": record["seconds"],
                           "seconds_per_mp": round(record["seconds"] / (width * height / 1e6), 2),
                           "peak_rss_mib": record["peak_rss_mib"], "matmul_gflops": record["matmul_gflops"],
                           "command": record["command"]})
    return {"forward": forward, "forward_command": bench.records["speed_forward"]["command"], "deblur": deblur}


def _write_speed_inputs(model_dir: Path, images: Path, sizes: tuple[tuple[int, int], ...]) -> None:
    """The ``paper`` network with random weights (seed 0) and a photo resized to each speed size."""
    import cv2
    import numpy as np
    import torch

    from swintormer.core.image_io import read_image, write_image
    from swintormer.models import Swintormer, SwintormerConfig

    torch.manual_seed(0)
    Swintormer(SwintormerConfig.preset("paper")).save_pretrained(model_dir)
    photo = read_image(REPO_ROOT / "samples" / "coffee_04_blurry.png").pixels
    (images / "priors").mkdir(parents=True, exist_ok=True)
    for width, height in sizes:
        resized = np.clip(cv2.resize(photo, (width, height), interpolation=cv2.INTER_CUBIC), 0, 1)
        write_image(images / f"{width}x{height}.png", resized, bit_depth=8)
        # The timing is of the network: the blurry image stands in for its prior.
        write_image(images / "priors" / f"{width}x{height}.png", resized, bit_depth=8)


def other_records(bench: Bench) -> list[dict[str, str]]:
    """The standalone measurement tools, run as they are; their output is quoted verbatim."""
    tools = [
        ("Prior sampling, `ldm-sr4x` architecture, random weights, T = 50", "prior_sampling",
         [PYTHON, "tools/benchmark_prior_sampling.py", "--config", "ldm-sr4x", "--steps", "50"]),
        ("Prior cache: kill -9 and resume, two processes against one", "kill_resume",
         [PYTHON, "tools/check_cache_kill_resume.py", "--trials", "2", "--kills", "2", "--processes", "2"]),
        ("Training stopped at random moments (SIGTERM, SIGINT, SIGUSR1, --stop-after-steps, kill -9) and "
         "resumed, against one uninterrupted run", "training_kill_resume",
         [PYTHON, "tools/check_training_kill_resume.py", "--interruptions", "7"]),
        ("Training step of the `paper` preset, 256×256, batch 1", "training_step",
         [PYTHON, "tools/benchmark_training.py", "--preset", "paper", "--size", "256", "--batch", "1",
          "--steps", "3", "--warmup", "1"]),
    ]
    records = []
    for title, name, command in tools:
        threads = 1 if name in ("kill_resume", "training_kill_resume") else None
        record = bench.run(f"record_{name}", command, threads=threads)
        output = [line for line in bench.output_of(f"record_{name}").splitlines()[1:] if "it/s]" not in line]
        records.append({"title": title, "command": record["command"], "output": "\n".join(output[-12:])})
    return records


# --------------------------------------------------------------------------- summary and report


def mean_and_spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (max(values) - min(values) if len(values) > 1 else 0.0)


def summarise(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per ablation row and test set: mean PSNR over seeds, the seed spread and the gap to the headline."""
    by_row: dict[str, list[dict[str, Any]]] = {}
    for entry in results["ablation"]:
        by_row.setdefault(entry["row"], []).append(entry)
    headline = by_row["mixed_prior"]
    # Seed noise: the largest spread over seeds of any row trained with several seeds.
    spread = {t: max(mean_and_spread([e["scores"][t]["psnr"] for e in entries])[1]
                     for entries in by_row.values() if len(entries) > 1) if len(headline) > 1 else 0.0
              for t in TEST_SETS}
    summary = []
    for key, entries in by_row.items():
        item = {"row": key, "label": entries[0]["label"], "group": entries[0]["group"],
                "seeds": [e["seed"] for e in entries], "random_backbone": entries[0]["random_backbone"],
                "cost": entries[0]["cost"], "prior_steps": entries[0]["prior_steps"],
                "train_seconds": round(statistics.fmean(e["train_seconds"] for e in entries), 1)}
        for test_set in TEST_SETS:
            for metric in ("psnr", "ssim", "mae"):
                item[f"{test_set}_{metric}"] = round(statistics.fmean(e["scores"][test_set][metric] for e in entries), 4)
            item[f"{test_set}_psnr_spread"] = round(mean_and_spread([e["scores"][test_set]["psnr"] for e in entries])[1], 3)
            gap = item[f"{test_set}_psnr"] - statistics.fmean(e["scores"][test_set]["psnr"] for e in headline)
            item[f"{test_set}_delta"] = round(gap, 3)
            item[f"{test_set}_seed_noise"] = round(spread[test_set], 3)
        summary.append(item)
    return summary


PAPER_CLAIMS = {
    "mixed_prior": "the paper's configuration",
    "no_prior": "the prior adds 0.11 dB (Table 6a)",
    "window": "window alone ≈ channel alone, mixed better (Table 6c)",
    "channel": "window alone ≈ channel alone, mixed better (Table 6c)",
    "prior_T_few": "fewer DDIM steps, less gain (Table 6a)",
    "prior_T_many": "gains converge from T = 20 (Table 6a)",
    "loss": "MAE losses trade a little PSNR for perceptual quality, better than VGG (seed 000)",
    "sparse_gated": "its own paper (seed 001) reports motion-deblurring results, not this comparison",
    "whole": "sliding windows at the training size beat the whole image by 0.25 dB (Table 6b)",
}


def paper_claim(row: str, group: str, prior_steps: int | None) -> tuple[str, int | None]:
    """The paper's statement about a row and the sign it predicts for the row minus the headline
    (−1: worse than the headline, 0: the same, None: no PSNR prediction to test here)."""
    if row.startswith("prior_T"):
        many = prior_steps is not None and prior_steps >= 20
        return PAPER_CLAIMS["prior_T_many" if many else "prior_T_few"], 0 if many else -1
    if group == "loss":
        return PAPER_CLAIMS["loss"], None  # a perceptual claim: LPIPS cannot run here (no AlexNet weights)
    if row in ("no_prior", "window", "channel"):
        return PAPER_CLAIMS[row], -1
    return PAPER_CLAIMS.get(row, ""), None


def agreement(delta: float, noise: float, seeds: int, expected: int | None) -> str:
    """Whether a PSNR gap to the headline bears the paper out, judged against the seed noise.

    ``noise`` is the largest spread over seeds of the rows trained with several seeds: a gap no
    larger than what changing the seed alone does is not evidence either way, and neither is a
    gap below the 0.01 dB the tables show."""
    if expected is None:
        return "no PSNR claim to test"
    if seeds < 2:
        return "one seed: cannot judge"
    if abs(delta) <= max(noise, 0.005):
        return "yes (no difference)" if expected == 0 else "not shown: within the seed spread"
    if expected == 0:
        return "no: differs beyond the seed spread"
    return "yes" if (delta > 0) == (expected > 0) else "**no: the opposite, beyond the seed spread**"


def render_markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    profile = meta["profile"]
    out: list[str] = []
    add = out.append
    add("# Benchmarks\n")
    add(f"Generated by `{meta['command']}` ({profile['name']} profile), steps run from {meta['started_utc']} to "
        f"{meta['finished_utc']}, on {meta['machine']['description']}. Every figure below was produced by that "
        "command; the JSON beside this file holds the same figures, and `tools/benchmark.py` documents each step. "
        f"The steps took {meta['step_minutes']} min in all (each step's wall time, summed; trainings ran side by "
        "side). Each speed figure carries the fp32 matmul rate (2048² GEMM) measured in the same process or just "
        "before it: this VM's speed drifts by up to about 20% within minutes, and the rate is what makes a figure "
        "comparable with another run or machine.\n")
    if profile["name"] != "full":
        add("**This is the quick profile** (tiny data and budgets, for CI): its quality figures say nothing "
            "about the methods; run `python tools/benchmark.py` for the full tables.\n")
    data = meta["data"]
    add("## Data and budgets\n")
    add(f"- Training set: {data['train_images']} pairs ({data['train_photos']}), defocus or motion blur drawn per "
        f"image; test sets: {data['defocus_images']} defocus and {data['motion_images']} motion pairs from "
        f"{data['test_photos']} (never trained on), longer side {profile['max_size']} px. Commands:")
    for name in ("data_train", "data_defocus", "data_motion"):
        add(f"  `{meta['steps'][name]['command']}`")
    add(f"- Stage one: `{meta['steps']['prior_vq']['command']}` then `{meta['steps']['prior_unet']['command']}` "
        f"({meta['steps']['prior_vq']['seconds'] + meta['steps']['prior_unet']['seconds']:.0f} s); priors cached with "
        f"quarter conditioning, seed 0, T ∈ {{{', '.join(map(str, profile['prior_steps']))}}}.")
    add(f"- Stage two: every row trained by `python -m pipelines.train_swintormer --config "
        f"{profile['swintormer_config']}` ({meta['budget']}), changed only by the row's overrides; headline rows "
        f"with seeds {', '.join(map(str, profile['seeds']))}, the others with seed 0. No validation during training "
        "and no choice made on the test sets: each model is its final EMA weights. "
        f"Trainings ran {meta['jobs']} at a time with {max(1, meta['threads'] // meta['jobs'])} thread(s) each.")
    add(f"- Scoring: `python -m pipelines.deblur` at the training size ({meta['tile']}×{meta['tile']} windows, stride "
        f"{meta['tile'] - meta['tile'] // 4}, average blend) and `python -m pipelines.evaluate --no-lpips` "
        "(PSNR on [0, 1], SSIM over colour channels, MAE; no LPIPS: its AlexNet weights cannot be downloaded here).\n")

    add("## Methods on the test sets\n")
    add("| method | defocus PSNR | SSIM | MAE | motion PSNR | SSIM | MAE |")
    add("| --- | --- | --- | --- | --- | --- | --- |")
    refs: dict[str, dict[str, dict[str, float]]] = {}
    for entry in results["references"]:
        refs.setdefault(entry["method"], {})[entry["test_set"]] = entry["scores"]
    for item in results["summary"]:
        if item["row"] in ("mixed_prior", "no_prior"):
            refs[f"Swintormer ({meta['preset']} preset), {item['label']} (mean of {len(item['seeds'])} seed(s))"] = {
                t: {m: item[f"{t}_{m}"] for m in ("psnr", "ssim", "mae")} for t in TEST_SETS}
    for method, scores in refs.items():
        cells = [f"{scores[t]['psnr']:.2f} | {scores[t]['ssim']:.4f} | {scores[t]['mae']:.4f}" for t in TEST_SETS]
        add(f"| {method} | {' | '.join(cells)} |")
    add("")

    add("## Ablation (the paper's Table 6 at CPU scale)\n")
    add("PSNR in dB; Δ against the headline row (mixed attention + prior, L1), mean over its seeds. "
        "Spread = largest minus smallest PSNR over a row's seeds; a Δ counts as a difference only when it is "
        "larger than the largest spread of any multi-seed row (and than 0.005 dB); with two seeds that spread is a "
        "rough estimate of the seed noise. Cost: parameters, GMACs of one 256×256 forward, "
        f"and sliding-window inference on a {profile['speed_image']}² image in a fresh process (batch 1, fp32).\n")
    add("| group | configuration | seeds | defocus PSNR (Δ) | motion PSNR (Δ) | spread (def./mot.) | params | GMACs | s/MP | peak RSS | train time | the paper says | borne out here? (defocus; motion) |")
    add("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    seeds_headline = len(profile["seeds"])
    for item in results["summary"]:
        label = item["label"] + (" — random-weight backbone (no pretrained file here)" if item["random_backbone"] else "")
        claim, expected = paper_claim(item["row"], item["group"], item["prior_steps"])
        verdicts = [agreement(item[f"{t}_delta"], item[f"{t}_seed_noise"], seeds_headline, expected)
                    if item["row"] != "mixed_prior" else "—" for t in TEST_SETS]
        cost = item["cost"]
        add(f"| {item['group']} | {label} | {', '.join(map(str, item['seeds']))} | "
            f"{item['defocus_psnr']:.2f} ({item['defocus_delta']:+.2f}) | {item['motion_psnr']:.2f} ({item['motion_delta']:+.2f}) | "
            f"{item['defocus_psnr_spread']:.2f} / {item['motion_psnr_spread']:.2f} | {cost['parameters'] / 1e6:.2f} M | "
            f"{cost['gmacs_256']:.2f} | {cost['seconds_per_mp']:.2f} | {cost['peak_rss_mib']:.0f} MiB | "
            f"{item['train_seconds']:.0f} s | {claim} | {verdicts[0]}; {verdicts[1]} |")
    add("")
    add("Prior rows: the stage-one sampling cost comes on top (per megapixel of test images, cache job "
        "including start-up and writing):\n")
    add("| T | seconds | megapixels | s/MP |")
    add("| --- | --- | --- | --- |")
    for row in results["prior_cost"]:
        add(f"| {row['steps']} | {row['seconds']} | {row['megapixels']} | {row['seconds_per_mp']} |")
    add("")

    add("### Inference: whole image against sliding windows (headline models)\n")
    add(f"The paper: {PAPER_CLAIMS['whole']}. The same trained models in each mode, so the comparison is "
        "paired: mean over the headline seeds, Δ against the whole image, and the paper is borne out when every "
        "seed's model gains.\n")
    add("| inference | seeds | defocus PSNR (Δ) | motion PSNR (Δ) | borne out here? (defocus; motion) |")
    add("| --- | --- | --- | --- | --- |")
    modes: dict[str, list[dict[str, Any]]] = {}
    for entry in results["inference"]:
        modes.setdefault(entry["row"], []).append(entry)
    whole = {(e["seed"], t): e["scores"][t]["psnr"] for e in modes["whole"] for t in TEST_SETS}
    for key, entries in modes.items():
        means = {t: statistics.fmean(e["scores"][t]["psnr"] - whole[e["seed"], t] for e in entries) for t in TEST_SETS}
        verdicts = []
        for t in TEST_SETS:
            gains = [e["scores"][t]["psnr"] - whole[e["seed"], t] for e in entries]
            verdicts.append("—" if key == "whole" else "yes, every seed" if all(g > 0 for g in gains) else
                            "**no: every seed loses**" if all(g < 0 for g in gains) else "mixed across seeds")
        cells = " | ".join(f"{statistics.fmean(e['scores'][t]['psnr'] for e in entries):.2f} ({means[t]:+.2f})"
                           for t in TEST_SETS)
        add(f"| {entries[0]['label']} | {', '.join(str(e['seed']) for e in entries)} | {cells} | {verdicts[0]}; {verdicts[1]} |")
    add("")

    out += render_default_by_kind(results.get("default_by_kind"), meta.get("photo_corpus", ""))
    out += render_default_speed(results.get("default_speed"))
    updated = meta.get("default_model_update")
    if updated:
        sections = "sections above were" if results.get("default_speed") else "section above was"
        add(f"The default-model {sections} regenerated by `{updated['command']}`, steps run from "
            f"{updated['started_utc']} to {updated['finished_utc']} on {updated['machine']['description']}; "
            "the other sections are from the run named at the top, with the default model of that date.\n")

    if "speed" not in results:
        add("(Speed table left out: `--skip-speed`.)")
        return "\n".join(out)
    speed = results["speed"]
    add("## Speed: the `paper` preset (25.18 M parameters)\n")
    shape = "×".join(str(n) for n in speed["forward"]["cases"][0]["input"])
    add(f"`{speed['forward_command']}` (input {shape}, median after warm-up, each precision in a fresh process):\n")
    add("| precision | median | min | peak RSS | matmul rate, same process |")
    add("| --- | --- | --- | --- | --- |")
    for case in speed["forward"]["cases"]:
        rate = case.get("matmul_gflops", speed["forward"]["matmul_fp32_gflops"])
        add(f"| {case['precision']} | {case['latency_median_s']:.3f} s | {case['latency_min_s']:.3f} s | "
            f"{case['peak_rss_mib']:.0f} MiB | {rate:.0f} GFLOP/s |")
    add("")
    add("The deblur command with the `paper` network (random weights; the image itself stands in for the prior, "
        "so prior sampling is not included), tile 256, stride 192, batch 1, whole command including start-up:\n")
    add("| image | precision | time | s/MP | peak RSS | matmul rate just before |")
    add("| --- | --- | --- | --- | --- | --- |")
    for case in speed["deblur"]:
        add(f"| {case['image']} | {case['precision']} | {case['seconds']:.1f} s | {case['seconds_per_mp']:.2f} | "
            f"{case['peak_rss_mib']:.0f} MiB | {case['matmul_gflops']:.0f} GFLOP/s |")
    add("")
    for record in results.get("records", []):
        add(f"## {record['title']}\n")
        add(f"`{record['command']}`:\n")
        add("```\n" + record["output"] + "\n```\n")
    return "\n".join(out)


def render_default_speed(rows: list[dict[str, Any]] | None) -> list[str]:
    """The section "Default model: deblur speed" (``default_model_speed``)."""
    if not rows:
        return []
    lines = ["## Default model: deblur speed\n",
             "`swintormer deblur` on a JPEG photo with each model at its own defaults (the window its pipeline.json "
             "records, batch 4, average blending), on the CPU, the whole command in a fresh process (start-up, "
             "decoding and encoding included); peak RSS of that process:\n",
             "| model | image | precision | time | s/MP | peak RSS | matmul rate just before |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        rate = f"{row['matmul_gflops']:.0f} GFLOP/s" if row.get("matmul_gflops") else "—"
        lines.append(f"| {row['model']} (`{row['path'].replace(str(REPO_ROOT) + os.sep, '')}`) | {row['image']} | "
                     f"{row['precision']} | {row['seconds']:.1f} s | {row['seconds_per_mp']:.2f} | "
                     f"{row['peak_rss_mib']:.0f} MiB | {rate} |")
    lines.append("")
    return lines


def render_default_by_kind(entry: dict[str, Any] | None, corpus: str) -> list[str]:
    """The section "Default model by kind of degradation", from the tool's report."""
    lines = ["## Default model by kind of degradation\n"]
    if entry is None:
        corpus = corpus.replace(str(REPO_ROOT) + os.sep, "")
        lines.append(f"(Left out: no photo corpus at `{corpus}`; make it with `python tools/make_photo_corpus.py "
                     "--out DIR` and pass `--photo-corpus DIR`.)\n")
        return lines
    from tools.evaluate_default_model import render_tables

    report = entry["report"]
    settings = report["settings"]
    models = ", ".join(f"{name} (`{source['path'].replace(str(REPO_ROOT) + os.sep, '')}`)"
                       for name, source in report["models"].items())
    lines.append(f"`{entry['command']}` ({entry['seconds']:.0f} s): {models} on fixed degraded sets made from the "
                 f"{settings['photos']} test photos of the photo corpus (centre crops of at most {settings['crop']} px, "
                 f"seed {settings['seed']}; Poisson–Gaussian noise in linear light, shot {settings['shot_noise']:g}, "
                 f"read σ {settings['read_noise']:g}, none in sharp_clean; no JPEG), next to the blurry input and "
                 "Wiener / Richardson–Lucy with the true kernel, deconvolving in linear light as the blur was applied. "
                 f"Contact sheet: `{report['sheet']['path'].replace(str(REPO_ROOT) + os.sep, '')}`.\n")
    return lines + render_tables(report)


# --------------------------------------------------------------------------- main


def machine() -> dict[str, Any]:
    from tools.evaluate_default_model import machine as describe_machine

    return describe_machine()


def _step_span(records: dict[str, Any]) -> tuple[str | None, str | None]:
    """When the first recorded step started and the last one finished (over every invocation)."""
    fmt = "%Y-%m-%d %H:%M:%S UTC"
    ends = [datetime.datetime.strptime(r["finished_utc"], fmt) for r in records.values()]
    starts = [end - datetime.timedelta(seconds=r["seconds"]) for end, r in zip(ends, records.values())]
    if not ends:
        return None, None
    return min(starts).strftime(fmt), max(ends).strftime(fmt)


def count_images(split: Path) -> int:
    return len([p for p in (split / "inputC").iterdir() if p.is_file()])


def photos_of(split: Path) -> str:
    names = sorted({p.stem.rsplit("_", 1)[0] for p in (split / "inputC").iterdir()})
    return ", ".join(names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the quick profile (tiny budgets, minutes; for CI)")
    parser.add_argument("--work", type=Path, default=None,
                        help="work folder for data, runs and logs (default: runs/benchmark_<profile>)")
    parser.add_argument("--markdown", type=Path, default=None,
                        help="Markdown report (default: BENCHMARKS.md for the full profile, WORK/BENCHMARKS.md for quick)")
    parser.add_argument("--json", type=Path, default=None, help="JSON results (default: next to the Markdown)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads per step (default: all cores)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="trainings run at once, the --threads shared out between them (default: 1); the train "
                             "times in the report are then measured side by side")
    parser.add_argument("--vgg-weights", type=Path, default=None, help="torchvision vgg19-dcbbe01f.pth for the VGG row")
    parser.add_argument("--mae-weights", type=Path, default=None, help="mae_pretrain_vit_base.pth for the MAE rows")
    parser.add_argument("--photo-corpus", type=Path, default=REPO_ROOT / "data" / "photos",
                        help="photo corpus for the default model by kind of degradation (tools/make_photo_corpus.py); "
                             "the section is left out when it does not exist (default: data/photos)")
    parser.add_argument("--previous-default", type=Path, default=None,
                        help="model folder of the previous default model, evaluated beside the shipped one")
    parser.add_argument("--skip-speed", action="store_true", help="leave out the speed table and the other records")
    parser.add_argument("--only", choices=("default-model",),
                        help="run only the default model's steps (evaluation by kind on --photo-corpus, deblur "
                        "speed; not with --skip-speed) and update those sections of the existing --json/--markdown "
                        "report; the other sections are kept as measured, and the report says which command made "
                        "which. Steps already recorded in --work are reused, so the speed rows can be run later, "
                        "on a quiet machine")
    parser.add_argument("--fresh", action="store_true", help="delete the work folder first")
    parser.add_argument("--quiet", action="store_true", help="no step-by-step progress lines")
    parser.add_argument("--measure-inference", type=Path, help=argparse.SUPPRESS)  # internal: one cost measurement
    parser.add_argument("--tile", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.measure_inference is not None:
        print(json.dumps(measure_inference(args.measure_inference, args.tile, args.size)))
        return 0
    for option, path in (("--vgg-weights", args.vgg_weights), ("--mae-weights", args.mae_weights)):
        if path is not None and not path.is_file():
            print(f"error: {option} {path}: file not found", file=sys.stderr)
            return 2
    if args.previous_default is not None and not (args.previous_default / "config.json").is_file():
        print(f"error: --previous-default {args.previous_default}: not a model folder (no config.json)", file=sys.stderr)
        return 2
    if args.threads < 1 or args.jobs < 1:
        print(f"error: --threads and --jobs must be at least 1, got {args.threads} and {args.jobs}", file=sys.stderr)
        return 2

    profile = PROFILES["quick" if args.quick else "full"]
    work = args.work or REPO_ROOT / "runs" / f"benchmark_{profile.name}"
    if args.fresh and work.exists():
        shutil.rmtree(work)
    markdown = args.markdown or (work / "BENCHMARKS.md" if args.quick else REPO_ROOT / "BENCHMARKS.md")
    json_path = args.json or markdown.with_suffix(".json")
    bench = Bench(work, args.threads, quiet=args.quiet)
    if args.only == "default-model":
        return update_default_model_sections(bench, profile, args, parser, markdown, json_path)
    started, wall = _now(), time.perf_counter()
    rate_start = matmul_gflops()
    from swintormer.core.config import load_config
    from pipelines.train_swintormer import SwintormerTrainConfig

    config = load_config(SwintormerTrainConfig, REPO_ROOT / profile.swintormer_config, [])
    tile = config.data.patch_size  # stage two's training size: the sliding-window size everywhere
    try:
        splits = make_data(bench, profile)
        prior_model = train_prior(bench, profile, splits["train"])
        caches = cache_priors(bench, profile, prior_model, splits)
        rows = ablation_rows(profile, args.vgg_weights, args.mae_weights)
        results: dict[str, Any] = {"references": run_references(bench, profile, caches, splits),
                                   "ablation": run_ablation(bench, profile, rows, caches, splits, tile, args.jobs)}
        results["inference"] = run_inference_ablation(bench, profile, caches, splits, tile)
        results["prior_cost"] = prior_sampling_cost(bench, profile, splits)
        by_kind = default_model_by_kind(bench, profile, args.photo_corpus.resolve(), args.previous_default)
        if by_kind is not None:
            results["default_by_kind"] = by_kind
        if not args.skip_speed:
            results["default_speed"] = default_model_speed(bench, profile, args.previous_default)
            results["speed"] = speed_table(bench, profile)
            if profile.records:
                results["records"] = other_records(bench)
    except BenchmarkError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    results["summary"] = summarise(results)
    shown = ["python", "tools/benchmark.py"] + (["--quick"] if args.quick else [])
    if args.photo_corpus != parser.get_default("photo_corpus"):
        shown += ["--photo-corpus", _display([str(args.photo_corpus)])]
    if args.previous_default is not None:
        shown += ["--previous-default", _display([str(args.previous_default)])]
    used = {name: record for name, record in bench.records.items() if name in bench.used}
    first_step, last_step = _step_span(used)
    results["meta"] = {
        "command": " ".join(shown), "profile": asdict(profile), "started_utc": first_step or started,
        "finished_utc": last_step or _now(), "last_invocation_minutes": round((time.perf_counter() - wall) / 60, 1),
        "step_minutes": round(sum(r["seconds"] for r in used.values()) / 60, 1), "machine": machine(),
        "matmul_gflops_last_invocation": [rate_start, matmul_gflops()], "threads": args.threads,
        "jobs": args.jobs, "photo_corpus": str(args.photo_corpus),
        "tile": tile, "preset": config.model.preset, "steps": used,
        "budget": (f"{config.model.preset} preset, {config.train.max_steps} steps of batch {config.train.batch_size}, "
                   f"{tile}×{tile} patches, lr {config.train.optimizer.lr:g} {config.train.scheduler.name}"),
        "data": {"train_images": count_images(splits["train"]), "train_photos": photos_of(splits["train"]),
                 "defocus_images": count_images(splits["defocus"]), "motion_images": count_images(splits["motion"]),
                 "test_photos": photos_of(splits["defocus"])},
    }
    from swintormer.core.files import atomic_write_bytes

    _write_json(json_path, results)
    atomic_write_bytes(markdown, render_markdown(results).encode())
    print(f"wrote {markdown} and {json_path}")
    return 0


def update_default_model_sections(bench: Bench, profile: Profile, args: argparse.Namespace,
                                  parser: argparse.ArgumentParser, markdown: Path, json_path: Path) -> int:
    """``--only default-model``: rerun the default model's evaluation by kind and its speed rows,
    and rewrite those sections of an existing report (when a new default model is shipped, the
    ablation tables, hours of training, do not change)."""
    from swintormer.core.files import atomic_write_bytes

    if not json_path.is_file():
        print(f"error: --only needs an existing report to update: {json_path} not found", file=sys.stderr)
        return 2
    corpus = args.photo_corpus.resolve()
    if not (corpus / "manifest.json").is_file():
        print(f"error: --photo-corpus {args.photo_corpus}: no photo corpus (make it with tools/make_photo_corpus.py)",
              file=sys.stderr)
        return 2
    results = json.loads(json_path.read_text())
    started = _now()
    try:
        results["default_by_kind"] = default_model_by_kind(bench, profile, corpus, args.previous_default)
        if not args.skip_speed:  # with --skip-speed the report keeps the speed rows it has
            results["default_speed"] = default_model_speed(bench, profile, args.previous_default)
    except BenchmarkError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    shown = ["python", "tools/benchmark.py", *(["--quick"] if args.quick else []), "--only", "default-model",
             *(["--skip-speed"] if args.skip_speed else [])]
    if args.photo_corpus != parser.get_default("photo_corpus"):
        shown += ["--photo-corpus", _display([str(args.photo_corpus)])]
    if args.previous_default is not None:
        shown += ["--previous-default", _display([str(args.previous_default)])]
    used = {name: record for name, record in bench.records.items() if name in bench.used}
    first_step, last_step = _step_span(used)  # when the steps ran (a reused step ran before)
    results["meta"]["default_model_update"] = {"command": " ".join(shown), "started_utc": first_step or started,
                                               "finished_utc": last_step or _now(), "machine": machine()}
    _write_json(json_path, results)
    atomic_write_bytes(markdown, render_markdown(results).encode())
    print(f"updated the default-model sections of {markdown} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
