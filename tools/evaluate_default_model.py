"""Evaluate deblurring models by kind of degradation on the photo corpus' test split, with a picture.

    python tools/evaluate_default_model.py --corpus data/photos --out runs/eval_default \\
        --model new=runs/photo_default/model --model old=swintormer/weights/default \\
        --sheet docs/default_model_contact_sheet.png
    python tools/evaluate_default_model.py --corpus data/photos --out runs/eval_run \\
        --checkpoint new=runs/photo_default        # the latest EMA checkpoint of a run in progress

Only the **test** split of the corpus (``tools/make_photo_corpus.py``: ``manifest.json`` with
``files[].split/path/bokeh``) is used. Steps:

1. **Fixed degraded sets**, written as ``OUT/sets/KIND/{input,target}/NAME.png`` (8-bit PNG),
   from each test photo's centre crop (``--crop``, default 512; the whole photo when smaller;
   the context a blur needs beyond the crop comes from the photo, reflected beyond its edges,
   as in :class:`swintormer.core.data.degraded.DegradedImageDataset`). Every degradation is drawn
   by :func:`swintormer.core.data.degradations.sample_degradation` with the kind forced and a
   :class:`~swintormer.core.data.degradations.DegradationConfig` whose noise is fixed per set
   (Poisson–Gaussian in linear light, ``--shot-noise`` / ``--read-noise``; no JPEG), from
   ``numpy.random.default_rng([seed, kind, crc32(photo), radius index, variant])``: the same
   arguments give byte-identical sets.

   ``defocus_uniform``
       a disc of one of the ``--radii`` (default 2, 4 and 6 px) per photo, in turn over the photos
       in name order (``--every-radius``: every radius on every photo, three times the images and
       the time), named ``PHOTO_r<radius>``; true kernels in ``kernels/NAME.safetensors``
       (:func:`~swintormer.core.data.synthetic_blur.save_kernel`).
   ``defocus_varying``
       a disc whose radius follows a random depth map (radii up to 2–10 px); the per-pixel
       radius map is saved as ``radius/NAME.npy`` (float32, px). A draw is kept only when the
       in-focus region (radius 0) and the defocused region (radius ≥ ``--defocus-threshold``)
       each cover at least ``--min-region-fraction`` of the crop (otherwise the next stream
       ``variant`` is drawn), so that both regions can be scored.
   ``motion``
       a camera-shake trajectory of 3–21 px; true kernels saved as for uniform defocus.
   ``sharp_noise``
       the sharp photo with the same noise and nothing else (no blur, no JPEG).
   ``sharp_clean``
       the sharp photo with nothing added: the input equals the target.

   Each set's ``degradations.json`` describes every draw (kind, radius or length, noise).
   The ``bokeh`` set is the test photos flagged ``bokeh: true`` themselves, with no synthetic
   blur: the same centre crops (``--bokeh-whole``: the whole photos, about twice the pixels), in
   ``OUT/sets/bokeh/input``; there is no target.

2. **Restoration** by each model with the project's deblur command in a fresh process,
   ``python -m pipelines.deblur INPUTS --output DIR --model MODEL --no-progress`` (``--tile`` and
   ``--device`` passed on when given), once per model over every set: ``INPUTS`` is a folder of
   links ``KIND__NAME.png`` to the sets' inputs, and the results are moved to
   ``OUT/restored/MODEL/KIND/NAME.png``. ``--checkpoint NAME=RUN`` first exports the EMA weights
   of RUN's latest complete checkpoint (``checkpoints/step_*/ema.safetensors``, the network
   built from the model section of RUN's ``config.yaml``) to ``OUT/models/NAME`` with
   ``save_pretrained``, and runs it on windows of the run's training patch size
   (``data.patch_size``), the window a run's final model folder records for the deblur command.

3. **Scores** by the project's evaluator in a fresh process (``python -m pipelines.evaluate
   --no-lpips``: PSNR as ``10·log10(1/MSE)`` on [0, 1], SSIM, MAE; once per method over folders
   of links, its report in ``OUT/scores/METHOD.json``; per kind the mean over images), for each
   model, the blurry input itself and, where a true kernel exists (``defocus_uniform``,
   ``motion``), Wiener and Richardson–Lucy deconvolution with that kernel
   (``tools/classical_baselines.py``'s functions, 30 RL iterations). The blur was applied in
   linear light, so the deconvolutions run in linear light too: the input is decoded with
   ``srgb_to_linear``, deconvolved, and encoded with ``linear_to_srgb``. Wiener's
   noise-to-signal ratio comes from ``default_nsr`` with the set's noise variance in linear
   light at the image's mean intensity (``shot·mean + read²``).

4. **Regions of varying defocus**: PSNR over the in-focus pixels (radius 0) and over the
   defocused ones (radius ≥ ``--defocus-threshold``, default 1.5 px) separately
   (:func:`masked_psnr`), mean over images.

5. **Bokeh texture ratio** (:func:`bokeh_texture_ratio`) on every bokeh photo: the standard
   deviation of the Laplacian of the luminance inside the smooth regions of the photo, output
   over input. 1.0 means no texture added to the out-of-focus areas; above 1 the model painted
   detail into them. For ``sharp_clean``, the worst image's PSNR of output against input
   (the model should leave a sharp photo alone: target ≥ 38 dB).

6. **Contact sheet** (``--sheet``): one row per kind (uniform defocus at the middle radius) and
   one for bokeh, columns input | each model | sharp, crops of ``--sheet-tile`` px chosen
   automatically (the most detailed window of the sharp image; for varying defocus the window
   with the most balanced in-focus and defocused areas; for bokeh the smoothest one).

Outputs: ``OUT/report.json`` (every figure, the settings, the date, the machine and the
runtime) and ``OUT/report.md`` (the same as Markdown tables). Exit status 0 on success, 1 when
a step failed (its command and output are printed), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import cv2
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from swintormer.core.data.degradations import (  # noqa: E402
    DegradationConfig,
    linear_to_srgb,
    sample_degradation,
    srgb_to_linear,
)
from swintormer.core.data.synthetic_blur import load_kernel, save_kernel  # noqa: E402
from swintormer.core.files import atomic_write_bytes  # noqa: E402
from swintormer.core.image_io import list_images, read_image, write_image  # noqa: E402
from swintormer.core.metrics import PSNR_CAP_DB  # noqa: E402

BLUR_SETS = ("defocus_uniform", "defocus_varying", "motion")
KINDS = (*BLUR_SETS, "sharp_noise", "sharp_clean")
KERNEL_SETS = ("defocus_uniform", "motion")
# The blur kind each set draws with sample_degradation.
SAMPLED_KIND = {"defocus_uniform": "defocus_uniform", "defocus_varying": "defocus_varying", "motion": "motion",
                "sharp_noise": "sharp", "sharp_clean": "sharp"}
# A word of the seed sequence per set, so that the sets draw independently of each other.
KIND_STREAM = {kind: index + 1 for index, kind in enumerate(KINDS)}
INPUT = "input"
CLASSICAL = ("wiener", "richardson_lucy")
METHOD_LABELS = {INPUT: "blurry input", "wiener": "Wiener, true kernel (linear light)",
                 "richardson_lucy": "Richardson–Lucy 30 it., true kernel (linear light)"}
RL_ITERATIONS = 30
SHARP_CLEAN_TARGET_DB = 38.0
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class StepError(RuntimeError):
    """A subprocess or a step failed; the message says which and why."""


# --------------------------------------------------------------------------- measures


def masked_psnr(restored: np.ndarray, target: np.ndarray, mask: np.ndarray) -> float:
    """PSNR in dB over the pixels where ``mask`` (H×W bool) is true, all channels included:
    ``10·log10(1 / MSE)`` with the MSE in float64 over those pixels of float images in [0, 1],
    as :func:`swintormer.core.metrics.psnr` over the whole image (and capped at its 100 dB when
    the masked pixels are identical). An empty mask is an error."""
    restored = np.asarray(restored, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if restored.shape != target.shape or restored.shape[:2] != mask.shape:
        raise ValueError(f"shapes differ: restored {restored.shape}, target {target.shape}, mask {mask.shape}")
    if not mask.any():
        raise ValueError("the mask selects no pixel")
    mse = float(np.mean((restored[mask] - target[mask]) ** 2))
    return PSNR_CAP_DB if mse == 0.0 else min(PSNR_CAP_DB, 10.0 * math.log10(1.0 / mse))


def luminance(image: np.ndarray) -> np.ndarray:
    """Rec. 709 luma of an sRGB H×W×3 float image (on the code values), float64."""
    image = np.asarray(image, dtype=np.float64)
    return 0.2126 * image[..., 0] + 0.7152 * image[..., 1] + 0.0722 * image[..., 2]


def smooth_region(image: np.ndarray, fraction: float = 0.3, sigma: float = 2.0) -> np.ndarray:
    """The smooth pixels of an image: those whose gradient magnitude (Sobel, on the luminance
    smoothed by a Gaussian of ``sigma`` px) is among the lowest ``fraction`` of the image.
    In a photo with bokeh this is mostly its out-of-focus background (and flat sky or walls)."""
    smoothed = cv2.GaussianBlur(luminance(image), (0, 0), sigma, borderType=cv2.BORDER_REFLECT_101)
    gx = cv2.Sobel(smoothed, cv2.CV_64F, 1, 0, ksize=3, borderType=cv2.BORDER_REFLECT_101)
    gy = cv2.Sobel(smoothed, cv2.CV_64F, 0, 1, ksize=3, borderType=cv2.BORDER_REFLECT_101)
    magnitude = np.hypot(gx, gy)
    return magnitude <= np.quantile(magnitude, fraction)


def laplacian_std(image: np.ndarray, mask: np.ndarray) -> float:
    """Standard deviation, over ``mask``, of the 4-neighbour Laplacian of the luminance: the
    fine-scale texture (and noise) of those pixels."""
    laplacian = cv2.Laplacian(luminance(image), cv2.CV_64F, ksize=1, borderType=cv2.BORDER_REFLECT_101)
    return float(np.std(laplacian[mask]))


def bokeh_texture_ratio(output: np.ndarray, photo: np.ndarray, fraction: float = 0.3) -> dict[str, float]:
    """Texture added to the smooth (out-of-focus) areas of a photo by a restoration.

    The smooth region is taken from the input photo (:func:`smooth_region`, the ``fraction`` of
    pixels with the lowest smoothed gradient) and used for both images; the measure is
    :func:`laplacian_std` of the output over that of the input. 1.0: the smooth areas keep
    their texture; above 1: fine detail (ringing, painted texture, amplified noise) was added;
    below 1: they were smoothed further. Identical images give exactly 1.0."""
    mask = smooth_region(photo, fraction)
    before = laplacian_std(photo, mask)
    after = laplacian_std(output, mask)
    ratio = 1.0 if before == after else after / max(before, 1e-12)
    return {"ratio": ratio,
            "laplacian_std_input": before, "laplacian_std_output": after, "smooth_pixels": int(mask.sum())}


# --------------------------------------------------------------------------- corpus and sets


def corpus_test_photos(corpus: Path) -> list[dict[str, Any]]:
    """The test split's entries of the corpus manifest (``path``, ``bokeh``), sorted by path."""
    manifest_path = corpus / "manifest.json"
    if not manifest_path.is_file():
        raise StepError(f"{manifest_path} not found (expected a corpus made by tools/make_photo_corpus.py)")
    files = json.loads(manifest_path.read_text())["files"]
    entries = sorted((f for f in files if f.get("split") == "test"), key=lambda f: f["path"])
    if not entries:
        raise StepError(f"{manifest_path}: no file of the test split")
    for entry in entries:
        if not (corpus / entry["path"]).is_file():
            raise StepError(f"{corpus / entry['path']}: listed in the manifest but missing")
    return entries


