"""Check that the prior cache survives ``kill -9`` and does not depend on the process count.

1. Builds a reference cache with one uninterrupted ``python -m pipelines.cache_priors`` run.
2. ``--trials`` times: starts the same job on a fresh cache folder, kills it with SIGKILL at a
   random moment (uniform from shortly before the reference run wrote its first entry to its
   end, from a seeded generator), reruns
   and kills again (``--kills`` kills in all), then lets a final rerun finish.
3. With ``--processes N`` (N > 1) also builds a third cache with
   ``accelerate launch --multi_gpu --num_processes N -m pipelines.cache_priors`` (how accelerate
   starts several CPU processes; see ``swintormer/core/distributed.py``), checks that N processes
   really took part, and compares it byte for byte with one launched process; the difference
   from the plain run is reported (a process group may round CPU kernels' last bits otherwise).
4. Compares every cache with the reference entry by entry, byte for byte (and the manifests).

The data are small synthetic blurry/sharp pairs made from scikit-image's photos; the prior is
the ``tiny`` configuration with seeded random weights. Prints the result and, with ``--json``,
writes it. Exit code 0 when every cache equals the reference, 1 otherwise.

    python tools/check_cache_kill_resume.py --trials 3 --kills 2 --processes 2 --json result.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def make_dataset(root: Path, count: int) -> None:
    """``count`` blurry/sharp pairs of odd sizes under ``root/input`` and ``root/target``."""
    import numpy as np
    from skimage import data

    from swintormer.core.image_io import write_image
    from swintormer.core.data.synthetic_blur import blur_image, disc_kernel

    photos = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "colorwheel"]
    for index in range(count):
        photo = getattr(data, photos[index % len(photos)])()
        photo = photo[..., :3].astype(np.float32) / 255
        top, left = 20 + 7 * index, 30 + 5 * index
        sharp = photo[top : top + 41 + 2 * index, left : left + 53 - index]
        write_image(root / "target" / f"img{index:02d}.png", sharp)
        write_image(root / "input" / f"img{index:02d}.png", blur_image(sharp, disc_kernel(1.5 + 0.25 * index)))


def cache_command(prior: Path, data: Path, out: Path, steps: int, mode: str) -> list[str]:
    return ["-m", "pipelines.cache_priors", "--prior", str(prior), "--data", str(data), "--out", str(out),
            "--steps", str(steps), "--mode", mode, "--seed", "7"]


def max_difference(reference: Path, other: Path) -> float:
    """Largest absolute difference between the priors of two caches with the same entries."""
    from ldm_prior.cache import read_entry

    largest = 0.0
    for path in (reference / "entries").rglob("*.safetensors"):
        a, _ = read_entry(path)
        b, _ = read_entry(other / path.relative_to(reference))
        largest = max(largest, float(np.abs(a.astype(np.float32) - b.astype(np.float32)).max()))
    return largest


def run_to_end(arguments: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "ab") as handle:
        subprocess.run(arguments, cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - start


def compare(reference: Path, other: Path) -> list[str]:
    """Differences between two caches (entries and manifest), one line each."""
    def files(root: Path) -> dict[str, bytes]:
        found = {path.relative_to(root).as_posix(): path.read_bytes() for path in (root / "entries").rglob("*.safetensors")}
        found["manifest.json"] = (root / "manifest.json").read_bytes()
        return found

    wanted, got = files(reference), files(other)
    differences = [f"missing {name}" for name in sorted(set(wanted) - set(got))]
    differences += [f"extra {name}" for name in sorted(set(got) - set(wanted))]
    differences += [f"differs {name}" for name in sorted(set(wanted) & set(got)) if wanted[name] != got[name]]
    leftovers = [path.name for path in (other / "entries").rglob("*") if path.is_file() and not path.name.endswith(".safetensors")]
    differences += [f"leftover temporary file {name}" for name in leftovers]
    return differences


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16, help="number of synthetic pairs (default: %(default)s)")
    parser.add_argument("--trials", type=int, default=3, help="fresh caches to kill and resume (default: %(default)s)")
    parser.add_argument("--kills", type=int, default=2, help="SIGKILLs per trial before its final run (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=4, help="DDIM steps (default: %(default)s)")
    parser.add_argument("--mode", choices=("full", "quarter"), default="quarter")
    parser.add_argument("--processes", type=int, default=2, help="also compare an accelerate run with this many "
                        "CPU processes; 1 skips it (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments (default: %(default)s)")
    parser.add_argument("--workdir", type=Path, help="keep the files here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args(argv)

    from ldm_prior.model import PriorModel

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cache_kill_"))
    for name in ("data", "ref", "killed", "multi"):
        shutil.rmtree(workdir / name, ignore_errors=True)
    make_dataset(workdir / "data", args.images)
    prior = workdir / "prior"
    PriorModel.from_config("tiny", seed=0).save_pretrained(prior)
    log = workdir / "log.txt"
    python = [sys.executable]

    # The reference run, watched: when its first and last entries appear bounds the window in
    # which kills can catch a write (before it, a kill only interrupts start-up).
    start = time.perf_counter()
    with open(log, "ab") as handle:
        process = subprocess.Popen(python + cache_command(prior, workdir / "data", workdir / "ref", args.steps, args.mode),
                                   cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT)
        first_entry = None
        while process.poll() is None:
            if first_entry is None and any((workdir / "ref").rglob("*.safetensors")):
                first_entry = time.perf_counter() - start
            time.sleep(0.02)
    if process.returncode != 0:
        raise SystemExit(f"error: the reference run failed (exit {process.returncode}); see {log}")
    reference_seconds = time.perf_counter() - start
    first_entry = first_entry if first_entry is not None else 0.0
    print(f"reference run: {reference_seconds:.1f} s for {args.images} images (first entry at {first_entry:.1f} s)", flush=True)

    rng = random.Random(args.seed)
    trials = []
    for trial in range(args.trials):
        shutil.rmtree(workdir / "killed", ignore_errors=True)
        kills = []
        for _ in range(args.kills):
            delay = rng.uniform(0.8 * first_entry, reference_seconds)
            with open(log, "ab") as handle:
                process = subprocess.Popen(python + cache_command(prior, workdir / "data", workdir / "killed", args.steps, args.mode),
                                           cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT)
                try:
                    process.wait(timeout=delay)
                    outcome = "finished before the kill"
                except subprocess.TimeoutExpired:
                    os.kill(process.pid, signal.SIGKILL)
                    process.wait()
                    outcome = "killed"
            entries = len(list((workdir / "killed" / "entries").rglob("*.safetensors"))) if (workdir / "killed").exists() else 0
            kills.append({"after_s": round(delay, 2), "outcome": outcome, "entries_present": entries})
            print(f"trial {trial}: kill at {delay:5.1f} s: {outcome}, {entries}/{args.images} entries present", flush=True)
        run_to_end(python + cache_command(prior, workdir / "data", workdir / "killed", args.steps, args.mode), log)
        differences = compare(workdir / "ref", workdir / "killed")
        print(f"trial {trial}: resumed cache vs reference: {'identical' if not differences else differences}", flush=True)
        trials.append({"kills": kills, "identical": not differences, "differences": differences})
    killed_differences = [line for trial in trials for line in trial["differences"]]

    result = {
        "images": args.images, "steps": args.steps, "mode": args.mode, "reference_seconds": round(reference_seconds, 1),
        "trials": trials, "kill_resume_identical": not killed_differences, "kill_resume_differences": killed_differences,
    }
    if args.processes > 1:
        # Process count: N launched processes against one launched process, byte for byte. A
        # launched process runs inside a process group, which can change the last bits of CPU
        # kernels against a plain run, so the plain reference is compared within a tolerance.
        launch_one = python + ["-m", "torch.distributed.run", "--nproc_per_node", "1"]
        launch_many = python + ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(args.processes),
                                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        run_to_end(launch_one + cache_command(prior, workdir / "data", workdir / "one", args.steps, args.mode), log)
        log_start = log.stat().st_size
        seconds = run_to_end(launch_many + cache_command(prior, workdir / "data", workdir / "multi", args.steps, args.mode), log)
        multi_differences = compare(workdir / "one", workdir / "multi")
        launched = log.read_bytes()[log_start:].decode("utf-8", errors="replace")
        absent = [rank for rank in range(args.processes) if f"process {rank}/{args.processes}:" not in launched]
        if absent:
            multi_differences.append(f"processes {absent} of {args.processes} did not report: the launch ran fewer")
        plain_difference = max_difference(workdir / "ref", workdir / "multi")
        print(f"{args.processes}-process cache ({seconds:.1f} s) vs 1 launched process: "
              f"{'identical' if not multi_differences else multi_differences}; "
              f"vs the plain run: max |difference| {plain_difference:.2g}")
        result.update({"processes": args.processes, "multi_process_seconds": round(seconds, 1),
                       "multi_process_identical": not multi_differences, "multi_process_differences": multi_differences,
                       "multi_vs_plain_max_abs_difference": plain_difference})
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    ok = result["kill_resume_identical"] and result.get("multi_process_identical", True)
    print("PASS" if ok else "FAIL", f"(files in {workdir})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
