"""Check that training stopped at any moment and resumed gives the uninterrupted run, bit for bit.

For each training pipeline (``train_swintormer`` on ``configs/swintormer/cpu_tiny.yaml`` with a
cosine schedule, ``train_prior`` on ``configs/prior/cpu_tiny.yaml``; CPU, fp32, small synthetic
pairs from ``tools/make_synthetic_blur.py``):

1. one uninterrupted run, timed (start-up and step time bound the moments of the interruptions);
2. the same run in another folder, interrupted ``--interruptions`` times, each time restarted with
   ``--resume auto``: SIGTERM, SIGINT or SIGUSR1 (expected exit code 75) or SIGKILL (the run
   loses the steps since its last checkpoint) at a random moment: once the metrics log shows a
   random step still to train, after a random fraction of a step's time, so that signals land
   in steps, checkpoint writes and validations alike; or ``--stop-after-steps`` at a random step
   (exit 0). The steps are drawn so that the interruptions spread over the run; kinds mixed
   (``--kinds`` in turn, or drawn from the seeded generator);
3. a last ``--resume auto`` run to the end; then the final checkpoint's weights, EMA, optimizer
   and scheduler state and the exported ``model/`` are compared with the uninterrupted run's
   tensor by tensor (``torch.equal``), and the metrics log is checked to hold every step once.

Prints a table and, with ``--json``, writes the result. Exit code 0 when every check passes.

    OMP_NUM_THREADS=1 python tools/check_training_kill_resume.py --interruptions 6 --json result.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

KINDS = ("sigterm", "sigint", "sigusr1", "stop", "kill")
SIGNALS = {"sigterm": signal.SIGTERM, "sigint": signal.SIGINT, "sigusr1": signal.SIGUSR1, "kill": signal.SIGKILL}
EXIT_STOPPED = 75


def default_signals() -> None:
    """In the child before it starts: SIGINT as a terminal would deliver it. A shell starts a
    background job with SIGINT ignored, and the ignored state is inherited (and then kept by
    the training process, which leaves an ignored signal alone)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(arguments: list[str], log, env: dict[str, str]) -> subprocess.Popen:
    """``python ARGUMENTS`` in the repository, its output appended to ``log``."""
    return subprocess.Popen([sys.executable, *arguments], cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env=env, preexec_fn=default_signals)


def pipeline_command(name: str, data: Path, output: Path, steps: int) -> list[str]:
    """The training command of pipeline ``name`` (``swintormer`` or ``prior``), without ``--resume``."""
    quiet = ["train.logging.progress_bar=false", "train.logging.every_steps=1"]
    if name == "swintormer":
        return ["-m", "pipelines.train_swintormer", "--config", "configs/swintormer/cpu_tiny.yaml", "--data", str(data),
                "--output", str(output), "--max-steps", str(steps), *quiet, "train.batch_size=2",
                "train.scheduler.name=cosine", "train.checkpoint.every_steps=4", "train.checkpoint.keep_last=2",
                "train.validate_every_steps=10", "validation.max_images=1"]
    if name == "prior":
        return ["-m", "pipelines.train_prior", "--config", "configs/prior/cpu_tiny.yaml", "--data", str(data),
                "--output", str(output), "--max-steps", str(steps), *quiet, "train.batch_size=2",
                "train.checkpoint.every_steps=4", "train.checkpoint.keep_last=2", "train.validate_every_steps=10",
                "validation.max_images=1", "validation.noise_draws=2"]
    raise ValueError(f"unknown pipeline {name!r}")


def make_data(out: Path) -> None:
    subprocess.run([sys.executable, "tools/make_synthetic_blur.py", "--out", str(out), "--max-size", "64", "--crop", "64",
                    "--per-image", "2", "--blur", "defocus", "--seed", "0", "--defocus-radius", "1", "2.5",
                    "--noise", "0", "0.002", "--quiet"], cwd=REPO_ROOT, check=True)


def current_step(run: Path) -> int:
    """The step the run would resume from: its newest complete checkpoint."""
    complete = [p for p in (run / "checkpoints").glob("step_*") if (p / "trainer_state.json").is_file()]
    return max((int(p.name[5:]) for p in complete), default=0)