def _photo_samples(path: Path) -> np.ndarray:
    loaded = read_image(path)
    if loaded.bit_depth != 8:  # the sets are 8-bit: quantise the photo once, the target is that
        return np.rint(loaded.pixels * 255).astype(np.float32) / np.float32(255)
    return loaded.pixels


def centre_region(pixels: np.ndarray, crop: int, margin: int) -> np.ndarray:
    """The centre ``crop``×``crop`` window (the whole side when shorter) with ``margin`` pixels of
    context on each side: the photo where it has some, its reflection beyond its edges."""
    height, width = pixels.shape[:2]
    crop_h, crop_w = min(crop, height), min(crop, width)
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    padded = np.pad(pixels, ((margin, margin), (margin, margin), (0, 0)), mode="symmetric")
    return np.ascontiguousarray(padded[top: top + crop_h + 2 * margin, left: left + crop_w + 2 * margin])


def set_config(kind: str, args: argparse.Namespace, radius: float | None = None) -> DegradationConfig:
    """The degradation settings of one set: the training ranges for the blur, fixed noise
    (none for ``sharp_clean``), no JPEG."""
    noisy = kind != "sharp_clean"
    options: dict[str, Any] = dict(
        noise_probability=1.0 if noisy else 0.0, shot_noise=(args.shot_noise, args.shot_noise),
        read_noise_sigma=(args.read_noise, args.read_noise), jpeg_probability=0.0,
    )
    if radius is not None:
        options["defocus_radius"] = (radius, radius)
    return DegradationConfig(**options)


