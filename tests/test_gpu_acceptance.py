"""The GPU acceptance script's dry run: ``tools/gpu_acceptance.py --device cpu`` runs every check
at tiny sizes and its table has every row, each passing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import gpu_acceptance  # noqa: E402


def test_the_dry_run_passes_every_row(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "tools/gpu_acceptance.py", "--device", "cpu", "--workdir", str(tmp_path / "w"),
                           "--json", str(tmp_path / "result.json")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert [row["check"] for row in result["rows"]] == gpu_acceptance.ROWS
    assert all(row["result"] == "PASS" for row in result["rows"]) and result["dry_run"]
    table = done.stdout[done.stdout.index("| check |"):]
    assert all(f"| {name} | PASS |" in table for name in gpu_acceptance.ROWS)
    by_name = {row["check"]: row for row in result["rows"]}
    assert by_name["train_swintormer SIGTERM + resume"]["exit_codes"] == "75 then 0"
    assert by_name["deblur 4K fp32"]["s_per_mp"] > 0 and by_name["paper forward 512² bf16"]["median_ms"] > 0
