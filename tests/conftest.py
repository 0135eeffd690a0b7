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


# --- CPM-Bee vocabulary (bee.txt) ----------------------------------------------------------------------------
# The README of the reference sets says bee.txt ships in the shared set A folder only; a held-out set may lack it.
# Look in the reference folder first, then VISCPM_VOCAB_FILE, then the default shared folder, and accept a
# candidate only if it matches the sha256 recorded in tokenizer.json (when there is one).


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def vocab_file(reference_dir: Path) -> Path:
    import json

    expected = None
    tok_json = reference_dir / "tokenizer.json"
    if tok_json.is_file():
        expected = json.loads(tok_json.read_text(encoding="utf-8")).get("vocab_file_sha256")
    candidates = [reference_dir / "bee.txt"]
    if os.environ.get("VISCPM_VOCAB_FILE"):
        candidates.append(Path(os.environ["VISCPM_VOCAB_FILE"]))
    candidates.append(REPO_ROOT.parent / "shared" / "reference" / "bee.txt")
    for cand in candidates:
        if cand.is_file() and (expected is None or _sha256(cand) == expected):
            return cand.resolve()
    pytest.skip(f"no bee.txt matching the reference set found (looked at {[str(c) for c in candidates]})")


@pytest.fixture(scope="session")
def bee_tokenizer(vocab_file: Path):
    from viscpm.tokenizer import CPMBeeTokenizer

    return CPMBeeTokenizer.from_file(vocab_file)


@pytest.fixture(scope="session")
def chat_reference(reference_dir: Path):
    """The chat model of the fixture set: config, CPM-Bee loaded from its weights, cases and tensors."""
    from reference_data import Fixture

    return Fixture(reference_dir, "chat")


@pytest.fixture(scope="session")
def paint_reference(reference_dir: Path):
    from reference_data import Fixture

    return Fixture(reference_dir, "paint")


# ==== pipelines/ (caption job) fixtures - defined in tests/pipeline_fixtures.py, registered once here ====
def pytest_report_header(config: pytest.Config) -> str:
    """Which CPU kernels the numbers in this run come from (.ci/run reruns the numeric tests on AVX2 and DEFAULT)."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    asked = os.environ.get("ATEN_CPU_CAPABILITY")
    if asked and asked.upper() != capability:
        # a run meant to prove "passes on AVX2" that silently used other kernels would prove nothing
        raise pytest.UsageError(f"ATEN_CPU_CAPABILITY={asked} but torch uses {capability}")
    return f"torch CPU capability: {capability}, ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', 'ALL')}"


from pipeline_fixtures import ray_session, s3  # noqa: E402,F401