def _set_names(kind: str, photo: str, index: int, args: argparse.Namespace) -> list[tuple[str, float | None]]:
    """The images of one photo in a set: for uniform defocus, photo ``index`` (in name order) takes
    radius ``radii[index mod len(radii)]``, or every radius with ``--every-radius``."""
    if kind == "defocus_uniform":
        radii = args.radii if args.every_radius else [args.radii[index % len(args.radii)]]
        return [(f"{photo}_r{radius:g}", radius) for radius in radii]
    return [(photo, None)]


def build_sets(args: argparse.Namespace, entries: list[dict[str, Any]], out: Path, log) -> dict[str, Any]:
    """Write every degraded set and the bokeh set; returns their description (JSON-ready)."""
    sets_dir = out / "sets"
    margin = max(set_config(kind, args, r).margin() for kind in KINDS for r in (args.radii if kind == "defocus_uniform" else [None]))
    description: dict[str, Any] = {}
    photos = {Path(entry["path"]).stem: _photo_samples(args.corpus / entry["path"]) for entry in entries}
    for kind in KINDS:
        kind_dir = sets_dir / kind
        if kind_dir.exists():
            shutil.rmtree(kind_dir)
        draws: dict[str, Any] = {}
        for index, (photo, pixels) in enumerate(photos.items()):
            region = centre_region(pixels, args.crop, margin)
            inner = (slice(margin, region.shape[0] - margin), slice(margin, region.shape[1] - margin))
            target = region[inner]
            for item, (name, radius) in enumerate(_set_names(kind, photo, index, args)):
                config = set_config(kind, args, radius)
                degradation, rng, variant = None, None, 0
                for variant in range(1000):
                    rng = np.random.default_rng([args.seed, KIND_STREAM[kind], zlib.crc32(photo.encode()), item, variant])
                    degradation = sample_degradation(rng, config, *region.shape[:2], kind=SAMPLED_KIND[kind])
                    if kind != "defocus_varying" or _regions_balanced(degradation.radius_map[inner], args):
                        break
                else:
                    raise StepError(f"defocus_varying {name}: no draw with both regions of at least "
                                    f"{args.min_region_fraction:.0%} in 1000 tries")
                blurry = degradation.apply(rng, region)[inner]
                if kind == "sharp_clean" and not np.array_equal(np.rint(blurry * 255), np.rint(target * 255)):
                    raise StepError(f"sharp_clean {name}: the degradation module changed a sharp photo")
                write_image(kind_dir / "input" / f"{name}.png", blurry, bit_depth=8)
                write_image(kind_dir / "target" / f"{name}.png", target, bit_depth=8)
                info = {**degradation.describe(), "photo": photo, "stream_variant": variant,
                        "size": [int(target.shape[1]), int(target.shape[0])]}
                if degradation.kernel is not None and kind in KERNEL_SETS:
                    save_kernel(kind_dir / "kernels" / f"{name}.safetensors", degradation.kernel)
                    info["kernel_size"] = list(degradation.kernel.shape)
                if degradation.radius_map is not None:
                    radius_map = np.ascontiguousarray(degradation.radius_map[inner], dtype=np.float32)
                    (kind_dir / "radius").mkdir(parents=True, exist_ok=True)
                    np.save(kind_dir / "radius" / f"{name}.npy", radius_map)
                    info["in_focus_fraction"] = float(np.mean(radius_map == 0))
                    info["defocused_fraction"] = float(np.mean(radius_map >= args.defocus_threshold))
                draws[name] = _rounded(info)
        atomic_write_bytes(kind_dir / "degradations.json", (json.dumps(draws, indent=2, sort_keys=True) + "\n").encode())
        description[kind] = {"images": len(draws), "draws": draws}
        log(f"set {kind}: {len(draws)} images")
    bokeh_dir = sets_dir / "bokeh" / "input"
    if bokeh_dir.parent.exists():
        shutil.rmtree(bokeh_dir.parent)
    bokeh = [Path(entry["path"]).stem for entry in entries if entry.get("bokeh")]
    for photo in bokeh:
        pixels = photos[photo] if args.bokeh_whole else centre_region(photos[photo], args.crop, 0)
        write_image(bokeh_dir / f"{photo}.png", pixels, bit_depth=8)
    description["bokeh"] = {"images": len(bokeh), "photos": bokeh}
    log(f"set bokeh: {len(bokeh)} photos")
    return description


def _regions_balanced(radius_map: np.ndarray, args: argparse.Namespace) -> bool:
    return (float(np.mean(radius_map == 0)) >= args.min_region_fraction
            and float(np.mean(radius_map >= args.defocus_threshold)) >= args.min_region_fraction)


