"""``swintormer deblur INPUT... --output DIR``: deblur image files and folders.

A command-line face of :class:`swintormer.pipeline.DeblurPipeline`: every image is run on
overlapping windows at the training size (``--tile``/``--stride``; by default the size the model
was trained at when its folder records it), so any image size works in bounded memory
(``--whole`` runs each image in one pass instead, for comparison: the paper's inference
ablation). A 6-channel model
also needs the prior of every image: read from a prior cache (``--prior-cache``, written by
``swintormer cache-priors``), sampled now with the stage-one model (``--prior-model``), or read
from plain prior files (``--prior-folder``); a 3-channel (no-prior) model needs none.

Outputs are PNG files named after the input (``photo.jpg`` → ``DIR/photo.png``) with the input's
bit depth (8-bit in, 8-bit out; 16-bit in, 16-bit out), written atomically. An input is never
overwritten: an output folder equal to an input folder is refused, and so is any output path
that is also an input file. Folders are read non-recursively.

Errors: a bad input (missing file, unreadable or corrupt image, folder without images, failed
prior) is reported on one ``error: ...`` line and the other images are still processed; the exit
code is then 1. Problems that stop the whole run (bad options, model folder missing or
incomplete, output folder not writable) exit with 2 before any image is processed.

Runs as ``python -m pipelines.deblur`` and under ``accelerate launch -m pipelines.deblur``: with
several processes the images are shared out between them (on GPUs: ``--multi_gpu
--num_processes N``; several CPU processes on one machine: also ``--multi_gpu --num_processes N``,
as accelerate's ``--cpu`` launches a single process).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.cli import positive_int

if TYPE_CHECKING:
    import torch
    from accelerate import PartialState

    from swintormer.core.priors import PriorSource
    from swintormer.pipeline import DeblurPipeline

# torch, accelerate and the models are imported inside the functions that need them, so that
# ``--help`` and option errors answer at once.

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "swintormer" / "weights" / "default"
DEFAULT_TILE = 256


class RunError(Exception):
    """A problem that stops the whole run (exit code 2)."""


@dataclass
class Job:
    """One image to deblur and where its result goes."""

    source: Path
    destination: Path


@dataclass
class Plan:
    jobs: list[Job] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swintormer deblur",
        description=(
            "Deblur images with a Swintormer model, run on overlapping windows of the training size "
            "whose overlaps are averaged (any image size, memory bounded by the window batch). "
            "Each result is written to DIR/<input file stem>.png (always PNG) with the input's bit depth."
        ),
        epilog=(
            "A model with 6 input channels needs a prior for every image: --prior-cache (priors "
            "written by 'swintormer cache-priors'), --prior-model (sampled now; slow on a CPU) or "
            "--prior-folder (prior files named after the images). "
            "A 3-channel model needs no prior. Exit code: 0 all images written, 1 some inputs "
            "failed (each reported on one line), 2 nothing was done (bad options, model, output)."
        ),
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", type=Path,
                        help="image files (PNG, JPEG, TIFF; 8 or 16 bit) or folders of images")
    parser.add_argument("--output", "-o", required=True, type=Path, metavar="DIR",
                        help="folder for the results (created if missing; must not be an input folder)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, metavar="DIR",
                        help="model folder with config.json and model.safetensors (default: the shipped "
                        "model, %(default)s)")
    parser.add_argument("--tile", type=positive_int, default=None,
                        help="window size in pixels; best at the training patch size (default: the size the "
                        f"model folder records it was trained at, else {DEFAULT_TILE})")
    parser.add_argument("--stride", type=positive_int, default=None,
                        help="distance between window starts, at most --tile; smaller means more overlap, "
                        "better and slower (default: 3/4 of the tile; the paper's best: --tile 512 --stride 220)")
    parser.add_argument("--whole", action="store_true",
                        help="run each image in one forward pass instead of windows (padded to the model's size "
                        "multiple); no seams, but memory grows with the image; --tile/--stride/--batch/--blend "
                        "are then unused")
    parser.add_argument("--batch", type=positive_int, default=4,
                        help="windows per forward pass; memory grows with it (default: %(default)s)")
    parser.add_argument("--blend", choices=("average", "feather"), default="average",
                        help="how overlaps are combined: plain mean (the paper) or a linear cross-fade "
                        "over the overlap (default: %(default)s)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16 runs the network under bfloat16 autocast (default: %(default)s)")
    parser.add_argument("--device", default="auto",
                        help="torch device, e.g. cpu, cuda, cuda:1, mps; 'auto' lets accelerate choose "
                        "(default: %(default)s)")
    priors = parser.add_argument_group("priors (only for models with 6 input channels)")
    source = priors.add_mutually_exclusive_group()
    source.add_argument("--prior-cache", type=Path, metavar="DIR",
                        help="read each image's prior from this prior cache")
    source.add_argument("--prior-model", type=Path, metavar="DIR",
                        help="sample each image's prior with this stage-one model folder")
    source.add_argument("--prior-folder", type=Path, metavar="DIR",
                        help="read each image's prior from DIR/<image stem>.safetensors|.png|.tif "
                        "(priors made by another tool)")
    priors.add_argument("--prior-steps", type=positive_int, default=50,
                        help="DDIM steps when sampling with --prior-model (default: %(default)s, the paper's T)")
    priors.add_argument("--prior-timestep-spacing", choices=("leading", "trailing"), default="leading",
                        help="DDIM timestep spacing for --prior-model sampling, as 'cache-priors "
                        "--timestep-spacing' (default: %(default)s, the authors')")
    priors.add_argument("--prior-seed", type=int, default=0,
                        help="seed for --prior-model sampling; each image's noise comes from this seed "
                        "and its file name (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


# ---------------------------------------------------------------------------------------------
# Planning: which files, which outputs, what is refused


def _resolved(path: Path) -> Path:
    return path.expanduser().resolve()


def plan_jobs(inputs: list[Path], output_dir: Path) -> Plan:
    """Expand folders, name the outputs, and collect per-input problems.

    Raises :class:`RunError` when the output folder is one of the input folders.
    """
    from swintormer.core.image_io import IMAGE_EXTENSIONS, list_images

    output_resolved = _resolved(output_dir)
    plan = Plan()
    candidates: list[Path] = []
    for given in inputs:
        if given.is_dir():
            if _resolved(given) == output_resolved:
                raise RunError(f"the output folder {output_dir} is an input folder; its images would be overwritten")
            images = list_images(given)
            if not images:
                extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
                plan.problems.append(f"{given}: folder holds no images ({extensions})")
            candidates.extend(images)
        elif given.exists():
            candidates.append(given)
        else:
            plan.problems.append(f"{given}: no such file or folder")

    input_files = {_resolved(path) for path in candidates}
    claimed: dict[Path, Path] = {}
    seen_sources: set[Path] = set()
    for source in candidates:
        if _resolved(source) in seen_sources:
            continue  # the same file given twice (directly and through its folder)
        seen_sources.add(_resolved(source))
        destination = output_dir / f"{source.stem}.png"
        key = _resolved(destination)
        if key in input_files:
            plan.problems.append(
                f"{source}: its output {destination} would overwrite an input; choose another --output"
            )
        elif key in claimed:
            plan.problems.append(
                f"{source}: its output {destination} is already the output of {claimed[key]} (same file name)"
            )
        else:
            claimed[key] = source
            plan.jobs.append(Job(source, destination))
    return plan


def ensure_writable_folder(folder: Path) -> None:
    """Create ``folder`` if needed and prove a file can be created in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        reason = error.strerror or str(error)
        raise RunError(f"output folder {folder} is not writable ({reason})") from None


