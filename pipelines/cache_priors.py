"""``accelerate launch -m pipelines.cache_priors --prior DIR --data DIR --out CACHE``: sample the
stage-one prior of every blurry image of a dataset and store it in a prior cache.

``--data`` is a split folder or a dataset root holding several splits (``train/`` and ``test/``,
DPDD's ``train_c/``, ``val_c/``, ``test_c/``...): one cache then holds every split, keyed by the
image's path relative to ``--data``, and stage two run with the same ``--data`` reads its
training and validation priors from it. The images are sorted by that relative path and shared
out round-robin between the processes; each image's noise comes from its own seed (the run
seed and the SHA-256 of the image file), so one process and many build the same cache, and
``swintormer deblur --prior-model`` samples the same prior for the same file. Entries are written atomically; a rerun (after a
crash or ``kill -9``) skips the valid entries and makes the rest. SIGTERM, SIGINT or SIGUSR1
stop a build after the entry in progress, with one line and exit code 75 (a second SIGINT
aborts at once); the rerun continues. ``--verify`` makes nothing: it
checks every entry (present, readable, same settings as the manifest, same source hash, right
size) and exits 1 if any is not. ``--export DIR`` makes nothing either: it writes every image's
cached prior as a 16-bit PNG ``DIR/<image stem>.png`` (``DIR/<split>/<image stem>.png`` for a
root with several splits), to look at, or to score against the sharp images like any
restoration (``swintormer evaluate --restored DIR/test --target ROOT/test``). ``--split NAME``
limits any of the three to that split of the root (``--export DIR --split test`` writes the test
split's priors alone). The cache format is described in ``ldm_prior/cache.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.cli import positive_int

if TYPE_CHECKING:  # imported lazily below, so that --help does not load torch
    from ldm_prior.cache import PriorCache

DATA_LAYOUTS = ("auto", "dpdd", "gopro", "hide", "folder", "images")


class UserError(Exception):
    """A problem with the inputs: reported on one ``error:`` line."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cache_priors",
        description=(
            "Sample the diffusion prior of every blurry image of a dataset with DDIM and write one "
            "safetensors entry per image (float16 prior plus what made it) under --out. Shards over "
            "'accelerate launch' processes; resumes an interrupted run; --verify checks a cache; "
            "--export writes its priors as PNGs (one sub-folder per split)."
        ),
        epilog="Exit code: 0 done (or cache valid, or all exported), 1 --verify found problems or "
               "--export missed some priors, 2 bad input, 75 stopped by SIGTERM, SIGINT or SIGUSR1 after the "
               "entry in progress (rerun the same command to continue; a second SIGINT aborts at once).",
    )
    parser.add_argument("--prior", help="prior model: a diffusers-layout folder, a CompVis model.ckpt, "
                        "or a named configuration (random weights, for tests and timing). Required "
                        "to build; with --verify it also checks the weights fingerprint")
    parser.add_argument("--data", type=Path, required=True, help="dataset root (all its splits are cached: "
                        "train/, test/, val/, DPDD's train_c/...) or one split folder (DPDD, GoPro, HIDE or "
                        "input/target folders), or a plain folder of blurry images with --layout images")
    parser.add_argument("--layout", choices=DATA_LAYOUTS, default="auto",
                        help="dataset layout (default: %(default)s); 'images' = every image directly in --data")
    parser.add_argument("--out", type=Path, required=True, help="cache folder (created; resumed if it exists)")
    parser.add_argument("--steps", type=positive_int, default=50, help="DDIM steps T (default: %(default)s)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta in [0, 1] (default: %(default)s)")
    parser.add_argument("--mode", choices=("full", "quarter"), default="full",
                        help="conditioning: 'full' (blurry image at latent size, the authors') or "
                        "'quarter' (4x-downsampled condition, ~16x cheaper) (default: %(default)s)")
    parser.add_argument("--timestep-spacing", choices=("leading", "trailing"), default="leading",
                        help="where the T DDIM steps sit: 'leading' (the authors' sampler; starts at t = 980 "
                        "for T = 50 but t = 800 for T = 5) or 'trailing' (always starts at t = 999, better for "
                        "small T) (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="run seed; each image's seed derives from it "
                        "and the image's relative path (default: %(default)s)")
    parser.add_argument("--tile", type=positive_int, default=128, help="latent tile side (default: %(default)s)")
    parser.add_argument("--tile-stride", type=positive_int, default=64, help="latent tile stride (default: %(default)s)")
    parser.add_argument("--decode-tile", type=positive_int, default=64,
                        help="latent tile side for VQ decoding (default: %(default)s)")
    parser.add_argument("--decode-stride", type=positive_int, default=48, help="VQ decoding stride (default: %(default)s)")
    parser.add_argument("--tile-batch", type=positive_int, default=4,
                        help="tiles per forward pass; bounds memory (default: %(default)s)")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="CPU threads per process (default: %(default)s). A CPU's results depend on the "
                        "thread count at the last bit, so a fixed count makes the cache independent of how the "
                        "images are shared out; use more processes (accelerate --num_processes) for more cores")
    parser.add_argument("--split", action="append", metavar="NAME", help="only the images of this split of the "
                        "dataset root (a sub-folder of --data; repeat for several), e.g. to --export the test "
                        "split alone of a cache that holds every split")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--verify", action="store_true", help="check every entry instead of building")
    action.add_argument("--export", type=Path, metavar="DIR", help="instead of building, write each image's "
                        "cached prior as a 16-bit PNG DIR/[<split>/]<image stem>.png (to view, or to score with "
                        "'swintormer evaluate --restored DIR --target SPLIT')")
    return parser


