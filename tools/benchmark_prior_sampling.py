"""Benchmark prior sampling: seconds per megapixel of a whole DDIM sample (all T steps plus the
VQ decode), in both conditioning modes, for a named prior architecture with random weights.

Each measurement samples one whole image end to end (no extrapolation from a few steps). One
warm-up forward pass of the UNet and of the VQ decoder precedes the timed runs (the first call
of a convolution on a CPU includes one-off setup). Prints one line per mode and, with ``--json``,
writes the figures with the machine description.

    python tools/benchmark_prior_sampling.py --config ldm-sr4x --steps 50 \\
        --full-size 64 --quarter-size 256 --json prior_sampling.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def machine_description() -> dict:
    import torch

    return {
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="ldm-sr4x", help="named prior configuration (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps T (default: %(default)s)")
    parser.add_argument("--modes", nargs="+", default=["full", "quarter"], choices=["full", "quarter"])
    parser.add_argument("--full-size", type=int, default=64, help="image side for full mode (default: %(default)s)")
    parser.add_argument("--quarter-size", type=int, default=256, help="image side for quarter mode (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=1, help="timed samples per mode (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from ldm_prior.model import PriorModel
    from ldm_prior.sampling import PriorSampler, SamplingSettings

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = PriorModel.from_config(args.config, seed=0).to(device).eval()
    with torch.inference_mode():  # warm-up
        latent = torch.randn(1, model.config.vqvae.latent_channels, 16, 16, device=device)
        model.unet(torch.cat([latent, torch.randn(1, model.config.image_channels, 16, 16, device=device)], 1), 10)
        model.vqvae.decode(latent)
    results = {"config": args.config, "steps": args.steps, "machine": machine_description(), "modes": {}}
    rng = np.random.default_rng(0)
    for mode in args.modes:
        side = args.full_size if mode == "full" else args.quarter_size
        image = rng.random((side, side, 3), dtype=np.float32)
        sampler = PriorSampler(model, SamplingSettings(steps=args.steps, mode=mode))
        times = []
        for repeat in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            sampler.sample(image, seed=repeat)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        seconds = min(times)
        megapixels = side * side / 1e6
        latent_side = side if mode == "full" else side // model.config.vq_factor
        results["modes"][mode] = {
            "image": f"{side}x{side}", "latent": f"{latent_side}x{latent_side}", "seconds": round(seconds, 2),
            "all_seconds": [round(t, 2) for t in times], "seconds_per_megapixel": round(seconds / megapixels, 1),
        }
        print(f"{args.config} {mode:>7}: {side}x{side} image, latent {latent_side}^2, T={args.steps}: "
              f"{seconds:.1f} s -> {seconds / megapixels:.0f} s/MP", flush=True)
    print(json.dumps(results["machine"]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
