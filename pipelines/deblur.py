"""``swintormer deblur INPUT... --output DIR``: deblur image files and folders.

A command-line face of :class:`swintormer.pipeline.DeblurPipeline`: every image is run on
overlapping windows at the training size (``--tile``/``--stride``; by default the size the model
was trained at when its folder records it), so any image size works in bounded memory
(``--whole`` runs each image in one pass instead, for comparison: the paper's inference
ablation). A 6-channel model
also needs the prior of every image: read from a prior cache (``--prior-cache``, written by
``swintormer cache-priors``), sampled now with the stage-one model (``--prior-model``), or read
from plain prior files (``--prior-folder``); a 3-channel (no-prior) model needs none. A model
trained on cached priors records their settings (its prior contract, in ``pipeline.json``):
``--prior-model`` samples with them (the same file gets the cached prior, bit for bit) and a
cache or stage-one model made otherwise is refused unless ``--allow-prior-mismatch``.

Outputs keep the input's file name, format and bit depth (``photo.jpg`` → ``DIR/photo.jpg``,
16-bit PNG/TIFF stay 16-bit; HEIC is written as JPEG), its ICC profile, EXIF (orientation reset
to 1, since the pixels are written upright, and a Software tag), XMP, alpha channel and
grayscale-ness (:mod:`swintormer.photo`, :mod:`swintormer.core.image_io`); ``--format`` and
``--quality`` override the format; ``--to-srgb`` converts the colour to sRGB. Files are written
atomically. An input is never overwritten: an output folder equal to an input folder is refused,
and so is any output path that is also an input file; an existing output is an error for its
image unless ``--overwrite`` (replace it) or ``--skip-existing`` (keep it when it is a complete,
readable image) is given, so an interrupted batch is finished by running the same command again
with ``--skip-existing``. Temporary files a killed run left for the planned outputs are removed
at start. Folders are read non-recursively.

Safety: every header is checked against ``--max-megapixels`` before decoding (PNG and JPEG
headers are parsed directly; OpenCV's own guard ``OPENCV_IO_MAX_IMAGE_PIXELS`` is set to the
same limit), and the memory an image needs is estimated against the memory available: the window
batch, then the tile, is lowered to fit, else the image is refused.

Errors: a bad input (missing file, unsupported format, unreadable, corrupt or too large image,
failed prior, an existing output) is reported on one ``error: FILE: reason`` line and the other
images are still processed; the exit code is then 1. Problems that stop the whole run (bad
options, model folder missing or incomplete, output folder not writable) exit with 2 before any
image is processed. Ctrl-C stops after the image in progress (exit code 130); a second Ctrl-C
stops at once (the image in progress is not written).

Runs as ``python -m pipelines.deblur`` and under ``accelerate launch -m pipelines.deblur``: with
several processes the images are shared out between them (on GPUs: ``--multi_gpu
--num_processes N``; several CPU processes on one machine: also ``--multi_gpu --num_processes N``,
as accelerate's ``--cpu`` launches a single process).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.cli import positive_int

if TYPE_CHECKING:
    import torch
    from accelerate import PartialState

    from swintormer.core.priors import PriorContract, PriorSource
    from swintormer.pipeline import DeblurPipeline

# torch, accelerate, OpenCV and the models are imported inside the functions that need them, so
# that ``--help`` and option errors answer at once (and OpenCV's pixel limit can still be set).

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "swintormer" / "weights" / "default"
DEFAULT_TILE = 256
DEFAULT_MAX_MEGAPIXELS = 200.0
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's convention
FORMAT_CHOICES = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "tiff": "TIFF", "tif": "TIFF", "webp": "WEBP"}


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


def quality_value(text: str) -> int:
    """argparse type for --quality: an integer from 1 to 100."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer from 1 to 100, got {text!r}") from None
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"expected an integer from 1 to 100, got {value}")
    return value