def read_status(run: Path) -> dict:
    try:
        return json.loads((run / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def compare_runs(reference: Path, other: Path, steps: int) -> list[str]:
    """Differences of the final state (checkpoint at ``steps`` and ``model/``), one line each."""
    import torch
    from safetensors.torch import load_file

    differences = []
    final = f"checkpoints/step_{steps:08d}"
    files = ["model.safetensors", "ema.safetensors", "optimizer.safetensors"]
    pairs = [(f"{final}/{name}", f"{final}/{name}") for name in files]
    pairs += [(path.relative_to(reference).as_posix(),) * 2 for path in sorted((reference / "model").rglob("*.safetensors"))]
    for a_name, b_name in pairs:
        a_path, b_path = reference / a_name, other / b_name
        if not b_path.is_file():
            differences.append(f"missing {b_name}")
            continue
        a, b = load_file(a_path), load_file(b_path)
        if a.keys() != b.keys():
            differences.append(f"{a_name}: other tensors")
        unequal = [key for key in a if key in b and not torch.equal(a[key], b[key])]
        if unequal:
            differences.append(f"{a_name}: {len(unequal)} tensors differ (first {unequal[0]})")
    for name in ("scheduler.json", "optimizer.json"):
        if (reference / final / name).read_text() != (other / final / name).read_text():
            differences.append(f"{final}/{name} differs")
    steps_logged = [json.loads(line)["step"] for line in (other / "logs/metrics.jsonl").read_text().splitlines()
                    if "loss" in json.loads(line)]
    if len(steps_logged) != len(set(steps_logged)) or steps_logged != sorted(steps_logged):
        differences.append(f"metrics log repeats or reorders steps: {steps_logged}")
    elif steps_logged[-1] != steps:
        differences.append(f"metrics log ends at step {steps_logged[-1]}, not {steps}")
    leftovers = [p.name for p in (other / "checkpoints").iterdir() if p.name.startswith(".")]
    if leftovers:
        differences.append(f"temporaries left: {leftovers}")
    return differences


def logged_step(run: Path, since: float) -> int:
    """The last step in the run's metrics log, if the log was written after ``since`` (a
    ``time.time()``), else 0: a resumed run first cuts the log back to its checkpoint, so a
    step past the checkpoint in a fresh log was trained by this process, not the one before."""
    path = run / "logs/metrics.jsonl"
    try:
        if path.stat().st_mtime < since:
            return 0
        lines = path.read_text().splitlines()
        return int(json.loads(lines[-1])["step"]) if lines else 0
    except (OSError, ValueError, KeyError):
        return 0


def signal_during_training(process: subprocess.Popen, run: Path, step: int, delay: float, signum: int,
                           started: float) -> str | None:
    """Send ``signum`` ``delay`` seconds after the metrics log reaches ``step``; returns a note when
    the process ended before."""
    while logged_step(run, started) < step:
        if process.poll() is not None:
            return "ended before the signal"
        time.sleep(0.005)
    time.sleep(delay)
    if process.poll() is not None:
        return "ended before the signal"
    os.kill(process.pid, signum)
    return None


def timed_run(command: list[str], run: Path, log: Path, env: dict[str, str]) -> tuple[float, float]:
    """Run to the end; returns (seconds to the first logged step, total seconds)."""
    began = time.perf_counter()
    first = None
    with open(log, "ab") as handle:
        process = start(command, handle, env)
        while process.poll() is None:
            if first is None and (run / "logs/metrics.jsonl").is_file():
                first = time.perf_counter() - began
            time.sleep(0.02)
    if process.returncode != 0:
        raise SystemExit(f"error: the uninterrupted run failed (exit {process.returncode}); see {log}")
    total = time.perf_counter() - began
    return (first if first is not None else total), total


def check_pipeline(name: str, data: Path, workdir: Path, steps: int, interruptions: int, kinds: list[str],
                   rng: random.Random, env: dict[str, str]) -> dict:
    straight, resumed = workdir / f"{name}_straight", workdir / f"{name}_interrupted"
    for folder in (straight, resumed):
        shutil.rmtree(folder, ignore_errors=True)
    log = workdir / f"{name}_log.txt"
    first, total = timed_run(pipeline_command(name, data, straight, steps), straight, log, env)
    step_seconds = max(total - first, 0.1) / steps
    print(f"{name}: uninterrupted run {total:.1f} s ({first:.1f} s to the first step, {step_seconds:.2f} s/step)", flush=True)

    rows = []
    for index in range(interruptions):
        kind = kinds[index % len(kinds)] if kinds else rng.choice(KINDS)
        before = current_step(resumed)
        if before >= steps:
            break
        command = pipeline_command(name, data, resumed, steps) + ["--resume", "auto"]
        row = {"kind": kind, "from_step": before}
        # The step to stop at, or after which to signal: spread over what is left of the run.
        span = max(1, (steps - 1 - before) // (interruptions - index))
        target = min(before + rng.randint(1, span), steps)
        with open(log, "ab") as handle:
            if kind == "stop":
                row["stop_after_steps"] = target
                code = start([*command, "--stop-after-steps", str(target)], handle, env).wait()
                expected = {0}
            else:
                delay = rng.uniform(0.0, step_seconds)
                row.update({"after_step": target, "after_s": round(delay, 3)})
                started = time.time()
                process = start(command, handle, env)
                note = signal_during_training(process, resumed, target, delay, SIGNALS[kind], started)
                code = process.wait()
                if note:
                    row["note"] = note
                expected = {0, -signal.SIGKILL} if kind == "kill" else {0, EXIT_STOPPED}
        status = read_status(resumed)
        row.update({"exit_code": code, "status": status.get("state"), "checkpoint_step": current_step(resumed)})
        if code not in expected:
            row["unexpected_exit"] = True
        rows.append(row)
        print(f"{name} #{index}: {describe(row)}", flush=True)

    with open(log, "ab") as handle:
        code = start([*pipeline_command(name, data, resumed, steps), "--resume", "auto"], handle, env).wait()
    differences = [] if code == 0 else [f"the final --resume auto run exited {code}"]
    differences += compare_runs(straight, resumed, steps) if code == 0 else []
    differences += [f"#{i}: unexpected exit code {row['exit_code']} for {row['kind']}"
                    for i, row in enumerate(rows) if row.get("unexpected_exit")]
    print(f"{name}: resumed run vs uninterrupted: {'identical' if not differences else differences}", flush=True)
    return {"pipeline": name, "steps": steps, "uninterrupted_seconds": round(total, 1),
            "interruptions": rows, "identical": not differences, "differences": differences}


def what_happened(row: dict) -> str:
    if row["kind"] == "stop":
        return f"--stop-after-steps {row['stop_after_steps']}"
    name = "SIGKILL" if row["kind"] == "kill" else row["kind"].upper()
    return f"{name} {row['after_s']:.2f} s after step {row['after_step']} was logged"


def describe(row: dict) -> str:
    what = what_happened(row)
    note = f" ({row['note']})" if row.get("note") else ""
    return (f"{what} from step {row['from_step']}: exit {row['exit_code']}{note}, status {row['status']}, "
            f"checkpoint at step {row['checkpoint_step']}")


def table(results: list[dict]) -> str:
    lines = ["| pipeline | # | interruption | from step | exit code | checkpoint step | result |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for result in results:
        for index, row in enumerate(result["interruptions"]):
            what = what_happened(row)
            note = row.get("note", "unexpected exit code" if row.get("unexpected_exit") else "")
            lines.append(f"| {result['pipeline']} | {index} | {what} | {row['from_step']} | {row['exit_code']} | "
                         f"{row['checkpoint_step']} | {note} |")
        verdict = "bit-identical to the uninterrupted run" if result["identical"] else "; ".join(result["differences"])
        lines.append(f"| {result['pipeline']} | final | --resume auto to step {result['steps']} | | | | {verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipelines", nargs="+", choices=("swintormer", "prior"), default=["swintormer", "prior"])
    parser.add_argument("--interruptions", type=int, default=6, help="interruptions per pipeline (default: %(default)s)")
    parser.add_argument("--kinds", default="", help=f"comma-separated kinds used in turn, from {', '.join(KINDS)} "
                        "(default: drawn at random)")
    parser.add_argument("--swintormer-steps", type=int, default=30, help="train_swintormer run length (default: %(default)s)")
    parser.add_argument("--prior-steps", type=int, default=20, help="train_prior run length (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kinds, moments and steps (default: %(default)s)")
    parser.add_argument("--workdir", type=Path, help="keep the files here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args(argv)
    kinds = [kind.strip() for kind in args.kinds.split(",") if kind.strip()]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        parser.error(f"--kinds: unknown {unknown}")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="training_kill_"))
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "data"
    if not (data / "manifest.json").is_file():
        make_data(data)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": str(REPO_ROOT)}
    rng = random.Random(args.seed)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    began = time.perf_counter()
    results = []
    for name in args.pipelines:
        steps = args.swintormer_steps if name == "swintormer" else args.prior_steps
        results.append(check_pipeline(name, data, workdir, steps, args.interruptions, kinds, rng, env))
    print()
    print(table(results))
    ok = all(result["identical"] for result in results)
    seconds = time.perf_counter() - began
    if args.json:
        machine = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}"
        args.json.write_text(json.dumps({"date": started, "machine": machine, "seed": args.seed,
                                         "omp_num_threads": env["OMP_NUM_THREADS"], "seconds": round(seconds),
                                         "pipelines": results,
                                         "all_identical": ok}, indent=2) + "\n")
    print("PASS" if ok else "FAIL", f"({started}, {seconds / 60:.1f} min; files in {workdir})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
