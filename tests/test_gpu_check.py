"""benchmarks/gpu_check.sh in DRY mode: the same steps as on a GPU, on the CPU with tiny models, and the table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_writes_the_table(tmp_path: Path) -> None:
    env = {**os.environ, "DRY": "1", "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    table = (tmp_path / "gpu_check.md").read_text(encoding="utf-8")
    for row in ("Chat decode step, batch 1, eager", "Chat decode step, batch 1, compiled", "Chat captions, beam3",
                "Chat captions, greedy", "Paint 32x32, ddpm", "Paint 32x32, dpmsolver++", "wall time"):
        assert row in table, f"{row!r} missing from\n{table}"
    assert "UNet calls/step" in (tmp_path / "paint.log").read_text(encoding="utf-8")
