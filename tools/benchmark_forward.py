#!/usr/bin/env python
"""Forward-pass latency and peak memory of a Swintormer preset, fp32 and bf16 autocast.

    python tools/benchmark_forward.py                       # paper preset, 256×256, CPU
    python tools/benchmark_forward.py --preset small --size 128 128 --runs 10 --json out.json

Each precision runs in a fresh subprocess so that its peak memory is its own: on CPU the peak
resident set size (``ru_maxrss``) of that process, reported in total and above the baseline
measured after the model and input were built; on CUDA ``torch.cuda.max_memory_allocated``.
Latency is the median of ``--runs`` timed forwards (batch 1 by default) after ``--warmup``
untimed ones, under ``torch.inference_mode()`` with the model in eval mode. On CPU the model is
converted by ``swintormer.models.cpu_inference.prepare_for_inference``, as the deblur command
runs it; ``--reference`` times the unconverted network instead. The same run measures the fp32
matmul rate (2048² GEMM) so figures from different machines can be compared.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from swintormer.core.files import atomic_write_bytes


def matmul_gflops(size: int = 2048, runs: int = 10, device: str = "cpu") -> float:
    """Measured fp32 GEMM rate in GFLOP/s (2·n³ flops per product)."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(runs):
        a @ b
    _sync(device)
    return 2 * size**3 * runs / (time.perf_counter() - start) / 1e9


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_case(preset: str, precision: str, size: tuple[int, int], batch: int, warmup: int, runs: int, device: str,
             reference: bool = False) -> dict:
    """Time one configuration in this process (called in a fresh subprocess by ``main``)."""
    from swintormer.models import Swintormer, SwintormerConfig
    from swintormer.models.cpu_inference import prepare_for_inference

    torch.manual_seed(0)
    config = SwintormerConfig.preset(preset)
    model = Swintormer(config).eval().to(device)
    if device == "cpu" and not reference:
        model = prepare_for_inference(model)
    x = torch.rand(batch, config.in_channels, *size, device=device)
    baseline = _peak_rss_mib()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    # fp32 runs outside any autocast context, as the deblur command runs it: on this CPU build even
    # a disabled ``torch.autocast`` context made the fp32 forward about 15% slower.
    autocast = (torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    times = []
    with torch.inference_mode(), autocast:
        for i in range(warmup + runs):
            _sync(device)
            start = time.perf_counter()
            model(x)
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    # The GEMM rate in this very process, right after the timing (after, so that its matrices do
    # not raise the peak memory measured above): this VM's speed drifts between runs, and the
    # rate is what makes a latency comparable with another run or machine.
    rate = matmul_gflops(device=device)
    result = {
        "preset": preset,
        "precision": precision,
        "code": "reference" if reference or device != "cpu" else "cpu_inference",
        "input": [batch, config.in_channels, *size],
        "parameters": sum(p.numel() for p in model.parameters()),
        "latency_median_s": statistics.median(times),
        "latency_min_s": min(times),
        "latency_all_s": times,
        "matmul_gflops": rate,
    }
    if device.startswith("cuda"):
        result["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = _peak_rss_mib()
        result["peak_rss_mib"] = peak
        result["peak_rss_above_baseline_mib"] = peak - baseline
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--size", nargs=2, type=int, default=(256, 256), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reference", action="store_true",
                        help="time the reference network, without the CPU inference engine")
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one precision in this process
    args = parser.parse_args(argv)
    size = tuple(args.size)

    if args.case:
        result = run_case(args.preset, args.case, size, args.batch, args.warmup, args.runs, args.device,
                          args.reference)
        print(json.dumps(result))
        return 0

    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "device": args.device,
        },
        "matmul_fp32_gflops": matmul_gflops(device=args.device),
        "cases": [],
    }
    print(f"matmul fp32: {report['matmul_fp32_gflops']:.1f} GFLOP/s on {args.device} ({torch.get_num_threads()} threads)")
    for precision in args.precision:
        command = [sys.executable, __file__, "--case", precision, "--preset", args.preset, "--size", *map(str, size),
                   "--batch", str(args.batch), "--warmup", str(args.warmup), "--runs", str(args.runs), "--device", args.device]
        command += ["--reference"] if args.reference else []
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"error: {precision} case failed:\n{done.stderr.strip()}", file=sys.stderr)
            return 1
        case = json.loads(done.stdout.strip().splitlines()[-1])
        report["cases"].append(case)
        memory = case.get("peak_memory_mib", case.get("peak_rss_mib"))
        extra = f" ({case['peak_rss_above_baseline_mib']:.0f} MiB above baseline)" if "peak_rss_mib" in case else ""
        print(f"{args.preset} {precision} ({case['code']}): median {case['latency_median_s']:.3f} s per forward "
              f"{'×'.join(map(str, case['input']))}, peak memory {memory:.0f} MiB{extra}; "
              f"matmul {case['matmul_gflops']:.1f} GFLOP/s in the same process")
    if args.json:
        atomic_write_bytes(args.json, (json.dumps(report, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