# ---------------------------------------------------------------------------------------------
# Model and priors


def make_prior_source(args: argparse.Namespace, device: torch.device) -> PriorSource | None:
    """The prior source the options name (None when none is named)."""
    if args.prior_cache is not None:
        if not args.prior_cache.is_dir():
            raise RunError(f"prior cache folder not found: {args.prior_cache}")
        from ldm_prior.cache import PriorCache

        try:
            return PriorCache(args.prior_cache)
        except (OSError, ValueError) as error:
            raise RunError(f"cannot open the prior cache {args.prior_cache}: {error}") from None
    if args.prior_folder is not None:
        from swintormer.core.priors import PriorFolder

        try:
            return PriorFolder(args.prior_folder)
        except FileNotFoundError as error:
            raise RunError(str(error)) from None
    if args.prior_model is not None:
        from ldm_prior.prior_source import SampledPriors
        from ldm_prior.sampling import SamplingSettings

        settings = SamplingSettings(steps=args.prior_steps, timestep_spacing=args.prior_timestep_spacing)
        try:
            return SampledPriors.from_pretrained(args.prior_model, settings, seed=args.prior_seed, device=device)
        except (OSError, ValueError) as error:
            raise RunError(f"cannot load the prior model {args.prior_model}: {error}") from None
    return None


