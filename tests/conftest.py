"""Shared test fixtures. Parity tests read golden data recorded from the original VisCPM from the folder named by
VISCPM_REFERENCE_DIR (default: ../shared/reference beside the repo) and skip with a clear message without it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def reference_path() -> Path:
    return Path(os.environ.get("VISCPM_REFERENCE_DIR", REPO_ROOT.parent / "shared" / "reference")).resolve()


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    path = reference_path()
    if not (path / "README.md").is_file() and not any(path.glob("*.json")):
        pytest.skip(
            f"parity fixtures not found at {path}: set VISCPM_REFERENCE_DIR to a folder of golden data recorded "
            "from the original VisCPM (see README, 'Parity tests')"
        )
    return path