def positive_number(text: str) -> float:
    """argparse type for --max-megapixels: a number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swintormer deblur",
        description=(
            "Deblur photos with a Swintormer model, run on overlapping windows of the training size "
            "whose overlaps are averaged (any image size, memory bounded by the window batch). "
            "Each result is written to DIR with the input's file name, format and bit depth "
            "(photo.jpg -> DIR/photo.jpg; 16-bit PNG/TIFF stay 16-bit; HEIC is written as JPEG), "
            "keeping its ICC profile, EXIF (orientation reset to 1: the pixels are written upright; "
            "a Software tag added), XMP and resolution. The colour is deblurred in the file's own "
            "encoded values and the same profile is embedded again, unless --to-srgb. An alpha "
            "channel is copied unchanged (only the colour is deblurred). A grayscale image stays "
            "grayscale: its channel is given to the model as R=G=B and the three output channels "
            "are averaged back into one."
        ),
        epilog=(
            "A model with 6 input channels needs a prior for every image: --prior-cache (priors "
            "written by 'swintormer cache-priors'), --prior-model (sampled now; slow on a CPU) or "
            "--prior-folder (prior files named after the images). "
            "A 3-channel model needs no prior. An existing output is an error for its image unless "
            "--overwrite or --skip-existing is given; to finish an interrupted batch, run the same "
            "command with --skip-existing. Exit code: 0 all images written (or skipped), 1 some "
            "inputs failed (each reported on one 'error: FILE: reason' line), 2 nothing was done "
            "(bad options, model, output folder), 130 stopped by Ctrl-C (after the image in "
            "progress; a second Ctrl-C stops at once)."
        ),
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", type=Path,
                        help="image files (PNG, JPEG, TIFF, WebP, HEIC with pillow-heif; 8 or 16 bit) or "
                        "folders of images")
    parser.add_argument("--output", "-o", required=True, type=Path, metavar="DIR",
                        help="folder for the results (created if missing; must not be an input folder)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, metavar="DIR",
                        help="model folder with config.json and model.safetensors (default: the shipped "
                        "model, %(default)s)")
    output = parser.add_argument_group("output files")
    output.add_argument("--format", choices=sorted(FORMAT_CHOICES), default=None, type=str.lower,
                        help="write every result in this format instead of the input's own (JPEG and WebP "
                        "are 8-bit; JPEG cannot hold alpha)")
    output.add_argument("--quality", type=quality_value, default=None, metavar="1-100",
                        help="JPEG and lossy WebP quality (default: 95; a lossless WebP stays lossless "
                        "unless --quality is given); JPEG keeps a JPEG input's chroma subsampling, "
                        "others get 4:4:4")
    output.add_argument("--to-srgb", action="store_true",
                        help="convert the colour from the embedded ICC profile to sRGB before deblurring "
                        "and embed sRGB (default: keep the file's own values and profile); untagged and "
                        "grayscale images are left as they are")
    existing = output.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace outputs that already exist")
    existing.add_argument("--skip-existing", action="store_true",
                          help="skip an image whose output already exists and is a complete, readable image "
                          "(a damaged one is redone)")
    output.add_argument("--max-megapixels", type=positive_number, default=DEFAULT_MAX_MEGAPIXELS, metavar="MPX",
                        help="refuse images whose header declares more pixels than this, before decoding "
                        "them (default: %(default)g)")
    windows = parser.add_argument_group("inference")
    windows.add_argument("--tile", type=positive_int, default=None,
                         help="window size in pixels; best at the training patch size (default: the size the "
                         f"model folder records it was trained at, else {DEFAULT_TILE}); capped at the image's "
                         "larger side rounded up to the model's size multiple, and lowered when memory is short")
    windows.add_argument("--stride", type=positive_int, default=None,
                         help="distance between window starts, at most --tile; smaller means more overlap, "
                         "better and slower (default: 3/4 of the tile; the paper's best: --tile 512 --stride 220)")
    windows.add_argument("--whole", action="store_true",
                         help="run each image in one forward pass instead of windows (padded to the model's size "
                         "multiple); no seams, but memory grows with the image; --tile/--stride/--batch/--blend "
                         "are then unused")
    windows.add_argument("--batch", type=positive_int, default=4,
                         help="windows per forward pass; memory grows with it; lowered when memory is short "
                         "(default: %(default)s)")
    windows.add_argument("--blend", choices=("average", "feather"), default="average",
                         help="how overlaps are combined: plain mean (the paper) or a linear cross-fade "
                         "over the overlap (default: %(default)s)")
    windows.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                         help="bf16 runs the network under bfloat16 autocast (default: %(default)s)")
    windows.add_argument("--device", default="auto",
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
    priors.add_argument("--prior-steps", type=positive_int,
                        help="DDIM steps when sampling with --prior-model (default: the model's prior contract, "
                        "i.e. what its training priors were made with; else 50, the paper's T)")
    priors.add_argument("--prior-timestep-spacing", choices=("leading", "trailing"),
                        help="DDIM timestep spacing for --prior-model sampling, as 'cache-priors "
                        "--timestep-spacing' (default: the model's prior contract; else leading, the authors')")
    priors.add_argument("--prior-seed", type=int,
                        help="seed for --prior-model sampling; each image's noise comes from this seed and the "
                        "image file's SHA-256, as in the prior cache (default: the model's prior contract; else 0)")
    priors.add_argument("--allow-prior-mismatch", action="store_true",
                        help="use a prior cache or stage-one model whose settings differ from the model's "
                        "prior contract (model/pipeline.json) instead of refusing it; results are then "
                        "usually worse")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


# ---------------------------------------------------------------------------------------------
# Planning: which files, which outputs, what is refused


def _resolved(path: Path) -> Path:
    return path.expanduser().resolve()


def plan_jobs(inputs: list[Path], output_dir: Path, output_format: str | None = None) -> Plan:
    """Expand folders, name the outputs, and collect per-input problems.

    A file whose extension is not a supported image format is reported as such (and claims no
    output name). Raises :class:`RunError` when the output folder is one of the input folders.
    """
    from swintormer.core.image_io import PHOTO_EXTENSIONS, list_photos, output_file_name, photo_format_of, \
        unsupported_format_message

    output_resolved = _resolved(output_dir)
    plan = Plan()
    candidates: list[Path] = []
    for given in inputs:
        if given.is_dir():
            if _resolved(given) == output_resolved:
                raise RunError(f"the output folder {output_dir} is an input folder; its images would be overwritten")
            images = list_photos(given)
            if not images:
                extensions = ", ".join(sorted(PHOTO_EXTENSIONS))
                plan.problems.append(f"{given}: folder holds no images ({extensions})")
            candidates.extend(images)
        elif given.exists():
            if photo_format_of(given) is None:
                plan.problems.append(unsupported_format_message(given))
            else:
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
        name = output_file_name(source.name, photo_format_of(source), output_format)
        destination = output_dir / name
        key = _resolved(destination)
        if key in input_files:
            plan.problems.append(
                f"{source}: its output {destination} would overwrite an input; choose another --output"
            )
        elif key in claimed:
            why = "same file name" if name == claimed[key].name == source.name else "same stem and output format"
            plan.problems.append(
                f"{source}: its output {destination} is already the output of {claimed[key]} ({why})"
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


def _refuse_mismatch(args: argparse.Namespace, what: str, difference: str | None) -> None:
    """Refuse a prior source made otherwise than the model's training priors (one line)."""
    if difference and not args.allow_prior_mismatch:
        raise RunError(f"{what} does not match the prior the model {args.model} was trained with ({difference}; "
                       "its pipeline.json); use the matching one, or --allow-prior-mismatch")
    if difference:
        print(f"warning: {what} does not match the model's prior contract ({difference})", file=sys.stderr)