def load_pipeline(args: argparse.Namespace, device: torch.device) -> DeblurPipeline:
    """The model folder as a pipeline with the options' settings and prior source."""
    from swintormer.pipeline import DeblurPipeline

    if not args.model.is_dir():
        hint = " (the shipped default model is not installed; pass --model DIR)" if args.model == DEFAULT_MODEL_DIR else ""
        raise RunError(f"model folder not found: {args.model}{hint}")
    try:
        pipe = DeblurPipeline.from_pretrained(
            args.model, device=device, tile=args.tile, stride=args.stride, batch_size=args.batch,
            blend=args.blend, precision=args.precision, whole=args.whole)
    except (FileNotFoundError, ValueError) as error:
        raise RunError(str(error)) from None
    prior = make_prior_source(args, device)
    in_channels = pipe.model.config.in_channels
    if in_channels == 3 and prior is not None:
        raise RunError(f"the model {args.model} takes no prior (3 input channels); "
                       "drop --prior-cache/--prior-model/--prior-folder")
    if in_channels == 6 and prior is None:
        raise RunError(f"the model {args.model} needs a prior for every image (6 input channels): "
                       "give --prior-cache DIR, --prior-model DIR or --prior-folder DIR")
    if in_channels not in (3, 6):
        raise RunError(f"the model {args.model} has {in_channels} input channels; deblur supports 3 (no prior) or 6")
    pipe.prior = prior
    pipe.progress = not args.no_progress
    return pipe


def resolve_device(requested: str) -> tuple[torch.device, PartialState]:
    """The device to run on and this process's place among the launched processes.

    On a machine without an accelerator the processes must ask for the CPU to see each other
    (see ``swintormer.core.distributed``); otherwise each would believe it is alone and do every image.
    """
    import torch
    from accelerate import PartialState

    from swintormer.core.distributed import process_state

    if requested == "auto":
        state = process_state()
        return state.device, state
    try:
        device = torch.device(requested)
    except RuntimeError as error:
        raise RunError(f"--device: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"--device {requested}: CUDA is not available on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RunError(f"--device {requested}: MPS is not available on this machine")
    return device, PartialState(cpu=device.type == "cpu")


# ---------------------------------------------------------------------------------------------


def _one_line(error: BaseException, source: Path) -> str:
    message = " ".join(str(error).split()) or type(error).__name__
    return message if message.startswith(str(source)) else f"{source}: {message}"


def deblur_one(job: Job, pipe: DeblurPipeline) -> None:
    from swintormer.core.image_io import read_image, write_image

    loaded = read_image(job.source)
    restored = pipe(loaded.pixels, source_path=job.source)
    write_image(job.destination, restored, bit_depth=loaded.bit_depth)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.stride is not None and args.tile is not None and args.stride > args.tile:
        print(f"error: --stride {args.stride} is larger than --tile {args.tile}; windows would leave gaps",
              file=sys.stderr)
        return 2
    try:
        plan = plan_jobs(args.inputs, args.output)
        device, state = resolve_device(args.device)
        pipe = load_pipeline(args, device)
        ensure_writable_folder(args.output)
    except RunError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    from tqdm.auto import tqdm

    show_progress = not args.no_progress and state.is_local_main_process
    pipe.progress = show_progress
    # Shared out by position, so every process knows its images without talking to the others.
    my_jobs = plan.jobs[state.process_index :: state.num_processes]
    problems = list(plan.problems) if state.is_main_process else []
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    written = 0
    for job in tqdm(my_jobs, desc="images", unit="img", disable=not show_progress):
        try:
            deblur_one(job, pipe)
        except (ValueError, OSError, KeyError) as error:  # ImageReadError is a ValueError
            problem = _one_line(error, job.source)
            problems.append(problem)
            tqdm.write(f"error: {problem}", file=sys.stderr)  # keeps the progress bars intact
            continue
        written += 1
    summary = f"wrote {written} of {len(my_jobs)} image(s) to {args.output}"
    if state.num_processes > 1:
        summary = f"process {state.process_index}/{state.num_processes}: {summary}"
    if problems:
        summary += f"; {len(problems)} problem(s) reported above"
    print(summary, file=sys.stderr if problems else sys.stdout)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
