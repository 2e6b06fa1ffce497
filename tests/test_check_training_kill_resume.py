"""A short run of ``tools/check_training_kill_resume.py``: both training pipelines interrupted
(SIGINT and kill -9 for stage two, ``--stop-after-steps`` for stage one), resumed with
``--resume auto``, and compared bit for bit with an uninterrupted run. The full run (more
interruptions of every kind, at random) is recorded in docs/measurements/training.md."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import check_training_kill_resume as tool  # noqa: E402


def test_interrupted_and_resumed_training_equals_the_uninterrupted_run(tmp_path, capsys):
    assert tool.main(["--pipelines", "swintormer", "--interruptions", "2", "--kinds", "sigint,kill",
                      "--swintormer-steps", "8", "--workdir", str(tmp_path / "s"), "--json", str(tmp_path / "s.json")]) == 0
    result = json.loads((tmp_path / "s.json").read_text())
    rows = result["pipelines"][0]["interruptions"]
    assert result["all_identical"] and [row["kind"] for row in rows] == ["sigint", "kill"]
    assert rows[0]["exit_code"] in (0, 75) and rows[1]["exit_code"] in (0, -9)
    assert "bit-identical to the uninterrupted run" in capsys.readouterr().out

    assert tool.main(["--pipelines", "prior", "--interruptions", "1", "--kinds", "stop", "--prior-steps", "4",
                      "--workdir", str(tmp_path / "p"), "--json", str(tmp_path / "p.json")]) == 0
    result = json.loads((tmp_path / "p.json").read_text())
    row = result["pipelines"][0]["interruptions"][0]
    assert result["all_identical"] and row["exit_code"] == 0 and row["checkpoint_step"] == row["stop_after_steps"]