def _rounded(value: Any) -> Any:
    """Floats rounded to 6 significant digits (a stable, readable JSON)."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


# --------------------------------------------------------------------------- models


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest complete checkpoint (``trainer_state.json`` written) of a training run."""
    folders = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if (p / "trainer_state.json").is_file())
    if not folders:
        raise StepError(f"{run_dir / 'checkpoints'}: no complete checkpoint")
    return folders[-1]


def export_checkpoint(run_dir: Path, destination: Path) -> dict[str, Any]:
    """Build the network from the model section of ``RUN/config.yaml`` (``preset``,
    ``in_channels``, ``overrides``), load the latest checkpoint's weights with its EMA weights
    on top, and ``save_pretrained`` it to ``destination``."""
    import torch
    import yaml
    from safetensors.torch import load_file

    from swintormer.models import Swintormer, SwintormerConfig

    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise StepError(f"{config_path} not found (expected a training run folder)")
    section = yaml.safe_load(config_path.read_text())["model"]
    overrides = dict(section.get("overrides") or {})
    overrides["in_channels"] = int(section.get("in_channels", 6))
    checkpoint = latest_checkpoint(run_dir)
    ema_file = checkpoint / "ema.safetensors"
    if not ema_file.is_file():
        raise StepError(f"{ema_file} not found (the run keeps no EMA weights)")
    model = Swintormer(SwintormerConfig.preset(section.get("preset", "paper"), **overrides))
    state = model.state_dict()
    if (checkpoint / "model.safetensors").is_file():  # what the EMA does not average (if anything)
        state.update(load_file(str(checkpoint / "model.safetensors")))
    ema = load_file(str(ema_file))
    # The average also covers the non-persistent buffers (tables derived from the config, which
    # the network rebuilds itself and its state dict leaves out): those are skipped.
    derived = {name for name, _ in model.named_buffers()} - set(state)
    unknown = sorted(set(ema) - set(state) - derived)
    if unknown:
        raise StepError(f"{ema_file}: weights {unknown[:3]} do not belong to the network of {config_path}")
    state.update({name: tensor.to(state[name].dtype) for name, tensor in ema.items() if name in state})
    model.load_state_dict(state)
    with torch.no_grad():
        model.save_pretrained(destination)
    step = json.loads((checkpoint / "trainer_state.json").read_text()).get("step")
    patch = (yaml.safe_load(config_path.read_text()).get("data") or {}).get("patch_size")
    return {"run": str(run_dir), "checkpoint": checkpoint.name, "step": step, "weights": "EMA",
            "exported_to": str(destination), "patch_size": patch}


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def run_command(command: list[str]) -> float:
    """Run a project command in a fresh process from the repository root; returns its wall time."""
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO_ROOT, env=_environment(), capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise StepError(f"command failed (exit {done.returncode}): {' '.join(command)}\n{tail}")
    return time.perf_counter() - start


SEPARATOR = "__"  # KIND__NAME: one folder of links holds every set's images under unique names


def link_folder(folder: Path, files: dict[str, Path]) -> Path:
    """A fresh folder of symbolic links ``folder/KEY.png`` → file, so that one deblur or evaluate
    process handles every set (each process start costs seconds: torch and the model load)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for key, path in files.items():
        (folder / f"{key}.png").symlink_to(path.resolve())
    return folder


def set_files(out: Path, kinds: tuple[str, ...], part: str) -> dict[str, Path]:
    """``KIND__NAME`` → ``OUT/sets/KIND/PART/NAME.png`` for the given kinds."""
    return {f"{kind}{SEPARATOR}{path.stem}": path for kind in kinds for path in list_images(out / "sets" / kind / part)}


def deblur(model: Path, out: Path, name: str, kinds: tuple[str, ...], tile: int | None, args: argparse.Namespace) -> float:
    """Restore every set with one deblur process; results in ``OUT/restored/NAME/KIND/``."""
    inputs = link_folder(out / "links" / "input", set_files(out, kinds, "input"))
    restored = out / "restored" / name
    if restored.exists():
        shutil.rmtree(restored)
    flat = out / "links" / f"deblur_{name}"
    if flat.exists():
        shutil.rmtree(flat)
    command = [sys.executable, "-m", "pipelines.deblur", str(inputs), "--output", str(flat), "--model", str(model),
               "--no-progress"]
    if tile is not None:
        command += ["--tile", str(tile)]
    if args.device is not None:
        command += ["--device", args.device]
    seconds = run_command(command)
    for path in sorted(flat.iterdir()):
        kind, _, name = path.name.partition(SEPARATOR)
        (restored / kind).mkdir(parents=True, exist_ok=True)
        path.replace(restored / kind / name)
    flat.rmdir()
    return seconds


def evaluate(out: Path, method: str, kinds: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Score a method's restorations of the given sets with one evaluate process; per kind, the
    mean PSNR/SSIM/MAE and the per-image PSNR and SSIM (report in ``OUT/scores/METHOD.json``)."""
    targets = set_files(out, kinds, "target")
    if method == INPUT:
        restored = set_files(out, kinds, "input")
    else:
        restored = {key: out / "restored" / method / key.partition(SEPARATOR)[0] / f"{key.partition(SEPARATOR)[2]}.png"
                    for key in targets}
    target_dir = link_folder(out / "links" / f"{method}_target", targets)
    restored_dir = link_folder(out / "links" / f"{method}_restored", restored)
    report = out / "scores" / f"{method}.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    run_command([sys.executable, "-m", "pipelines.evaluate", "--restored", str(restored_dir), "--target", str(target_dir),
                 "--report", str(report), "--no-lpips", "--quiet"])
    data = json.loads(report.read_text())
    if data.get("missing_restored") or data.get("errors"):
        raise StepError(f"{report}: missing or unreadable restorations: "
                        f"{(data.get('missing_restored') or []) + (data.get('errors') or [])}")
    shutil.rmtree(target_dir)
    shutil.rmtree(restored_dir)
    scores = {}
    for kind in kinds:
        rows = [row for row in data["per_image"] if row["name"].partition(SEPARATOR)[0] == kind]
        scores[kind] = {"count": len(rows), **{m: float(np.mean([row[m] for row in rows])) for m in ("psnr", "ssim", "mae")},
                        "per_image_psnr": {row["name"].partition(SEPARATOR)[2]: float(row["psnr"]) for row in rows},
                        "per_image_ssim": {row["name"].partition(SEPARATOR)[2]: float(row["ssim"]) for row in rows}}
    return scores