def make_prior_source(args: argparse.Namespace, device: torch.device,
                      contract: PriorContract | None = None) -> PriorSource | None:
    """The prior source the options name (None when none is named), checked against the model's
    prior contract when it has one; sampling settings not given default to the contract's."""
    if args.prior_cache is not None:
        if not args.prior_cache.is_dir():
            raise RunError(f"prior cache folder not found: {args.prior_cache}")
        from ldm_prior.cache import PriorCache

        try:
            cache = PriorCache(args.prior_cache)
        except (OSError, ValueError) as error:
            raise RunError(f"cannot open the prior cache {args.prior_cache}: {error}") from None
        if contract is not None:
            _refuse_mismatch(args, f"the prior cache {args.prior_cache}", contract.difference(cache.settings))
        return cache
    if args.prior_folder is not None:
        from swintormer.core.priors import PriorFolder

        try:
            return PriorFolder(args.prior_folder)
        except FileNotFoundError as error:
            raise RunError(str(error)) from None
    if args.prior_model is not None:
        from ldm_prior.model import PriorModel
        from ldm_prior.prior_source import SampledPriors
        from ldm_prior.sampling import SamplingSettings
        from swintormer.core.priors import PriorContract

        try:
            model = PriorModel.from_pretrained(args.prior_model).to(device)
        except (OSError, ValueError) as error:
            raise RunError(f"cannot load the prior model {args.prior_model}: {error}") from None
        asked = {"steps": args.prior_steps, "timestep_spacing": args.prior_timestep_spacing, "seed": args.prior_seed}
        asked = {key: value for key, value in asked.items() if value is not None}
        if contract is None:  # a model with no record: the sampler's and the cache job's defaults
            defaults = {**SamplingSettings().as_metadata(), "seed": "0", "prior_fingerprint": model.fingerprint()}
            wanted = PriorContract.from_metadata(defaults).model_copy(update=asked)
        else:
            wanted = contract.model_copy(update=asked)
            found = wanted.model_copy(update={"prior_fingerprint": model.fingerprint()})
            _refuse_mismatch(args, f"sampling with {args.prior_model} as asked",
                             contract.difference(found.as_metadata()))
        return SampledPriors.from_contract(model, wanted)
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
    in_channels = pipe.model.config.in_channels
    asked_for_prior = any(value is not None for value in (args.prior_cache, args.prior_model, args.prior_folder))
    if in_channels == 3 and asked_for_prior:  # said before any prior model is loaded
        raise RunError(f"the model {args.model} takes no prior (3 input channels); "
                       "drop --prior-cache/--prior-model/--prior-folder")
    prior = make_prior_source(args, device, pipe.prior_contract)
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
    """``FILE: reason`` on one line, whatever the exception (its type named when it is not one
    of the expected kinds of bad input)."""
    if isinstance(error, MemoryError):
        message = "out of memory while processing this image (MemoryError)"
    else:
        message = " ".join(str(error).split()) or type(error).__name__
        if not isinstance(error, (ValueError, OSError, KeyError)):
            message = f"{type(error).__name__}: {message}"
    if len(message) > 500:
        message = message[:497] + "..."
    return message if message.startswith(str(source)) else f"{source}: {message}"


