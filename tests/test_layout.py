"""The project's boundaries: imports go jobs -> pipelines -> viscpm; no Ray inside viscpm; pipelines use only
the public `viscpm` API (plus the light image helpers); a decode worker never pays for torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what pipelines/ may import from viscpm besides the package's public names
PIPELINE_ALLOWED_MODULES = {"viscpm", "viscpm.image"}


def imported_modules(folder: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        found[str(path.relative_to(ROOT))] = names
    return found


def test_no_ray_and_no_pipelines_in_viscpm() -> None:
    for path, names in imported_modules("viscpm").items():
        bad = {n for n in names if n.split(".")[0] in ("ray", "pipelines", "jobs")}
        assert not bad, f"{path} imports {bad}"


def test_pipelines_use_only_the_public_model_api() -> None:
    for path, names in imported_modules("pipelines").items():
        bad = {n for n in names if n.split(".")[0] == "viscpm" and n not in PIPELINE_ALLOWED_MODULES}
        bad |= {n for n in names if n.split(".")[0] == "jobs"}
        assert not bad, f"{path} imports {bad}"


def test_decode_helpers_do_not_import_torch() -> None:
    code = "import sys; from viscpm.image import to_rgb; import viscpm; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_configs_and_to_rgb_do_not_import_torch() -> None:
    code = ("import sys; from viscpm import GenerationConfig, SamplingConfig, DEFAULT_QUESTION, ChatConfig, PaintConfig, "
            "CPMBeeConfig, BEiT3Config, VisionQueryConfig, MODEL_PRESETS, model_folder_problem; import viscpm; "
            "viscpm.to_rgb; [c.from_name(n) for c, n in ((ChatConfig, 'tiny'), (PaintConfig, 'viscpm-paint'), "
            "(GenerationConfig, 'original'), (SamplingConfig, 'fast'))]; sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_viscpm_modules_are_at_most_600_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in sorted((ROOT / "viscpm").rglob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 600}
    assert not long, f"modules over 600 lines: {long}"
