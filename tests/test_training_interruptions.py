"""Training pipelines stopped and restarted as clusters do: the run length is part of the recipe,
``--stop-after-steps`` and signals stop exactly, run folders are never mixed, a signal to one of
two processes stops both at one step, and the prior-cache job stops after its entry in progress.

Random kill/resume trials of both pipelines are ``tools/check_training_kill_resume.py``
(``test_check_training_kill_resume.py`` runs a short version)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipelines.train_swintormer import build_parser
from pipelines.train_swintormer import main as train_swintormer

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs/swintormer/cpu_tiny.yaml")
QUIET = ["train.logging.progress_bar=false", "train.logging.every_steps=1", "train.batch_size=2",
         "validation.max_images=1"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    subprocess.run([sys.executable, str(REPO / "tools/make_synthetic_blur.py"), "--out", str(out), "--max-size", "64",
                    "--crop", "64", "--per-image", "2", "--blur", "defocus", "--seed", "0",
                    "--defocus-radius", "1", "2.5", "--noise", "0", "0.002", "--quiet"], check=True, cwd=REPO)
    return out


def same_final_state(a: Path, b: Path, step: int) -> bool:
    folder = f"checkpoints/step_{step:08d}"
    files = [f"{folder}/{name}" for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors")]
    files += ["model/model.safetensors"] if (a / "model").is_dir() else []
    for name in files:
        x, y = load_file(a / name), load_file(b / name)
        if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
            return False
    return (a / folder / "scheduler.json").read_text() == (b / folder / "scheduler.json").read_text()


def logged_steps(run: Path) -> list[int]:
    lines = [json.loads(line) for line in (run / "logs/metrics.jsonl").read_text().splitlines()]
    return [line["step"] for line in lines if "loss" in line]


def status(run: Path) -> dict:
    return json.loads((run / "status.json").read_text())


def test_max_steps_is_the_recipe_and_stop_after_steps_resumes_exactly(synthetic, tmp_path, capsys):
    common = ["--config", TINY, "--data", str(synthetic), *QUIET, "train.scheduler.name=cosine"]
    assert train_swintormer([*common, "--output", str(tmp_path / "short"), "--max-steps", "20"]) == 0
    capsys.readouterr()
    # a resume that would stretch the schedule is refused, in one line, before anything changes
    assert train_swintormer([*common, "--output", str(tmp_path / "short"), "--max-steps", "40", "--resume", "latest"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.max_steps=20, this one asks for 40" in err and "--stop-after-steps" in err
    assert status(tmp_path / "short")["state"] == "finished"

    split = tmp_path / "split"
    assert train_swintormer([*common, "--output", str(split), "--max-steps", "40", "--stop-after-steps", "20"]) == 0
    assert status(split)["state"] == "stopped" and status(split)["step"] == 20 and not (split / "model").exists()
    assert train_swintormer([*common, "--output", str(split), "--max-steps", "40", "--resume", "latest"]) == 0
    assert train_swintormer([*common, "--output", str(tmp_path / "straight"), "--max-steps", "40"]) == 0
    assert same_final_state(tmp_path / "straight", split, 40)
    assert logged_steps(split) == list(range(1, 41))  # every step once
    # the 20-step run was another recipe: its cosine schedule ended at step 20
    short = load_file(tmp_path / "short/checkpoints/step_00000020/model.safetensors")
    half = load_file(split / "checkpoints/step_00000020/model.safetensors")
    assert any(not torch.equal(short[k], half[k]) for k in short)


def test_run_folder_rules_on_the_command_line(synthetic, tmp_path, capsys):
    run = tmp_path / "run"
    common = ["--config", TINY, "--data", str(synthetic), "--output", str(run), *QUIET]
    assert train_swintormer([*common, "--max-steps", "2"]) == 0
    config_before = (run / "config.yaml").read_text()
    model_before = (run / "model/model.safetensors").read_bytes()
    capsys.readouterr()
    # a used folder without --resume: exit 2 naming both ways out; nothing of the old run changes
    assert train_swintormer([*common, "--max-steps", "3", "train.optimizer.lr=1e-3"]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--resume auto" in err and "--overwrite" in err
    assert (run / "config.yaml").read_text() == config_before
    assert (run / "model/model.safetensors").read_bytes() == model_before
    # --overwrite deletes the run's outputs, and nothing else
    (run / "notes.txt").write_text("keep me")
    assert train_swintormer([*common, "--max-steps", "3", "--overwrite", "--stop-after-steps", "1"]) == 0
    assert (run / "notes.txt").read_text() == "keep me" and not (run / "model").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001"]
    assert logged_steps(run) == [1] and "max_steps: 3" in (run / "config.yaml").read_text()
    # --resume auto continues; in an empty folder it starts
    assert train_swintormer([*common, "--max-steps", "3", "--resume", "auto"]) == 0
    assert logged_steps(run) == [1, 2, 3] and status(run)["state"] == "finished"
    assert train_swintormer([*common[:-len(QUIET) - 2], "--output", str(tmp_path / "new"), *QUIET, "--max-steps", "1",
                             "--resume", "auto"]) == 0
    # --time-limit is counted from the start of the process: this one is long past a second, so the
    # run stops after its first step, checkpointed, with the exit code of a stop to requeue
    assert train_swintormer([*common, "--max-steps", "6", "--overwrite", "--time-limit", "1s"]) == 75
    assert status(run)["reason"] == "time limit" and status(run)["step"] == 1
    # --resume and --overwrite together, and a bad duration, are usage errors
    with pytest.raises(SystemExit) as exited:
        train_swintormer([*common, "--resume", "auto", "--overwrite"])
    assert exited.value.code == 2
    assert train_swintormer([*common, "--resume", "auto", "--time-limit", "3 hours"]) == 2
    assert "--time-limit" in capsys.readouterr().err
    text = build_parser().format_help()
    assert "75" in text and "status.json" in text and "--stop-after-steps" in text


def test_a_folder_another_run_is_writing_is_refused_until_that_run_ends(synthetic, tmp_path, capsys):
    """A job started twice on one folder: the second stops naming the first; a SIGKILLed holder
    leaves no stale lock."""
    run = tmp_path / "run"
    common = ["--config", TINY, "--data", str(synthetic), "--output", str(run), *QUIET, "--max-steps", "2"]
    assert train_swintormer([*common, "--stop-after-steps", "1"]) == 0
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                               "from swintormer.core.run_control import RunFolderLock\n"
                               "lock = RunFolderLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)",
                               str(run)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert train_swintormer([*common, "--resume", "auto"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"run folder {run} is in use by pid {holder.pid}" in err
        assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == before
    finally:
        holder.kill()
        holder.wait()
    assert train_swintormer([*common, "--resume", "auto"]) == 0
    assert logged_steps(run) == [1, 2] and status(run)["state"] == "finished"


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _rank_pid(launcher: int, rank: int, timeout: float = 120.0) -> int:
    """The pid of the training process of ``rank`` under an ``accelerate launch`` process."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in _children(launcher):
            try:
                environment = (Path("/proc") / str(child) / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environment:
                return child
        time.sleep(0.1)
    raise AssertionError(f"no process of rank {rank} under {launcher}")


@pytest.mark.skipif(not Path("/proc/self/environ").is_file(), reason="finds the processes through /proc")
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step_and_the_resume_is_exact(
        synthetic, tmp_path, accelerate_launch, capsys):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def command(run: Path, *extra: str) -> list[str]:
        return [*accelerate_launch(2), "-m", "pipelines.train_swintormer", "--config", TINY, "--data", str(synthetic),
                "--output", str(run), "--max-steps", "12", *QUIET, "data.repeat=2", "debug.log_sample_names=true",
                *extra]

    straight = subprocess.run(command(tmp_path / "straight"), cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]

    run = tmp_path / "run"
    launcher = subprocess.Popen(command(run), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    rank1 = _rank_pid(launcher.pid, 1)
    deadline = time.monotonic() + 300
    while not ((run / "logs/metrics.jsonl").is_file() and logged_steps(run) and logged_steps(run)[-1] >= 3):
        assert launcher.poll() is None and time.monotonic() < deadline, "the run ended before the signal"
        time.sleep(0.05)
    os.kill(rank1, signal.SIGTERM)
    _, err = launcher.communicate(timeout=300)
    state = status(run)
    step = state["step"]
    assert state["state"] == "stopped" and state["reason"] == "SIGTERM" and state["exit_code"] == 75, err[-3000:]
    assert 3 <= step < 12
    # one checkpoint, at one step, with both processes' random states; both trained exactly `step` steps
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step_{step:08d}"]
    saved = json.loads((run / f"checkpoints/step_{step:08d}/trainer_state.json").read_text())
    assert set(saved["rng"]) == {"0", "1"}
    for rank in (0, 1):
        assert len((run / f"debug/samples_rank{rank}.txt").read_text().split()) == 2 * step
    # both processes exited with 75 (the launcher itself exits 1 for any non-zero code)
    assert err.count("exitcode  : 75") == 2 and launcher.returncode != 0

    resumed = subprocess.run(command(run, "--resume", "auto"), cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert same_final_state(tmp_path / "straight", run, 12)
    assert logged_steps(run) == list(range(1, 13))

    # Another process count: the state is restored and the one-line note says what changes.
    one = tmp_path / "one_process"
    checkpoint = run / f"checkpoints/step_{step:08d}"
    assert train_swintormer(["--config", TINY, "--data", str(synthetic), "--output", str(one), "--max-steps", "12",
                             *QUIET, "data.repeat=2", "--resume", str(checkpoint), "--stop-after-steps", str(step + 1)]) == 0
    note = capsys.readouterr().out
    assert ("resuming a checkpoint of 2 process(es) x batch 2 x 1 accumulation step(s) with 1 process(es) x batch 2"
            in note and "the global batch changes from 4 to 2" in note)
    assert status(one)["step"] == step + 1


def test_prior_cache_stops_after_the_entry_in_progress_and_a_rerun_completes(tmp_path, capsys):
    from skimage import data

    from swintormer.core.image_io import write_image

    photo = data.astronaut().astype(np.float32) / 255
    for index in range(5):
        sharp = photo[40 * index : 40 * index + 64, 100 : 100 + 64]
        write_image(tmp_path / "data/target" / f"p{index}.png", sharp)
        write_image(tmp_path / "data/input" / f"p{index}.png", (sharp + np.roll(sharp, 1, axis=1)) / 2)
    command = [sys.executable, "-m", "pipelines.cache_priors", "--prior", "tiny", "--data", str(tmp_path / "data"),
               "--out", str(tmp_path / "cache"), "--steps", "4", "--mode", "full"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list((tmp_path / "cache").rglob("*.safetensors")):
        assert process.poll() is None and time.monotonic() < deadline, "the job ended before the signal"
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    made = list((tmp_path / "cache/entries").rglob("*.safetensors"))
    assert process.returncode == 75, err[-2000:]
    stop_lines = [line for line in err.splitlines() if "stopped by SIGTERM" in line]
    assert len(stop_lines) == 1 and "rerun the same command" in stop_lines[0]
    assert 1 <= len(made) < 5
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.name.endswith(".tmp")]
    from pipelines.cache_priors import main as cache_priors

    assert cache_priors(command[3:]) == 0  # the rerun, in this process
    assert f"{len(made)} already valid" in capsys.readouterr().out
    assert cache_priors([*command[3:], "--verify"]) == 0
    assert "5 valid, 0 with problems" in capsys.readouterr().out
