"""The shared training engine: exact resume, NaN guard, EMA, schedule, data order, checkpoints.

These tests use a small convolutional model so that they run in seconds; the Swintormer
pipeline has its own end-to-end tests in ``test_train_swintormer.py``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset

from swintormer.core import run_control, training
from swintormer.core.config import ConfigError, SchedulerConfig, TrainingConfig
from swintormer.core.training import (
    EpochShardSampler,
    ExponentialMovingAverage,
    NonFiniteLossError,
    StopRules,
    TrainingTask,
    find_checkpoint,
    lr_factor_fn,
    run_training,
)

class NoisyPairs(Dataset):
    """Random pairs whose noise comes from the *global* torch RNG, so resume must restore it."""

    def __init__(self, count: int = 10) -> None:
        generator = torch.Generator().manual_seed(1)
        self.targets = torch.rand(count, 3, 8, 8, generator=generator)
        self.epoch = 0
        self.seen: list[tuple[int, int]] = []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> dict:
        self.seen.append((self.epoch, index))
        target = self.targets[index]
        return {"input": target + 0.1 * torch.randn_like(target), "target": target}


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Dropout(0.2), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1))
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def l1_step(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    loss = (model(batch["input"]) - batch["target"]).abs().mean()
    return loss, {"l1": loss.detach()}


def small_config(**changes) -> TrainingConfig:
    data = {
        "max_steps": 6, "batch_size": 3, "grad_accum_steps": 2, "seed": 7, "grad_clip_norm": 0.5,
        "optimizer": {"lr": 1e-2},
        "scheduler": {"name": "cosine_restarts", "periods": [3, 4], "restart_weights": [1.0, 0.5],
                      "eta_mins": [1e-3, 1e-4]},
        "ema": {"decay": 0.9},
        "checkpoint": {"every_steps": 100, "keep_last": 2},
        "logging": {"every_steps": 1, "tensorboard": False, "progress_bar": False},
    }
    data.update(changes)
    return TrainingConfig.model_validate(data)


def train(tmp_path, name: str, max_steps: int, resume: str | None = None, stop_after: int | None = None,
          loss_step=l1_step, stop: StopRules | None = None, **changes):
    torch.manual_seed(0)
    model = SmallNet()
    task = TrainingTask(model=model, loss_step=loss_step, train_dataset=NoisyPairs())
    result = run_training(task, small_config(**changes), tmp_path / name, max_steps=max_steps, resume=resume,
                          stop=stop or StopRules(after_steps=stop_after))
    return model, result


def same_state(a_checkpoint, b_checkpoint) -> bool:
    for file in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        a, b = load_file(a_checkpoint / file), load_file(b_checkpoint / file)
        if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
            return False
    return True


def test_resume_is_exact(tmp_path):
    straight, straight_result = train(tmp_path, "straight", 6)
    _, stopped = train(tmp_path, "split", 6, stop_after=3)
    assert stopped.stop_reason == "stop after steps" and stopped.step == 3 and stopped.final_model_dir is None
    resumed, resumed_result = train(tmp_path, "split", 6, resume="latest")

    assert resumed_result.step == 6 and len(resumed_result.losses) == 3
    assert resumed_result.losses == straight_result.losses[3:]
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    for file in ("ema.safetensors", "optimizer.safetensors"):
        a = load_file(tmp_path / "straight/checkpoints/step_00000006" / file)
        b = load_file(tmp_path / "split/checkpoints/step_00000006" / file)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file
    # the weights actually moved, and EMA differs from them (so the comparison above is not vacuous)
    ema = load_file(tmp_path / "straight/checkpoints/step_00000006/ema.safetensors")
    assert not torch.equal(ema["body.0.weight"], straight.state_dict()["body.0.weight"])


def test_resume_from_explicit_checkpoint_and_keep_last(tmp_path):
    _, result = train(tmp_path, "run", 6, stop_after=5, checkpoint={"every_steps": 1, "keep_last": 2})
    kept = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())
    assert kept == ["step_00000004", "step_00000005"]
    state = json.loads((result.last_checkpoint / "trainer_state.json").read_text())
    assert state["step"] == 5 and state["num_processes"] == 1 and state["max_steps"] == 6
    straight, _ = train(tmp_path, "straight", 6)
    resumed, _ = train(tmp_path, "other", 6, resume=str(tmp_path / "run/checkpoints/step_00000004"))
    # resumed from step 4 of a run with identical settings: same weights as 6 straight steps
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))


def test_incomplete_checkpoint_is_ignored(tmp_path):
    train(tmp_path, "run", 2, checkpoint={"every_steps": 1, "keep_last": 5})
    crashed = tmp_path / "run/checkpoints/step_00000003"
    crashed.mkdir()
    (crashed / "model.safetensors").write_bytes(b"half written")
    assert find_checkpoint(tmp_path / "run", "latest").name == "step_00000002"
    assert find_checkpoint(tmp_path / "nothing", "latest") is None


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    calls = {"n": 0}

    def poisoned_step(model, batch):
        calls["n"] += 1
        loss, logs = l1_step(model, batch)
        if calls["n"] == 7:  # 2 micro-batches per step: call 7 is in step 4
            loss = loss * float("nan")
        return loss, logs

    torch.manual_seed(0)
    model = SmallNet()
    task = TrainingTask(model=model, loss_step=poisoned_step, train_dataset=NoisyPairs())
    config = small_config(checkpoint={"every_steps": 2, "keep_last": 5})
    with pytest.raises(NonFiniteLossError, match="at step 4") as info:
        run_training(task, config, tmp_path / "run", max_steps=6)
    assert info.value.last_checkpoint.name == "step_00000002"
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == ["step_00000002"]
    saved = load_file(tmp_path / "run/checkpoints/step_00000002/model.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())
    # the model in memory never received the poisoned update
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_data_order_depends_on_seed_and_epoch_and_splits_processes():
    single = EpochShardSampler(10, seed=3)
    assert sorted(single.indices(0)) == list(range(10))
    assert single.indices(0) == EpochShardSampler(10, seed=3).indices(0)
    assert single.indices(0) != single.indices(1)
    assert single.indices(0) != EpochShardSampler(10, seed=4).indices(0)
    ranks = [EpochShardSampler(10, seed=3, rank=r, num_processes=3) for r in range(3)]
    shards = [r.indices(2) for r in ranks]
    assert [len(s) for s in shards] == [4, 4, 4]  # 10 padded to 12
    assert set().union(*map(set, shards)) == set(range(10))
    assert sum(shards, []) != list(range(10))


def test_ema_follows_its_formula():
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = ExponentialMovingAverage(model, decay=0.9, start_step=1)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model, step=1)  # before/at start_step: copy
    assert ema.shadow["weight"].item() == pytest.approx(3.0)
    with torch.no_grad():
        model.weight.fill_(5.0)
    ema.update(model, step=2)
    assert ema.shadow["weight"].item() == pytest.approx(0.9 * 3.0 + 0.1 * 5.0)
    with ema.applied_to(model):
        assert model.weight.item() == pytest.approx(3.2)
    assert model.weight.item() == 5.0


def test_cosine_restart_schedule_values():
    config = SchedulerConfig(name="cosine_restarts", periods=[4, 8], restart_weights=[1.0, 0.5], eta_mins=[0.1, 0.01])
    factor = lr_factor_fn(config, max_steps=12, base_lr=1.0)
    assert factor(0) == pytest.approx(1.0)
    assert factor(2) == pytest.approx(0.1 + 0.5 * 0.9 * (1 + math.cos(math.pi / 2)))
    assert factor(4) == pytest.approx(0.5)  # restart at half weight
    assert factor(8) == pytest.approx(0.01 + 0.5 * 0.49)
    assert factor(50) == pytest.approx(0.01)
    warm = lr_factor_fn(SchedulerConfig(name="constant", warmup_steps=4), 10, 1.0)
    assert [warm(s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_validation_sees_ema_weights_and_final_export_is_ema(tmp_path):
    seen = {}

    def validate(model, step):
        seen[step] = model.body[0].weight.detach().clone()
        assert not model.training
        return {"score": float(step)}

    def save_final(model, folder):
        folder.mkdir(parents=True)
        torch.save({"w": model.body[0].weight.detach().clone()}, folder / "w.pt")

    torch.manual_seed(0)
    model = SmallNet()
    task = TrainingTask(model=model, loss_step=l1_step, train_dataset=NoisyPairs(), validate=validate,
                        save_final=save_final)
    result = run_training(task, small_config(validate_every_steps=2), tmp_path / "run", max_steps=4)
    assert [s for s, _ in result.validation] == [2, 4]
    ema = load_file(tmp_path / "run/checkpoints/step_00000004/ema.safetensors")
    assert torch.equal(seen[4], ema["body.0.weight"])
    assert not torch.equal(seen[4], model.body[0].weight)  # the trained weights came back
    exported = torch.load(tmp_path / "run/model/w.pt", weights_only=True)["w"]
    assert torch.equal(exported, ema["body.0.weight"])
    lines = [json.loads(x) for x in (tmp_path / "run/logs/metrics.jsonl").read_text().splitlines()]
    assert any("val/score" in line for line in lines) and any("steps_per_s" in line for line in lines)


def test_ema_tracks_only_trained_parameters(tmp_path):
    torch.manual_seed(0)
    model = SmallNet()
    model.body[0].requires_grad_(False)  # a frozen part: not optimized, not averaged
    task = TrainingTask(model=model, loss_step=l1_step, train_dataset=NoisyPairs())
    run_training(task, small_config(), tmp_path / "run", max_steps=1)
    ema = load_file(tmp_path / "run/checkpoints/step_00000001/ema.safetensors")
    assert "body.3.weight" in ema and "body.0.weight" not in ema
    saved = load_file(tmp_path / "run/checkpoints/step_00000001/model.safetensors")
    assert "body.0.weight" in saved  # the checkpoint still holds the whole model


# --------------------------------------------------------------------------- stopping early


def signalling_step(signals_at: dict[int, int]):
    """A loss step that sends this process ``signals_at[call]`` at those calls (2 calls per step)."""
    calls = {"n": 0}

    def step(model, batch):
        calls["n"] += 1
        if calls["n"] in signals_at:
            os.kill(os.getpid(), signals_at[calls["n"]])
        return l1_step(model, batch)

    return step


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_a_signal_finishes_the_step_checkpoints_and_the_resumed_run_is_exact(tmp_path, signum):
    _, straight = train(tmp_path, "straight", 6)
    _, stopped = train(tmp_path, "split", 6, loss_step=signalling_step({5: signum}))  # call 5: in step 3
    assert stopped.stop_reason == signal.Signals(signum).name and stopped.step == 3
    assert stopped.last_checkpoint.name == "step_00000003" and stopped.final_model_dir is None
    status = json.loads((tmp_path / "split/status.json").read_text())
    assert status["state"] == "stopped" and status["exit_code"] == 75 and status["step"] == 3
    # the handlers are put back once the run ends
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    _, resumed = train(tmp_path, "split", 6, resume="auto")
    assert resumed.finished and same_state(straight.last_checkpoint, resumed.last_checkpoint)
    assert json.loads((tmp_path / "split/status.json").read_text())["state"] == "finished"


def test_a_second_sigint_aborts_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(run_control, "SECOND_SIGINT_AFTER_S", 0.0)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, "run", 6, loss_step=signalling_step({3: signal.SIGINT, 4: signal.SIGINT}))
    assert not (tmp_path / "run/checkpoints").exists()
    assert json.loads((tmp_path / "run/status.json").read_text())["state"] == "aborted"
    # a SIGINT passed on by a launcher right after the first (within the second) does not abort
    monkeypatch.setattr(run_control, "SECOND_SIGINT_AFTER_S", 60.0)
    _, result = train(tmp_path, "again", 6, loss_step=signalling_step({3: signal.SIGINT, 4: signal.SIGINT}))
    assert result.stop_reason == "SIGINT" and result.step == 2


def test_time_limit_stops_before_the_limit_with_a_checkpoint(tmp_path, monkeypatch):
    """A fake clock: every loss step advances it by 10 s, so a step takes 20 s (2 micro-batches)."""
    clock = {"now": 0.0}
    monkeypatch.setattr(training, "seconds_since_process_start", lambda: clock["now"])
    monkeypatch.setattr(training, "_clock", lambda: clock["now"])

    def slow_step(model, batch):
        clock["now"] += 10.0
        return l1_step(model, batch)

    _, result = train(tmp_path, "run", 6, loss_step=slow_step, stop=StopRules(time_limit=100.0))
    # Steps end at 20, 40, 60, 80 s. After step 4 another step and the checkpoint after it (about
    # 1 s before one was measured) would end at 80 + 1.25 x 21 s > 100 s: the run stops at step 4.
    assert result.stop_reason == "time limit" and result.step == 4 and clock["now"] == 80.0
    assert (tmp_path / "run/checkpoints/step_00000004/trainer_state.json").is_file()
    assert json.loads((tmp_path / "run/status.json").read_text())["exit_code"] == 75


def test_stop_after_steps_at_or_past_the_checkpoint_takes_no_step(tmp_path):
    train(tmp_path, "run", 6, stop_after=3)
    _, again = train(tmp_path, "run", 6, resume="auto", stop_after=2)
    assert again.stop_reason == "stop after steps" and again.step == 3 and again.losses == []


def test_resuming_with_another_max_steps_is_refused(tmp_path):
    train(tmp_path, "run", 6, stop_after=2)
    with pytest.raises(ConfigError, match=r"train.max_steps=6, this one asks for 8.*--stop-after-steps"):
        train(tmp_path, "run", 8, resume="auto")


# --------------------------------------------------------------------------- run folders


def test_a_used_run_folder_is_refused_without_resume_or_overwrite(tmp_path):
    train(tmp_path, "run", 6, stop_after=2)
    with pytest.raises(ConfigError, match=r"not empty.*--resume auto.*--overwrite"):
        train(tmp_path, "run", 6)
    (tmp_path / "other").mkdir()
    (tmp_path / "other/notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        train(tmp_path, "other", 6)
    with pytest.raises(ConfigError, match="holds files no run writes"):
        train(tmp_path, "other", 6, resume="auto")
    with pytest.raises(ConfigError, match="--resume latest: no complete checkpoint"):
        train(tmp_path, "empty", 6, resume="latest")


def test_the_main_process_alone_acts_and_every_process_learns_its_answer(monkeypatch):
    """How a folder's lock and checks reach every process: the action runs on the main process
    only; a caught error becomes a message for all; the other processes get what it broadcast."""
    from types import SimpleNamespace

    import accelerate.utils

    calls = []

    def take() -> str:
        calls.append("took")
        return "checkpoint"

    def refuse() -> str:
        raise ConfigError("in use by pid 7")

    main = SimpleNamespace(is_main_process=True, num_processes=1)
    assert run_control.answer_from_main_process(main, take, catch=(ConfigError,)) == ("checkpoint", None)
    assert calls == ["took"]
    assert run_control.answer_from_main_process(main, refuse, catch=(ConfigError,)) == (None, "in use by pid 7")
    with pytest.raises(ZeroDivisionError):  # errors not listed are not swallowed
        run_control.answer_from_main_process(main, lambda: 1 / 0, catch=(ConfigError,))

    # A second process never runs the action; it receives the main process's answer.
    sent = [("checkpoint", None)]
    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", lambda answer: answer.__setitem__(0, sent[0]))
    other = SimpleNamespace(is_main_process=False, num_processes=2)
    calls.clear()
    assert run_control.answer_from_main_process(other, take, catch=(ConfigError,)) == ("checkpoint", None)
    sent[0] = (None, "in use by pid 7")
    assert run_control.answer_from_main_process(other, take, catch=(ConfigError,)) == (None, "in use by pid 7")
    assert calls == []


def test_overwrite_deletes_the_previous_run_and_nothing_else(tmp_path):
    run = tmp_path / "run"
    train(tmp_path, "run", 6, stop_after=4, checkpoint={"every_steps": 1, "keep_last": 5})
    (run / "notes.txt").write_text("mine")
    (run / "model").mkdir()
    torch.manual_seed(0)
    task = TrainingTask(model=SmallNet(), loss_step=l1_step, train_dataset=NoisyPairs())
    result = run_training(task, small_config(), run, max_steps=6, stop=StopRules(after_steps=2), overwrite=True)
    assert result.step == 2 and (run / "notes.txt").read_text() == "mine" and not (run / "model").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002"]
    steps = [json.loads(line)["step"] for line in (run / "logs/metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_resume_auto_starts_or_continues_and_clears_temporaries(tmp_path):
    run = tmp_path / "run"
    _, first = train(tmp_path, "run", 6, resume="auto", stop_after=2)  # no folder yet: a fresh start
    assert first.step == 2
    stale = run / "checkpoints/.step_00000004.abc.tmp"  # what a killed checkpoint write leaves
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    _, second = train(tmp_path, "run", 6, resume="auto")
    assert second.step == 6 and not stale.exists()
    # a folder holding only what a run killed before its first checkpoint left starts over
    leftover = tmp_path / "killed_early"
    (leftover / "logs").mkdir(parents=True)
    (leftover / "logs/metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (leftover / "config.yaml").write_text("old: true\n")
    _, fresh = train(tmp_path, "killed_early", 6, resume="auto", stop_after=1)
    assert fresh.step == 1 and not (leftover / "config.yaml").exists()
    assert [json.loads(x)["step"] for x in (leftover / "logs/metrics.jsonl").read_text().splitlines()] == [1]


def test_resume_cuts_the_metrics_log_back_to_the_checkpoint(tmp_path):
    """A run killed after logging steps past its last checkpoint: the resumed run logs them again,
    and the log keeps each step once."""
    run = tmp_path / "run"
    train(tmp_path, "run", 6, stop_after=4, checkpoint={"every_steps": 2, "keep_last": 5})
    shutil.rmtree(run / "checkpoints/step_00000004")  # as if killed before this checkpoint
    with open(run / "logs/metrics.jsonl", "a") as handle:
        handle.write('{"step": 5, "lo')  # and in the middle of a line
    _, straight = train(tmp_path, "straight", 6)
    _, resumed = train(tmp_path, "run", 6, resume="auto")
    steps = [json.loads(line)["step"] for line in (run / "logs/metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert same_state(straight.last_checkpoint, resumed.last_checkpoint)


def test_resume_from_an_earlier_checkpoint_of_the_same_folder_drops_the_later_ones(tmp_path):
    run = tmp_path / "run"
    train(tmp_path, "run", 6, stop_after=4, checkpoint={"every_steps": 1, "keep_last": 5})
    _, result = train(tmp_path, "run", 6, resume=str(run / "checkpoints/step_00000002"), stop_after=3,
                      checkpoint={"every_steps": 1, "keep_last": 5})
    assert result.step == 3
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step_0000000{i}" for i in (1, 2, 3)]


def test_resuming_with_another_batch_says_what_changes(tmp_path, capsys):
    train(tmp_path, "run", 6, stop_after=2)
    capsys.readouterr()
    train(tmp_path, "run", 6, resume="auto", stop_after=3, batch_size=2)
    note = capsys.readouterr().out
    assert "1 process(es) x batch 3 x 2 accumulation step(s) with 1 process(es) x batch 2" in note
    assert "global batch changes from 6 to 4" in note
    train(tmp_path, "run", 6, resume="auto", stop_after=4, batch_size=4, grad_accum_steps=1)
    assert "the global batch stays 4, so each step draws the same samples" in capsys.readouterr().out


def test_parse_duration():
    assert run_control.parse_duration("3h50m") == 13800
    assert run_control.parse_duration("90m") == 5400
    assert run_control.parse_duration("45s") == 45
    assert run_control.parse_duration("1h0m30s") == 3630
    assert run_control.parse_duration("5400") == 5400
    for bad in ("", "3x", "m", "-5", "0s", "5m3h"):
        with pytest.raises(ValueError):
            run_control.parse_duration(bad)
    assert 0 < run_control.seconds_since_process_start() < 7 * 24 * 3600


# --------------------------------------------------------------------------- what a run shows


def test_the_run_prints_its_plan_with_the_effective_batch_and_then_a_time_estimate(tmp_path, capsys):
    def validate(model, step):
        return {"score": float(step)}

    torch.manual_seed(0)
    task = TrainingTask(model=SmallNet(), loss_step=l1_step, train_dataset=NoisyPairs(), validate=validate)
    run_training(task, small_config(validate_every_steps=6), tmp_path / "run", max_steps=8)
    out = capsys.readouterr().out
    assert ("training 8 steps (from step 0), batch 3 per process x 1 process x 2 accumulation steps "
            "= effective batch 6; checkpoint every 100 steps, validation every 6 steps") in out
    lines = out.splitlines()
    first = next(line for line in lines if line.startswith("step 5 of 8: about "))
    # after step 5: three steps, the final checkpoint, two validations (step 6 and the last) not yet timed
    assert "left for the remaining 3 steps" in first and "1 checkpoint of ~" in first
    assert "2 validations, not timed yet, left out" in first and ", done around 20" in first
    # after the first validation (step 6) the estimate counts its measured time
    second = next(line for line in lines if line.startswith("step 6 of 8: about "))
    assert "remaining 2 steps" in second and "1 validation, ~" in second and "each" in second
    assert lines.index(first) < lines.index(second)


def test_the_time_estimate_adds_steps_checkpoints_and_validations():
    seconds, validations, checkpoints = training.remaining_time(
        5, 8, 2.0, checkpoint_every=100, checkpoint_seconds=3.0, validate_every=2, validation_seconds=0.5)
    assert (validations, checkpoints) == (2, 1)  # validations after steps 6 and 8; the final checkpoint
    assert seconds == pytest.approx(3 * 2.0 + 3.0 + 2 * 0.5)
    seconds, validations, checkpoints = training.remaining_time(
        0, 10, 1.0, checkpoint_every=4, checkpoint_seconds=2.0, validate_every=3, validation_seconds=None,
        validate_at_end=False)
    assert (validations, checkpoints) == (3, 3) and seconds == pytest.approx(10 + 3 * 2.0)  # 4, 8, 10; 3, 6, 9
    line = training.plan_line(300, 100, 4, 2, 3, checkpoint_every=50, validate_every=None)
    assert "batch 4 per process x 2 processes x 3 accumulation steps = effective batch 24" in line
    assert line.startswith("training 300 steps (from step 100)") and "no validation" in line
    assert [training.format_duration(s) for s in (0.42, 3.25, 42, 245, 11220, 183600)] == [
        "0.42 s", "3.2 s", "42 s", "4 min 05 s", "3 h 07 min", "2 d 03 h"]


def test_validation_images_are_written_per_step_and_to_tensorboard(tmp_path):
    from swintormer.core.image_io import read_image
    from swintormer.core.validation_images import ValidationImage, ValidationReport

    def validate(model, step):
        bright = np.full((4, 5, 3), 0.8, dtype=np.float32)
        gradient = np.linspace(0, 1, 4 * 6, dtype=np.float32).reshape(4, 6)  # grey, wider
        return ValidationReport({"score": float(step)}, [
            ValidationImage("00_first", [bright, gradient], note=f"score_{step}"),
            ValidationImage("01_second", [np.zeros((2, 3, 3), np.float32)]),
        ])

    def run(name, max_steps, **kwargs):
        torch.manual_seed(0)
        task = TrainingTask(model=SmallNet(), loss_step=l1_step, train_dataset=NoisyPairs(), validate=validate)
        config = small_config(validate_every_steps=2, checkpoint={"every_steps": 2, "keep_last": 5},
                              logging={"every_steps": 1, "tensorboard": True, "progress_bar": False})
        return run_training(task, config, tmp_path / name, max_steps=max_steps, **kwargs)

    run("run", 6, stop=StopRules(after_steps=4))
    folder = tmp_path / "run/validation"
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000002", "step_00000004"]
    assert sorted(p.name for p in (folder / "step_00000004").iterdir()) == ["00_first_score_4.png", "01_second.png"]
    first = read_image(folder / "step_00000004/00_first_score_4.png").pixels
    assert first.shape == (4, 5 + 2 + 6, 3)  # panels side by side, two white columns apart
    np.testing.assert_allclose(first[:, :5], 0.8, atol=0.5 / 255)
    np.testing.assert_allclose(first[:, 5:7], 1.0)
    np.testing.assert_allclose(first[:, 7:, 0], np.linspace(0, 1, 24).reshape(4, 6), atol=0.5 / 255)
    second = read_image(folder / "step_00000004/01_second.png").pixels
    assert second.shape == (2, 3, 3) and second.max() == 0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run/logs/tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert set(events.Tags()["images"]) == {"validation/00_first", "validation/01_second"}
    assert [e.step for e in events.Images("validation/00_first")] == [2, 4]
    assert (events.Images("validation/00_first")[0].width, events.Images("validation/00_first")[0].height) == (13, 4)

    # Resuming an earlier checkpoint drops the later steps' images, as it cuts the metrics log back.
    run("run", 6, resume=str(tmp_path / "run/checkpoints/step_00000002"), stop=StopRules(after_steps=3))
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000002"]
    run("run", 6, overwrite=True, stop=StopRules(after_steps=1))
    assert not folder.exists()  # --overwrite deletes them with the rest of the run


def test_validation_image_names_are_safe_file_names_and_must_differ(tmp_path):
    from swintormer.core.validation_images import ValidationImage, image_file_name, write_validation_images

    panel = np.zeros((2, 2, 3), np.float32)
    assert image_file_name(ValidationImage("03_a/b c", [panel], note="psnr 1.5dB")) == "03_a_b_c_psnr_1.5dB.png"
    with pytest.raises(ValueError, match="not unique"):
        write_validation_images(tmp_path, 1, [ValidationImage("x", [panel]), ValidationImage("x", [panel])])
    assert not (tmp_path / "validation/step_00000001").exists()
    assert write_validation_images(tmp_path, 1, []) == []