def trained_tile(model_dir: Path) -> int | None:
    """The window size a model folder records it was trained at (``pipeline.json``), if any."""
    from swintormer.pipeline import PIPELINE_CONFIG_NAME

    try:
        tile = json.loads((model_dir / PIPELINE_CONFIG_NAME).read_text(encoding="utf-8")).get("tile")
    except (OSError, ValueError, AttributeError):
        return None
    return tile if isinstance(tile, int) else None


def set_opencv_pixel_limit(max_megapixels: float) -> None:
    """OpenCV reads ``OPENCV_IO_MAX_IMAGE_PIXELS`` once, when it loads; set it to our limit if
    it has not loaded yet (it refuses larger images itself, besides our header check)."""
    if "cv2" not in sys.modules:
        os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(max(1, int(max_megapixels * 1e6)))


def output_is_complete(path: Path, max_megapixels: float) -> bool:
    """Whether ``path`` holds a complete image this reader can decode."""
    from swintormer.core.image_io import read_image_file

    try:
        read_image_file(path, max_megapixels=max_megapixels)
    except Exception:
        return False
    return True


class StopAfterCurrent:
    """Ctrl-C (SIGINT) handling for a batch: the first asks to stop after the image in progress,
    a second raises KeyboardInterrupt at once. Installed only in the main thread."""

    def __init__(self, say) -> None:
        self.requested = False
        self._say = say
        self._previous = None
        self._installed = False

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self._say("interrupted: stopping after the image in progress (press Ctrl-C again to stop at once)")

    def __enter__(self) -> "StopAfterCurrent":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.stride is not None and args.tile is not None and args.stride > args.tile:
        print(f"error: --stride {args.stride} is larger than --tile {args.tile}; windows would leave gaps",
              file=sys.stderr)
        return 2
    output_format = FORMAT_CHOICES[args.format] if args.format else None
    set_opencv_pixel_limit(args.max_megapixels)
    try:
        plan = plan_jobs(args.inputs, args.output, output_format)
        device, state = resolve_device(args.device)
        pipe = load_pipeline(args, device)
        ensure_writable_folder(args.output)
    except RunError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    from tqdm.auto import tqdm

    from swintormer.photo import PhotoOptions, restore_photo
    from swintormer.core.files import atomic_write_bytes, remove_stale_temporaries
    from swintormer.core.image_io import ImageTooLargeError

    def say(line: str) -> None:
        tqdm.write(line, file=sys.stderr)  # keeps the progress bars intact

    show_progress = not args.no_progress and state.is_local_main_process
    pipe.progress = show_progress
    trained = trained_tile(args.model)
    if args.tile is not None and trained is not None and args.tile != trained and state.is_main_process:
        say(f"warning: --tile {args.tile} differs from the {trained} px the model was trained at "
            "(its pipeline.json); results are usually best at the training size")
    # Shared out by position, so every process knows its images without talking to the others.
    my_jobs = plan.jobs[state.process_index :: state.num_processes]
    for job in my_jobs:  # what a killed run left (each process clears only its own outputs')
        remove_stale_temporaries(job.destination.parent, job.destination.name)
    problems = list(plan.problems) if state.is_main_process else []
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    options = PhotoOptions(format=output_format, quality=args.quality, to_srgb=args.to_srgb,
                           max_megapixels=args.max_megapixels)
    written = skipped = 0
    said_capped = False
    with StopAfterCurrent(say) as stop:
        try:
            for job in tqdm(my_jobs, desc="images", unit="img", disable=not show_progress):
                if stop.requested:
                    break
                try:
                    if job.destination.exists() or job.destination.is_symlink():
                        if args.skip_existing and output_is_complete(job.destination, args.max_megapixels):
                            skipped += 1
                            continue
                        if args.skip_existing:
                            say(f"note: {job.destination} is incomplete or unreadable; deblurring {job.source} again")
                        elif not args.overwrite:
                            raise FileExistsError(
                                f"{job.source}: its output {job.destination} already exists; pass --overwrite "
                                "to replace it or --skip-existing to keep it")
                    restored = restore_photo(job.source, pipe, options)
                    atomic_write_bytes(job.destination, restored.encoded.data)
                except Exception as error:  # every failure is this image's: report it and go on
                    problem = _one_line(error, job.source)
                    if isinstance(error, ImageTooLargeError) and "above the limit" in problem:
                        problem += " (--max-megapixels)"
                    problems.append(problem)
                    say(f"error: {problem}")
                    continue
                written += 1
                fitted = restored.fitted
                if fitted.capped_to_image and not said_capped:
                    said_capped = True
                    say(f"note: the tile {pipe.settings.tile} is larger than some images need; each image's "
                        f"windows are capped at its larger side rounded up to the model's multiple of "
                        f"{pipe.model.config.size_multiple} (e.g. {fitted.settings.tile} for {job.source})")
                for note in [*fitted.notes, *restored.notes]:
                    say(f"note: {job.source}: {note}")
        except KeyboardInterrupt:
            print(f"error: stopped at once by a second Ctrl-C; wrote {written} of {len(my_jobs)} image(s) "
                  f"to {args.output}; run again with --skip-existing to do the rest", file=sys.stderr)
            return EXIT_INTERRUPTED
    done = f"wrote {written} of {len(my_jobs)} image(s) to {args.output}"
    if skipped:
        done += f", skipped {skipped} already done"
    if state.num_processes > 1:
        done = f"process {state.process_index}/{state.num_processes}: {done}"
    if stop.requested:
        print(f"stopped by Ctrl-C: {done}; run again with --skip-existing to do the rest", file=sys.stderr)
        return EXIT_INTERRUPTED
    if problems:
        done += f"; {len(problems)} problem(s) reported above"
    print(done, file=sys.stderr if problems else sys.stdout)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
