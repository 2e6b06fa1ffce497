#!/usr/bin/env python
"""A/B the network's forward pass: this working tree against a git revision, in one process.

    OMP_NUM_THREADS=1 python tools/ab_forward.py --against 070125b --preset paper --rounds 15

The ``swintormer`` package of ``--against`` is extracted with ``git archive`` into a temporary
folder and imported under another name (``swintormer_ab_old``), so both versions run in this
process, on the same weights (the old model's, perturbed off their initial values, copied into
the new one) and the same input. Interleaved rounds time each arm in turn, the order rotating
from round to round, so that drifts of the machine's speed fall on all arms alike. Arms:

- ``old``: the revision's network as its deblur path ran it (``model.eval()``);
- ``engine``: this tree's network converted by ``prepare_for_inference``;
- ``reference``: this tree's network unconverted.

Printed: the largest difference of each arm's output from ``old`` (and whether it is exact),
then per forward the median and minimum wall-clock seconds and the median CPU seconds of this
process (user + system, far less disturbed than wall time by other jobs on a shared machine),
each with the ratio of medians to ``old``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
OLD_NAME = "swintormer_ab_old"


def import_revision(revision: str, folder: Path):
    """Import ``swintormer`` as of ``revision`` under the name ``swintormer_ab_old``."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision, "swintormer"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    (folder / "swintormer").rename(folder / OLD_NAME)
    for path in (folder / OLD_NAME).rglob("*.py"):
        text = path.read_text()
        path.write_text(re.sub(r"\b(from|import) swintormer\b", rf"\1 {OLD_NAME}", text))
    sys.path.insert(0, str(folder))
    return importlib.import_module(f"{OLD_NAME}.models")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", required=True, help="git revision to compare with (e.g. a commit hash)")
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--size", nargs=2, type=int, default=(256, 256), metavar=("H", "W"))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--per-round", type=int, default=2, help="timed forwards per arm and round")
    parser.add_argument("--arms", default="old,engine,reference")
    parser.add_argument("--bf16", action="store_true", help="run every arm under CPU bf16 autocast")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO))
    from swintormer.models import Swintormer, SwintormerConfig
    from swintormer.models.cpu_inference import prepare_for_inference

    with tempfile.TemporaryDirectory() as folder:
        old_models = import_revision(args.against, Path(folder))
        torch.manual_seed(0)
        old = old_models.Swintormer(old_models.SwintormerConfig.preset(args.preset)).eval()
        with torch.no_grad():
            for parameter in old.parameters():
                parameter.add_(0.02 * torch.randn_like(parameter))
        reference = Swintormer(SwintormerConfig.preset(args.preset)).eval()
        reference.load_state_dict(old.state_dict())
        engine = prepare_for_inference(Swintormer(SwintormerConfig.preset(args.preset)).eval())
        engine.load_state_dict(old.state_dict())
        models = {"old": old, "engine": engine, "reference": reference}
        arms = {name: models[name] for name in args.arms.split(",")}
        x = torch.rand(1, reference.config.in_channels, *args.size, generator=torch.Generator().manual_seed(1))
        autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.bf16 else contextlib.nullcontext
        print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {args.preset} at "
              f"{args.size[0]}×{args.size[1]}, {'bf16 autocast' if args.bf16 else 'fp32'}; against {args.against}")
        with torch.inference_mode(), autocast():
            outputs = {name: model(x) for name, model in arms.items()}  # also the warm-up
            for model in arms.values():
                model(x)
            if "old" in outputs:
                for name, out in outputs.items():
                    difference = (out.float() - outputs["old"].float()).abs().max().item()
                    print(f"{name:9s} max |output − old| = {difference:.3g}"
                          f"{' (identical)' if torch.equal(out, outputs['old']) else ''}")
            times: dict[str, list[float]] = {name: [] for name in arms}
            cpu_times: dict[str, list[float]] = {name: [] for name in arms}
            names = list(arms)
            for round_index in range(args.rounds):
                for name in names[round_index % len(names):] + names[: round_index % len(names)]:
                    for _ in range(args.per_round):
                        start, cpu_start = time.perf_counter(), time.process_time()
                        arms[name](x)
                        times[name].append(time.perf_counter() - start)
                        cpu_times[name].append(time.process_time() - cpu_start)
    for name in arms:
        wall, cpu = statistics.median(times[name]), statistics.median(cpu_times[name])
        ratios = ""
        if "old" in arms:
            ratios = (f"; ratio to old: wall {wall / statistics.median(times['old']):.3f}, "
                      f"CPU {cpu / statistics.median(cpu_times['old']):.3f}")
        print(f"{name:9s} wall median {wall:.3f} s (min {min(times[name]):.3f}), CPU median {cpu:.3f} s "
              f"({len(times[name])} forwards){ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
