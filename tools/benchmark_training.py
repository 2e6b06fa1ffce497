"""Benchmark Swintormer training steps: steps per second and peak memory, with and without
activation checkpointing.

    python tools/benchmark_training.py --preset paper --size 256 --batch 1 --steps 5 --json out.json

Each case runs in a fresh Python subprocess so that its peak memory is its own: the figure is
the process's resident-set high-water mark, ``resource.getrusage(RUSAGE_SELF).ru_maxrss``
(Linux reports KiB), read after the timed steps; the RSS after building the model and the
optimizer (before any step) is printed too, so the training increment is visible. On a CUDA
device the peak of ``torch.cuda.max_memory_allocated`` is reported as well.

A step is what the trainer does: forward on ``batch × in_channels × size × size`` random
input, L1 loss, backward, AdamW update. ``--warmup`` steps run first and are not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = {"plain": False, "checkpointing": True}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_case(args: argparse.Namespace, case: str) -> dict:
    """Inside the worker subprocess: build, warm up, time ``args.steps`` steps."""
    import torch

    sys.path.insert(0, str(REPO))
    from swintormer.models import Swintormer, SwintormerConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = Swintormer(SwintormerConfig.preset(args.preset, in_channels=args.in_channels)).to(device)
    model.set_gradient_checkpointing(CASES[case])
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.99), weight_decay=1e-4)
    inputs = torch.rand(args.batch, args.in_channels, args.size, args.size, device=device)
    target = torch.rand(args.batch, 3, args.size, args.size, device=device)
    rss_before = _rss_mib()

    def step() -> None:
        loss = (model(inputs) - target).abs().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    result = {
        "case": case,
        "gradient_checkpointing": CASES[case],
        "seconds_per_step_mean": sum(times) / len(times),
        "seconds_per_step_min": min(times),
        "steps_per_s": len(times) / sum(times),
        "step_seconds": times,
        "rss_after_build_mib": rss_before,
        "peak_rss_mib": _rss_mib(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        result["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", default="paper", help="SwintormerConfig preset")
    parser.add_argument("--size", type=int, default=256, help="patch side in pixels")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--in-channels", type=int, default=6, choices=(3, 6))
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--worker", choices=sorted(CASES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.size < 1:
        print("error: --steps, --batch and --size must be positive", file=sys.stderr)
        return 2

    if args.worker:
        print(json.dumps(run_case(args, args.worker)))
        return 0

    results = []
    for case in args.cases:
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", case, "--preset", args.preset,
                   "--size", str(args.size), "--batch", str(args.batch), "--in-channels", str(args.in_channels),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device,
                   "--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"error: case {case} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
            return 1
        result = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(result)
        print(f"{case:>14}: {result['steps_per_s']:.3f} steps/s ({result['seconds_per_step_mean']:.2f} s/step mean, "
              f"fastest {result['seconds_per_step_min']:.2f} s), peak RSS {result['peak_rss_mib']:.0f} MiB "
              f"(after build {result['rss_after_build_mib']:.0f} MiB)", flush=True)
    report = {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "load_average_at_end": os.getloadavg()},
        "settings": {k: getattr(args, k) for k in ("preset", "size", "batch", "in_channels", "steps", "warmup", "device", "threads")},
        "memory_measure": "ru_maxrss of a fresh subprocess per case (RSS high-water mark)",
        "results": results,
    }
    if args.json:
        tmp = args.json.with_name(f".{args.json.name}.tmp")
        tmp.write_text(json.dumps(report, indent=1))
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