# --------------------------------------------------------------------------- classical baselines


def run_classical(kind_dir: Path, out: Path, args: argparse.Namespace) -> float:
    """Wiener and Richardson–Lucy with the true kernel, in linear light (module docstring)."""
    from tools.classical_baselines import default_nsr, richardson_lucy_deconvolve, wiener_deconvolve

    start = time.perf_counter()
    for method in CLASSICAL:
        if (out / method / kind_dir.name).exists():
            shutil.rmtree(out / method / kind_dir.name)
    for path in list_images(kind_dir / "input"):
        blurry = read_image(path).pixels
        kernel = load_kernel(kind_dir / "kernels" / f"{path.stem}.safetensors")
        linear = srgb_to_linear(blurry)
        sigma = math.sqrt(args.shot_noise * float(np.mean(linear)) + args.read_noise**2)
        nsr = default_nsr(linear, sigma, 8)
        write_image(out / "wiener" / kind_dir.name / path.name, linear_to_srgb(wiener_deconvolve(linear, kernel, nsr)))
        restored = richardson_lucy_deconvolve(linear, kernel, RL_ITERATIONS)
        write_image(out / "richardson_lucy" / kind_dir.name / path.name, linear_to_srgb(restored))
    return time.perf_counter() - start


# --------------------------------------------------------------------------- scoring


def region_scores(restored_dir: Path, kind_dir: Path, threshold: float) -> dict[str, Any]:
    """Per image and mean PSNR of the in-focus (radius 0) and defocused (radius ≥ threshold) regions."""
    per_image = {}
    for target_path in list_images(kind_dir / "target"):
        radius = np.load(kind_dir / "radius" / f"{target_path.stem}.npy")
        restored = read_image(restored_dir / target_path.name).pixels
        target = read_image(target_path).pixels
        per_image[target_path.stem] = {"in_focus_psnr": masked_psnr(restored, target, radius == 0),
                                       "defocused_psnr": masked_psnr(restored, target, radius >= threshold)}
    return {"in_focus_psnr": float(np.mean([v["in_focus_psnr"] for v in per_image.values()])),
            "defocused_psnr": float(np.mean([v["defocused_psnr"] for v in per_image.values()])),
            "per_image": per_image}


def bokeh_scores(restored_dir: Path, bokeh_dir: Path, fraction: float) -> dict[str, Any]:
    return {path.stem: bokeh_texture_ratio(read_image(restored_dir / path.name).pixels, read_image(path).pixels, fraction)
            for path in list_images(bokeh_dir)}


def summarise(report: dict[str, Any]) -> None:
    """Gains over the blurry input per kind and method (None for ``sharp_clean``, whose input is
    the target), and the per-radius means of uniform defocus."""
    for kind, methods in report["scores"].items():
        base = methods[INPUT]
        for method, scores in methods.items():
            same = kind == "sharp_clean"
            scores["gain_psnr"] = None if same else scores["psnr"] - base["psnr"]
            scores["gain_ssim"] = None if same else scores["ssim"] - base["ssim"]
    radii = report["settings"]["radii"]
    by_radius: dict[str, dict[str, float]] = {}
    for method, scores in report["scores"]["defocus_uniform"].items():
        by_radius[method] = {}
        for radius in radii:
            values = [psnr for name, psnr in scores["per_image_psnr"].items() if name.endswith(f"_r{radius:g}")]
            by_radius[method][f"{radius:g}"] = float(np.mean(values))
    report["defocus_uniform_by_radius"] = by_radius


# --------------------------------------------------------------------------- contact sheet


