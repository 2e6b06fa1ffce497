"""The shared training engine: exact resume, NaN guard, EMA, schedule, data order, checkpoints.

These tests use a small convolutional model so that they run in seconds; the Swintormer
pipeline has its own end-to-end tests in ``test_train_swintormer.py``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset

from swintormer.core.config import SchedulerConfig, TrainingConfig
from swintormer.core.training import (
    EpochShardSampler,
    ExponentialMovingAverage,
    NonFiniteLossError,
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


def train(tmp_path, name: str, max_steps: int, resume: str | None = None, **changes):
    torch.manual_seed(0)
    model = SmallNet()
    task = TrainingTask(model=model, loss_step=l1_step, train_dataset=NoisyPairs())
    result = run_training(task, small_config(**changes), tmp_path / name, max_steps=max_steps, resume=resume)
    return model, result


def test_resume_is_exact(tmp_path):
    straight, straight_result = train(tmp_path, "straight", 6)
    train(tmp_path, "split", 3)
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
    _, result = train(tmp_path, "run", 5, checkpoint={"every_steps": 1, "keep_last": 2})
    kept = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())
    assert kept == ["step_00000004", "step_00000005"]
    state = json.loads((result.last_checkpoint / "trainer_state.json").read_text())
    assert state["step"] == 5 and state["num_processes"] == 1
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