def dataset_splits(data: Path, layout: str) -> list[Path]:
    """The split folders of ``data``: ``data`` itself when it is a split of the layout, else
    each sub-folder that is one (a dataset root such as the synthetic generator's or DPDD's)."""
    from swintormer.core.data.paired import discover_pairs

    def is_split(folder: Path) -> bool:
        try:
            return bool(discover_pairs(folder, layout=layout, check_sizes=False).pairs)
        except (FileNotFoundError, ValueError):
            return False

    if is_split(data):
        return [data]
    return [child for child in sorted(data.iterdir()) if child.is_dir() and is_split(child)]


def collect_images(data: Path, layout: str) -> list[Path]:
    """The blurry images of every split of the dataset, sorted by path."""
    from swintormer.core.image_io import list_images

    if not data.is_dir():
        raise UserError(f"dataset folder not found: {data}")
    if layout == "images":
        images = list_images(data)
    else:
        from swintormer.core.data.paired import discover_pairs

        splits = dataset_splits(data, layout)
        if not splits:
            raise UserError(f"{data}: no blurry/sharp pairs found, neither in it nor in a split folder under it "
                            f"(layout {layout!r}; a plain folder of blurry images needs --layout images)")
        images = [pair.blurry for split in splits
                  for pair in discover_pairs(split, layout=layout, check_sizes=False).pairs]
    if not images:
        raise UserError(f"{data}: no blurry images found (layout {layout!r})")
    return sorted(images)


def select_splits(data: Path, layout: str, images: list[Path], names: list[str]) -> list[Path]:
    """The images of the named splits of the dataset root ``data``; an unknown name is an error."""
    splits = {split.relative_to(data).as_posix(): split for split in dataset_splits(data, layout)}
    unknown = [name for name in names if name not in splits]
    if unknown:
        raise UserError(f"--split {unknown[0]}: not a split of {data} (its splits: {', '.join(sorted(splits)) or 'none'})")
    chosen = [splits[name] for name in names]
    return [image for image in images if any(image.is_relative_to(split) for split in chosen)]


def _open_cache(args: argparse.Namespace, expected: dict[str, str] | None = None) -> PriorCache:
    """The cache at ``--out`` for reading; a missing or mismatched one is a one-line error."""
    from ldm_prior.cache import PriorCache, PriorCacheError

    try:
        return PriorCache(args.out, data_root=args.data, expected=expected)
    except PriorCacheError as exc:
        raise UserError(str(exc)) from None