def _best_window(maps: list[np.ndarray], tile: int, score) -> tuple[int, int]:
    """Top-left corner of the ``tile``² window (stride tile/8) that maximises
    ``score(sums)``, ``sums`` being the window's sum of each map divided by the window's area."""
    height, width = maps[0].shape
    integrals = [cv2.integral(np.ascontiguousarray(m, dtype=np.float64)) for m in maps]
    step = max(1, tile // 8)
    best, corner = -np.inf, (0, 0)
    for top in range(0, max(1, height - tile + 1), step):
        for left in range(0, max(1, width - tile + 1), step):
            bottom, right = min(top + tile, height), min(left + tile, width)
            area = (bottom - top) * (right - left)
            sums = [(i[bottom, right] - i[top, right] - i[bottom, left] + i[top, left]) / area for i in integrals]
            value = score(sums)
            if value > best:
                best, corner = value, (top, left)
    return corner


def _detail(image: np.ndarray) -> np.ndarray:
    lum = luminance(image)
    return np.hypot(cv2.Sobel(lum, cv2.CV_64F, 1, 0), cv2.Sobel(lum, cv2.CV_64F, 0, 1))


def _tile(image: np.ndarray | None, corner: tuple[int, int], tile: int) -> np.ndarray:
    canvas = np.full((tile, tile, 3), 40, dtype=np.uint8)
    if image is None:
        cv2.putText(canvas, "n/a", (tile // 2 - 14, tile // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (160, 160, 160), 1, cv2.LINE_AA)
        return canvas
    top, left = corner
    crop = image[top: top + tile, left: left + tile]
    canvas[: crop.shape[0], : crop.shape[1]] = np.rint(np.clip(crop, 0, 1) * 255).astype(np.uint8)
    return canvas


def _label(canvas: np.ndarray, text: str, origin: tuple[int, int], scale: float = 0.42) -> None:
    cv2.putText(canvas, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)


def contact_sheet(out: Path, models: list[str], report: dict[str, Any], tile: int) -> np.ndarray:
    """The contact sheet as an RGB uint8 array (module docstring)."""
    sets = out / "sets"
    radii = report["settings"]["radii"]
    rows: list[tuple[str, str, Path, Path | None, str]] = []  # label, kind, input, target, name
    used: set[str] = set()  # photos already shown: each row shows another photo while there are some

    def pick(names: list[str], photo_of) -> str:
        fresh = [n for n in names if photo_of(n) not in used]
        name = fresh[0] if fresh else names[len(rows) % len(names)]
        used.add(photo_of(name))
        return name

    middle = f"_r{radii[len(radii) // 2]:g}"
    for kind in KINDS:
        names = sorted(p.stem for p in list_images(sets / kind / "target"))
        if kind == "defocus_uniform":
            names = [n for n in names if n.endswith(middle)] or names
        name = pick(names, lambda n: n.rsplit("_r", 1)[0] if kind == "defocus_uniform" else n)
        label = kind.replace("_", " ") + (f" r={radii[len(radii) // 2]:g}" if kind == "defocus_uniform" else "")
        rows.append((label, kind, sets / kind / "input" / f"{name}.png", sets / kind / "target" / f"{name}.png", name))
    bokeh = sorted(p.stem for p in list_images(sets / "bokeh" / "input")) if (sets / "bokeh" / "input").is_dir() else []
    if bokeh:
        name = pick(bokeh, lambda n: n)
        rows.append(("real bokeh (no blur added)", "bokeh", sets / "bokeh" / "input" / f"{name}.png", None, name))
    columns = ["input", *models, "sharp"]
    label_width, header = 150, 20
    sheet = np.full((header + len(rows) * tile, label_width + len(columns) * tile, 3), 24, dtype=np.uint8)
    for column, title in enumerate(columns):
        _label(sheet, title[: max(4, tile // 9)], (label_width + column * tile + 4, 14))
    for row, (label, kind, input_path, target_path, name) in enumerate(rows):
        blurry = read_image(input_path).pixels
        target = read_image(target_path).pixels if target_path is not None else None
        if kind == "defocus_varying":
            radius = np.load(sets / kind / "radius" / f"{name}.npy")
            maps = [radius == 0, radius >= report["settings"]["defocus_threshold"], _detail(target)]
            # Both regions as evenly as possible (to 5%), then the most detail.
            corner = _best_window(maps, tile, lambda s: round(min(s[0], s[1]) * 20) + s[2] / (1 + s[2]))
        elif kind == "bokeh":
            corner = _best_window([smooth_region(blurry, report["settings"]["smooth_fraction"])], tile, lambda s: s[0])
        else:
            corner = _best_window([_detail(target)], tile, lambda s: s[0])
        images = [blurry] + [read_image(out / "restored" / model / kind / f"{name}.png").pixels for model in models] + [target]
        y = header + row * tile
        for column, image in enumerate(images):
            sheet[y: y + tile, label_width + column * tile: label_width + (column + 1) * tile] = _tile(image, corner, tile)
        words, lines = label.split(" "), [""]
        for word in words:
            if len(lines[-1]) + len(word) + 1 > 18:
                lines.append("")
            lines[-1] = (lines[-1] + " " + word).strip()
        for number, line in enumerate(lines + [name[:18]]):
            _label(sheet, line, (6, y + 20 + 18 * number), 0.42 if number < len(lines) else 0.36)
    return sheet


def write_sheet(path: Path, sheet: np.ndarray) -> int:
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    if not ok:
        raise StepError("PNG encoding of the contact sheet failed")
    atomic_write_bytes(path, encoded.tobytes())
    return len(encoded)


# --------------------------------------------------------------------------- report


def machine() -> dict[str, Any]:
    """The machine a report was measured on: CPU model, cores, GPU, PyTorch, OS."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU used"
    return {"cpu": cpu, "cores": cores, "torch": torch.__version__, "platform": platform.platform(),
            "python": platform.python_version(),
            "description": f"{cpu}, {cores} cores ({gpu}), PyTorch {torch.__version__}, {platform.system()} {platform.release()}"}


def _method_label(method: str, report: dict[str, Any]) -> str:
    return METHOD_LABELS.get(method, f"model {method}")


def render_tables(report: dict[str, Any]) -> list[str]:
    """The report's figures as Markdown lines (shared with ``tools/benchmark.py``)."""
    out: list[str] = []
    add = out.append
    settings = report["settings"]
    models = list(report["models"])
    add("| kind | method | images | PSNR | SSIM | ΔPSNR vs input | ΔSSIM vs input |")
    add("| --- | --- | --- | --- | --- | --- | --- |")
    for kind, methods in report["scores"].items():
        for method, scores in methods.items():
            gain = "—" if scores["gain_psnr"] is None or method == INPUT else f"{scores['gain_psnr']:+.2f}"
            gain_ssim = "—" if scores["gain_ssim"] is None or method == INPUT else f"{scores['gain_ssim']:+.4f}"
            add(f"| {kind} | {_method_label(method, report)} | {scores['count']} | {scores['psnr']:.2f} | "
                f"{scores['ssim']:.4f} | {gain} | {gain_ssim} |")
    add("")
    add("sharp_clean: the input is the target, so its PSNR is the evaluator's cap "
        f"({PSNR_CAP_DB:.0f} dB); a model's figure there is how far it moved a sharp photo.\n")
    radii = [f"{r:g}" for r in settings["radii"]]
    add("Uniform defocus by disc radius (mean PSNR, dB):\n")
    add("| method | " + " | ".join(f"r = {r} px" for r in radii) + " |")
    add("| --- |" + " --- |" * len(radii))
    for method, values in report["defocus_uniform_by_radius"].items():
        add(f"| {_method_label(method, report)} | " + " | ".join(f"{values[r]:.2f}" for r in radii) + " |")
    add("")
    add(f"Varying defocus by region (mean PSNR over images, dB; in focus: radius 0; defocused: radius ≥ "
        f"{settings['defocus_threshold']:g} px):\n")
    add("| method | in focus | Δ vs input | defocused | Δ vs input |")
    add("| --- | --- | --- | --- | --- |")
    base = report["regions"][INPUT]
    for method, scores in report["regions"].items():
        delta_in = "—" if method == INPUT else f"{scores['in_focus_psnr'] - base['in_focus_psnr']:+.2f}"
        delta_out = "—" if method == INPUT else f"{scores['defocused_psnr'] - base['defocused_psnr']:+.2f}"
        add(f"| {_method_label(method, report)} | {scores['in_focus_psnr']:.2f} | {delta_in} | "
            f"{scores['defocused_psnr']:.2f} | {delta_out} |")
    add("")
    if report["bokeh"] and models:
        add(f"Bokeh texture ratio on the real photos flagged bokeh (std of the luminance Laplacian in the "
            f"{settings['smooth_fraction']:.0%} smoothest pixels of the photo, output / input; 1.00 = no texture "
            "added):\n")
        add("| photo | " + " | ".join(models) + " |")
        add("| --- |" + " --- |" * len(models))
        photos = list(next(iter(report["bokeh"].values())))
        for photo in photos:
            add(f"| {photo} | " + " | ".join(f"{report['bokeh'][m][photo]['ratio']:.2f}" for m in models) + " |")
        add("| mean | " + " | ".join(f"{report['bokeh_mean'][m]:.2f}" for m in models) + " |")
        add("")
    if models:
        add(f"sharp_clean, worst image (PSNR of the output against the input; target ≥ {SHARP_CLEAN_TARGET_DB:g} dB):\n")
        add("| model | worst PSNR | image | meets the target |")
        add("| --- | --- | --- | --- |")
        for model in models:
            worst = report["sharp_clean_worst"][model]
            add(f"| {model} | {worst['psnr']:.2f} | {worst['image']} | {'yes' if worst['meets_target'] else '**no**'} |")
        add("")
    return out


def render_markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    settings = report["settings"]
    lines = ["# Default model by kind of degradation\n",
             f"Generated by `{meta['command']}` on {meta['date_utc']}, {meta['machine']['cpu']} "
             f"({meta['machine']['cores']} cores), in {meta['seconds_total']:.0f} s.\n",
             f"Sets: the {settings['photos']} test photos of `{settings['corpus']}`, centre crops of at most "
             f"{settings['crop']} px, seed {settings['seed']}; noise in linear light, shot {settings['shot_noise']:g}, "
             f"read σ {settings['read_noise']:g} (none in sharp_clean), no JPEG; bokeh: the flagged photos themselves, "
             f"{'whole' if settings['bokeh_whole'] else 'the same centre crops'}. Models:"]
    for name, source in report["models"].items():
        window = (f"windows of {source['deblur_tile']} px" if source.get("deblur_tile")
                  else "the deblur command's default windows")
        lines.append(f"- {name}: " + (f"EMA weights of `{source['run']}` {source['checkpoint']} (step {source['step']})"
                                      if "checkpoint" in source else f"`{source['path']}`") + f", {window}")
    lines.append("")
    lines.append("Wiener and Richardson–Lucy deconvolve in linear light (sRGB decoded, deconvolved, encoded), "
                 "as the blur was applied; they need the true kernel, so they appear only for uniform defocus "
                 "and motion.\n")
    lines += render_tables(report)
    lines.append("Runtime (s): " + ", ".join(f"{k} {v:.0f}" for k, v in meta["seconds"].items()) + ".\n")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def _parse_named(values: list[str], option: str) -> list[tuple[str, Path]]:
    pairs = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{option} {value!r}: expected NAME=PATH")
        if not MODEL_NAME.match(name) or name in (INPUT, *CLASSICAL):
            raise ValueError(f"{option} {value!r}: NAME must be letters, digits, '_', '.', '-' and not "
                             f"{INPUT}/{'/'.join(CLASSICAL)}")
        pairs.append((name, Path(path)))
    return pairs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, required=True, help="photo corpus folder (with manifest.json; its test split is used)")
    parser.add_argument("--out", type=Path, required=True, help="output folder: sets/, restored/, scores/, report.json, report.md")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=DIR", help="a model folder to evaluate (repeatable)")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="NAME=RUN_DIR",
                        help="a training run whose latest checkpoint's EMA weights are evaluated (repeatable)")
    parser.add_argument("--sheet", type=Path, default=None, help="contact sheet PNG (default: OUT/contact_sheet.png)")
    parser.add_argument("--sheet-tile", type=int, default=160, help="side of each crop of the contact sheet in px")
    parser.add_argument("--seed", type=int, default=0, help="seed of the degradations")
    parser.add_argument("--crop", type=int, default=512, help="side of the centre crop of each test photo")
    parser.add_argument("--radii", type=float, nargs="+", default=[2.0, 4.0, 6.0], help="disc radii of the uniform defocus set (px)")
    parser.add_argument("--bokeh-whole", action="store_true", help="whole bokeh photos instead of their centre crops")
    parser.add_argument("--every-radius", action="store_true", help="every radius on every photo (default: one radius per photo, in turn)")
    parser.add_argument("--shot-noise", type=float, default=1e-4, help="Poisson-Gaussian shot-noise factor a (variance a·x + b, linear light)")
    parser.add_argument("--read-noise", type=float, default=0.002, help="read-noise sigma (b = sigma²), linear light")
    parser.add_argument("--defocus-threshold", type=float, default=1.5, help="radius (px) from which a pixel counts as defocused")
    parser.add_argument("--min-region-fraction", type=float, default=0.1,
                        help="least share of the crop of each region (in focus, defocused) of a varying-defocus draw")
    parser.add_argument("--smooth-fraction", type=float, default=0.3, help="share of the smoothest pixels used by the bokeh measure")
    parser.add_argument("--tile", type=int, default=None,
                        help="--tile of the deblur command for every model (default: its own; for a --checkpoint, the run's patch size)")
    parser.add_argument("--device", default=None, help="--device of the deblur command (default: its own)")
    parser.add_argument("--sets-only", action="store_true", help="only write the degraded sets")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


def _check_args(args: argparse.Namespace) -> str | None:
    if args.crop < 16 or args.sheet_tile < 32:
        return "--crop must be at least 16 and --sheet-tile at least 32"
    if any(r <= 0 for r in args.radii) or len(set(args.radii)) != len(args.radii):
        return "--radii must be distinct and positive"
    if args.shot_noise < 0 or args.read_noise < 0:
        return "--shot-noise and --read-noise must not be negative"
    if not 0 < args.min_region_fraction < 0.5 or not 0 < args.smooth_fraction < 1 or args.defocus_threshold <= 0:
        return "--min-region-fraction must lie in (0, 0.5), --smooth-fraction in (0, 1), --defocus-threshold above 0"
    if not args.sets_only and not (args.model or args.checkpoint):
        return "give at least one --model or --checkpoint (or --sets-only)"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = _check_args(args)
    try:
        named = _parse_named(args.model, "--model") + _parse_named(args.checkpoint, "--checkpoint")
    except ValueError as error:
        problem = problem or str(error)
        named = []
    names = [name for name, _ in named]
    if not problem and len(set(names)) != len(names):
        problem = "model names must be distinct"
    for name, path in _parse_named(args.model, "--model") if not problem else []:
        if not (path / "config.json").is_file():
            problem = f"--model {name}={path}: not a model folder (no config.json)"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    log = (lambda message: None) if args.quiet else (lambda message: print(message, flush=True))
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    wall = time.perf_counter()
    seconds: dict[str, float] = {}
    try:
        entries = corpus_test_photos(args.corpus)
        start = time.perf_counter()
        sets = build_sets(args, entries, out, log)
        seconds["sets"] = time.perf_counter() - start
        if args.sets_only:
            return 0
        models: dict[str, dict[str, Any]] = {}
        checkpoints = {name for name, _ in _parse_named(args.checkpoint, "--checkpoint")}
        for name, path in named:
            if name in checkpoints:
                models[name] = export_checkpoint(path, out / "models" / name)
                models[name]["path"] = str(out / "models" / name)
                log(f"model {name}: {models[name]['checkpoint']} of {path} (EMA) -> {out / 'models' / name}")
            else:
                models[name] = {"path": str(path)}
        for name, source in models.items():
            # A checkpoint's network runs on windows of its training patch (as the run's final
            # model folder records); a model folder with the deblur command's own default.
            source["deblur_tile"] = args.tile or source.get("patch_size")
            kinds = (*KINDS, "bokeh") if sets["bokeh"]["images"] else KINDS
            seconds[f"deblur {name}"] = deblur(Path(source["path"]), out, name, kinds, source["deblur_tile"], args)
            log(f"deblur {name}: {seconds[f'deblur {name}']:.0f} s")
        start = time.perf_counter()
        for kind in KERNEL_SETS:
            run_classical(out / "sets" / kind, out / "restored", args)
            log(f"classical {kind}")
        seconds["classical"] = time.perf_counter() - start
        start = time.perf_counter()
        scores: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
        for method in (INPUT, *CLASSICAL, *models):
            for kind, values in evaluate(out, method, KERNEL_SETS if method in CLASSICAL else KINDS).items():
                scores[kind][method] = values
            log(f"scored {method}")
        scores = {kind: {m: methods[m] for m in (INPUT, *CLASSICAL, *models) if m in methods} for kind, methods in scores.items()}
        seconds["scoring"] = time.perf_counter() - start
        varying = out / "sets" / "defocus_varying"
        regions = {method: region_scores(varying / "input" if method == INPUT else out / "restored" / method / "defocus_varying",
                                         varying, args.defocus_threshold) for method in [INPUT, *models]}
        bokeh = {model: bokeh_scores(out / "restored" / model / "bokeh", out / "sets" / "bokeh" / "input", args.smooth_fraction)
                 for model in models if sets["bokeh"]["images"]}
        worst = {}
        for model in models:
            per_image = scores["sharp_clean"][model]["per_image_psnr"]
            image = min(per_image, key=per_image.get)
            worst[model] = {"psnr": per_image[image], "image": image,
                            "meets_target": per_image[image] >= SHARP_CLEAN_TARGET_DB}
        report: dict[str, Any] = {
            "meta": {"command": "python tools/evaluate_default_model.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                     "date_utc": started.strftime("%Y-%m-%d %H:%M UTC"), "machine": machine()},
            "settings": {"corpus": str(args.corpus), "photos": len(entries), "seed": args.seed, "crop": args.crop,
                         "radii": args.radii, "every_radius": args.every_radius, "bokeh_whole": args.bokeh_whole,
                         "shot_noise": args.shot_noise, "read_noise": args.read_noise,
                         "jpeg": None, "defocus_threshold": args.defocus_threshold,
                         "min_region_fraction": args.min_region_fraction, "smooth_fraction": args.smooth_fraction,
                         "rl_iterations": RL_ITERATIONS, "deblur_tile": args.tile, "deblur_device": args.device,
                         "classical_in_linear_light": True},
            "models": models, "sets": sets, "scores": scores, "regions": regions, "bokeh": bokeh,
            "bokeh_mean": {m: float(np.mean([v["ratio"] for v in b.values()])) for m, b in bokeh.items()},
            "sharp_clean_worst": worst,
        }
        summarise(report)
        sheet_path = args.sheet or out / "contact_sheet.png"
        start = time.perf_counter()
        sheet = contact_sheet(out, list(models), report, args.sheet_tile)
        report["sheet"] = {"path": str(sheet_path), "bytes": write_sheet(sheet_path, sheet),
                           "size": [int(sheet.shape[1]), int(sheet.shape[0])]}
        seconds["sheet"] = time.perf_counter() - start
    except StepError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    shutil.rmtree(out / "links", ignore_errors=True)
    seconds["total"] = time.perf_counter() - wall
    report["meta"]["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    report["meta"]["seconds_total"] = round(seconds["total"], 1)
    atomic_write_bytes(out / "report.json", (json.dumps(report, indent=2, allow_nan=False) + "\n").encode())
    atomic_write_bytes(out / "report.md", render_markdown(report).encode())
    log(f"wrote {out / 'report.json'}, {out / 'report.md'} and {sheet_path} ({report['sheet']['bytes'] / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
