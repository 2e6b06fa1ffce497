"""Shared pytest setup: the repository root on ``sys.path`` and the location of ``../shared``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The authors' test vectors (``../shared/reference``), present beside every clone in CI."""
    path = SHARED / "reference"
    if not path.is_dir():
        pytest.skip(f"reference test vectors not found at {path}")
    return path


@pytest.fixture
def two_process_launch() -> list[str]:
    """Command prefix that runs a module as two CPU processes under ``accelerate launch``.

    accelerate 1.x starts several CPU processes only through ``--multi_gpu`` (``--cpu
    --num_processes 2`` starts one); the pipelines then ask for the CPU themselves
    (``swintormer.distributed``). A free port keeps parallel test workers apart.
    """
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(port),
    ]
