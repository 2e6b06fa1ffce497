"""Peak memory and speed of sliding-window inference on large images.

Each case runs in a fresh subprocess so that its peak resident memory (``ru_maxrss``) is its own.
A case builds the network with random weights (memory and time do not depend on them), makes a
random H×W×C float32 image (C = the model's input channels: blurry RGB plus prior RGB for the
``paper`` preset, as the deblur command feeds it) and runs :class:`SlidingWindowInferencer` once.

Reported per case: peak RSS; the resident memory before the image existed (Python, torch and the
model, before any forward pass); the sizes of the input and output arrays; the part of the peak
above all of those (the inference's own working memory: accumulator, window batch, activations);
seconds, seconds per megapixel and seconds per window; and the process's CPU seconds (user +
system) per megapixel, which other load on a shared machine disturbs far less than wall time.
Targets checked: the 4K peak below 4 GB, and the time per megapixel of the two sizes
within 10% of each other (measured: docs/measurements/inference_memory.md).

    python tools/benchmark_inference_memory.py --progress    # 3840×2160 and 1680×1120, paper preset
    python tools/benchmark_inference_memory.py --json out.json --cases 640x480 --preset tiny
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CASES = ("3840x2160", "1680x1120")
PEAK_TARGET_BYTES = 4 * 10**9
TIME_PER_MEGAPIXEL_TOLERANCE = 0.10
MB = 2**20


def _current_rss_bytes() -> int:
    """Resident memory now (Linux ``/proc``; elsewhere the peak so far, an upper bound)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return _peak_rss_bytes()


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _cpu_seconds() -> float:
    """User plus system CPU time of this process: unlike wall time, barely moved by other load."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_case(
    height: int, width: int, preset: str, tile: int, stride: int, batch: int, precision: str, progress: bool = False,
    threads: int | None = None,
) -> dict:
    """Measure one case in this process (meant to be a fresh one)."""
    import numpy as np
    import torch

    sys.path.insert(0, str(REPO_ROOT))
    from swintormer.inference import SlidingWindowInferencer
    from swintormer.models import Swintormer, SwintormerConfig
    from swintormer.models.cpu_inference import prepare_for_inference

    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = prepare_for_inference(Swintormer(SwintormerConfig.preset(preset)).eval())  # as the deblur command runs it
    channels = model.config.in_channels
    inferencer = SlidingWindowInferencer(
        model, tile=tile, stride=stride, batch_size=batch, precision=precision, progress=progress,
        progress_description=f"{width}x{height}",
    )
    # Measured before the warm-up so that the window activations count as inference memory.
    baseline = _current_rss_bytes()
    with torch.inference_mode():
        model(torch.rand(1, channels, tile, tile))  # warm-up: first-call allocations are not timed

    image = np.random.default_rng(0).random((height, width, channels), dtype=np.float32)
    cpu_start = _cpu_seconds()
    start = time.perf_counter()
    output = inferencer(image)
    seconds = time.perf_counter() - start
    cpu_seconds = _cpu_seconds() - cpu_start
    peak = _peak_rss_bytes()

    megapixels = height * width / 1e6
    windows = len(inferencer.window_grid(height, width))
    return {
        "height": height,
        "width": width,
        "channels_in": channels,
        "preset": preset,
        "tile": tile,
        "stride": stride,
        "batch": batch,
        "precision": precision,
        "windows": windows,
        "peak_rss_mb": peak / MB,
        "baseline_rss_mb": baseline / MB,
        "input_array_mb": image.nbytes / MB,
        "output_array_mb": output.nbytes / MB,
        "above_baseline_and_arrays_mb": (peak - baseline - image.nbytes - output.nbytes) / MB,
        "seconds": seconds,
        "seconds_per_megapixel": seconds / megapixels,
        "seconds_per_window": seconds / windows,
        "cpu_seconds": cpu_seconds,
        "cpu_seconds_per_megapixel": cpu_seconds / megapixels,
        "torch_threads": torch.get_num_threads(),
    }


def _parse_case(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a case is WIDTHxHEIGHT, e.g. 3840x2160; got {text!r}") from None
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"image sizes must be positive, got {text!r}")
    return width, height


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Peak memory (ru_maxrss, one fresh process per case) and seconds per megapixel "
        "of sliding-window inference with a randomly initialised Swintormer.",
    )
    parser.add_argument("--cases", nargs="+", type=_parse_case, default=[_parse_case(c) for c in DEFAULT_CASES],
                        metavar="WxH", help="image sizes, width x height (default: %(default)s → 4K and DPDD)")
    parser.add_argument("--preset", default="paper", help="Swintormer preset (default: paper, 25.18 M parameters)")
    parser.add_argument("--tile", type=int, default=256, help="window size (default: 256)")
    parser.add_argument("--stride", type=int, default=None, help="window stride (default: the tile, no overlap)")
    parser.add_argument("--batch", type=int, default=4, help="windows per forward pass (default: 4)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per case (default: torch's choice). On a machine shared with other "
                        "work, 1 keeps the CPU-time figures honest: idle threads spin-waiting for descheduled "
                        "siblings otherwise burn CPU time")
    parser.add_argument("--progress", action="store_true", help="show a progress bar over the windows of each case")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    stride = args.stride or args.tile
    if args.worker:
        (width, height), = args.cases
        result = run_case(height, width, args.preset, args.tile, stride, args.batch, args.precision, args.progress,
                          args.threads)
        print(json.dumps(result))
        return 0

    results = []
    for width, height in args.cases:
        command = [sys.executable, __file__, "--worker", "--cases", f"{width}x{height}", "--preset", args.preset,
                   "--tile", str(args.tile), "--stride", str(stride), "--batch", str(args.batch),
                   "--precision", args.precision] + (["--progress"] if args.progress else []) + (
                       ["--threads", str(args.threads)] if args.threads else [])
        print(f"running {width}x{height} ...", flush=True)
        # stderr passes through (progress bar, errors); stdout carries the JSON result.
        finished = subprocess.run(command, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
        if finished.returncode != 0:
            print(f"error: case {width}x{height} failed (exit code {finished.returncode}; see above)", file=sys.stderr)
            return 1
        result = json.loads(finished.stdout.strip().splitlines()[-1])
        results.append(result)
        print(
            f"{width}x{height} ({result['windows']} windows of {args.tile}, stride {stride}, batch {args.batch}, "
            f"{args.precision}): peak RSS {result['peak_rss_mb']:.0f} MiB "
            f"(before the image {result['baseline_rss_mb']:.0f} MiB; input {result['input_array_mb']:.0f} MiB, "
            f"output {result['output_array_mb']:.0f} MiB; above those {result['above_baseline_and_arrays_mb']:.0f} MiB); "
            f"{result['seconds']:.1f} s = {result['seconds_per_megapixel']:.2f} s/MP, "
            f"{result['seconds_per_window']:.3f} s/window; CPU time {result['cpu_seconds']:.1f} s = "
            f"{result['cpu_seconds_per_megapixel']:.2f} CPU s/MP",
            flush=True,
        )

    summary: dict = {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}",
        "results": results,
    }
    four_k = [r for r in results if (r["width"], r["height"]) == (3840, 2160)]
    if four_k:
        peak_bytes = four_k[0]["peak_rss_mb"] * MB
        summary["target_4k_peak_below_4GB"] = peak_bytes < PEAK_TARGET_BYTES
        print(f"target: 4K peak below 4 GB: {'holds' if peak_bytes < PEAK_TARGET_BYTES else 'FAILS'} "
              f"({peak_bytes / 1e9:.2f} GB)")
    if len(results) >= 2:
        rates = [r["seconds_per_megapixel"] for r in results]
        spread = max(rates) / min(rates) - 1
        holds = spread <= TIME_PER_MEGAPIXEL_TOLERANCE
        summary["time_per_megapixel_spread"] = spread
        summary["target_time_per_megapixel_within_10pct"] = holds
        print(f"target: time per megapixel within 10% between sizes: {'holds' if holds else 'FAILS'} "
              f"(spread {100 * spread:.1f}%)")
        cpu_rates = [r["cpu_seconds_per_megapixel"] for r in results]
        cpu_spread = max(cpu_rates) / min(cpu_rates) - 1
        summary["cpu_time_per_megapixel_spread"] = cpu_spread
        print(f"(CPU time per megapixel spread: {100 * cpu_spread:.1f}%; wall time is disturbed by other load)")
        window_rates = [r["seconds_per_window"] for r in results]
        print(f"(time per window spread: {100 * (max(window_rates) / min(window_rates) - 1):.1f}%; windows per "
              "megapixel differ between sizes because the border windows are placed flush)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=args.json.parent, suffix=".tmp", delete=False) as handle:
            json.dump(summary, handle, indent=2)
        os.replace(handle.name, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
