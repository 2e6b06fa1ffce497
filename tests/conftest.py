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