def sampling_settings(args: argparse.Namespace):
    """The sampler settings the flags ask for (``args`` as :func:`build_parser` parses them); a
    bad value is a one-line error."""
    from ldm_prior.sampling import SamplingSettings

    try:
        return SamplingSettings(
            steps=args.steps, eta=args.eta, mode=args.mode, timestep_spacing=args.timestep_spacing,
            tile=args.tile, tile_stride=args.tile_stride,
            decode_tile=args.decode_tile, decode_stride=args.decode_stride, tile_batch=args.tile_batch,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _verify(args: argparse.Namespace, images: list[Path]) -> int:
    # Compared with the flags: the sampler's steps, eta, mode and spacing and the run seed. The
    # tile settings are not compared with the flags (every entry must still match the manifest's).
    sampling = sampling_settings(args).as_metadata()
    expected = {key: sampling[key] for key in ("steps", "eta", "mode", "timestep_spacing")}
    expected["seed"] = str(args.seed)
    if args.prior:
        from ldm_prior.model import load_prior

        expected["prior_fingerprint"] = load_prior(args.prior).fingerprint()
    cache = _open_cache(args, expected)
    problems = cache.problems(images, check_size=True)
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    print(f"verified {len(images)} entries in {args.out}: {len(images) - len(problems)} valid, {len(problems)} with problems")
    return 1 if problems else 0


def _export(args: argparse.Namespace, images: list[Path]) -> int:
    from tqdm.auto import tqdm

    from ldm_prior.cache import PriorCacheError
    from swintormer.core.image_io import write_image
    from swintormer.core.priors import PriorMissingError

    # Files are named by image stem, in one sub-folder per split when --data holds several
    # (DIR/test/<stem>.png scores against the test split with 'swintormer evaluate').
    splits = [args.data] if args.layout == "images" else dataset_splits(args.data, args.layout)
    targets: dict[Path, Path] = {}
    for image in images:
        split = next(split for split in splits if image.is_relative_to(split))
        target = args.export / split.relative_to(args.data) / f"{image.stem}.png"
        if target in targets.values():
            other = next(key for key, value in targets.items() if value == target)
            raise UserError(f"--export names files by image stem, and {other} and {image} "
                            f"share the stem {image.stem!r}")
        targets[image] = target
    cache = _open_cache(args)
    try:
        args.export.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the export folder {args.export}: {exc.strerror or exc}") from None
    problems = []
    for image in tqdm(images, desc="export", unit="img"):
        try:
            prior = cache.prior_for(image)
        except (PriorCacheError, PriorMissingError) as exc:
            problems.append(str(exc))
            continue
        targets[image].parent.mkdir(parents=True, exist_ok=True)
        write_image(targets[image], prior, bit_depth=16)
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    print(f"exported {len(images) - len(problems)} of {len(images)} priors to {args.export}")
    return 1 if problems else 0


def _build(args: argparse.Namespace, images: list[Path]) -> int:
    import torch

    from swintormer.core.distributed import process_state
    from swintormer.core.run_control import stop_signals

    if args.prior is None:
        raise UserError("--prior is required to build a cache")
    sampling = sampling_settings(args)
    with stop_signals() as signals:  # caught from here: a signal while loading stops before the first entry
        state = process_state()
        threads_before = torch.get_num_threads()
        if state.device.type == "cpu":
            torch.set_num_threads(args.threads)
        try:
            return _build_shard(args, images, state, sampling, signals)
        finally:
            torch.set_num_threads(threads_before)  # main() may run inside a larger program


def _build_shard(args: argparse.Namespace, images: list[Path], state, sampling, signals) -> int:
    from ldm_prior.cache import CacheSettings, PriorCacheError, prepare_cache
    from ldm_prior.model import load_prior
    from swintormer.core.run_control import RunFolderError, RunFolderLock, answer_from_main_process

    try:
        model = load_prior(args.prior)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load prior {args.prior}: {exc}") from None
    model = model.to(state.device)
    settings = CacheSettings(prior_fingerprint=model.fingerprint(), sampling=sampling.as_metadata(), seed=args.seed)
    # Two jobs building one cache would sample the same entries twice; the second is refused.
    lock = RunFolderLock(args.out, what="prior cache")

    def take_cache() -> None:
        lock.acquire()
        prepare_cache(args.out, settings, args.data)

    try:
        _, failure = answer_from_main_process(state, take_cache, catch=(PriorCacheError, RunFolderError))
        if failure is not None:
            raise UserError(failure)
        return _sample_shard(args, images, state, model, sampling, settings, signals)
    finally:
        lock.release()


def _sample_shard(args: argparse.Namespace, images: list[Path], state, model, sampling, settings, signals) -> int:
    import torch
    from tqdm.auto import tqdm

    from ldm_prior.cache import PriorCacheWriter, file_sha256, seed_name
    from ldm_prior.sampling import PriorSampler, image_seed
    from swintormer.core.image_io import ImageReadError, read_image
    from swintormer.core.run_control import EXIT_STOPPED

    # Every process checks, so none writes into a cache the main process refused.
    _open_cache(args, settings.as_metadata())

    writer = PriorCacheWriter(args.out, args.data, settings)
    sampler = PriorSampler(model, sampling)
    shard = images[state.process_index :: state.num_processes]
    made = skipped = 0
    failed: list[str] = []
    bar = tqdm(shard, desc=f"priors [{state.process_index}]", unit="img", disable=not state.is_main_process)
    for image_path in bar:
        if signals.requested is not None:
            bar.close()
            # No barrier: the other processes finish their entry in progress when they get the
            # signal too (a launcher passes it on, or stops them when this one exits).
            print(f"process {state.process_index}/{state.num_processes}: stopped by {signals.name} after the entry in "
                  f"progress ({made} priors made, {skipped} already valid); rerun the same command to continue",
                  file=sys.stderr)
            return EXIT_STOPPED
        source_hash = file_sha256(image_path)
        if writer.is_valid(image_path, source_hash):
            skipped += 1
            continue
        try:
            pixels = read_image(image_path).pixels
        except ImageReadError as exc:
            failed.append(str(exc))
            continue
        seed = image_seed(args.seed, seed_name(image_path, settings.seed_rule, source_sha256=source_hash))
        with torch.inference_mode():
            prior = sampler.sample(pixels, seed)
        writer.write(image_path, prior, source_hash, seed)
        made += 1
    for problem in failed:
        print(f"error: {problem}", file=sys.stderr)
    print(f"process {state.process_index}/{state.num_processes}: {made} priors made, {skipped} already valid, "
          f"{len(failed)} failed")
    state.wait_for_everyone()
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        images = collect_images(args.data, args.layout)
        if args.split:
            if args.layout == "images":
                raise UserError("--split needs a dataset root of split folders, not --layout images")
            images = select_splits(args.data, args.layout, images, args.split)
        if args.verify:
            return _verify(args, images)
        return _export(args, images) if args.export else _build(args, images)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    from swintormer.core.run_control import exit_code_of_finished_job

    sys.exit(exit_code_of_finished_job(main()))
