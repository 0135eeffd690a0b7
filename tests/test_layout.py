"""The project's boundaries: imports go jobs -> pipelines -> viscpm; no Ray inside viscpm; pipelines and jobs use
only the public `viscpm` API; `pipelines/` is core + caption + paint, and the two jobs never import each other; a
decode worker and a job config never pay for torch; no module is over 600 lines."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 600


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


def test_pipelines_and_jobs_use_only_the_public_model_api() -> None:
    for folder in ("pipelines", "jobs"):
        for path, names in imported_modules(folder).items():
            bad = {n for n in names if n.split(".")[0] == "viscpm" and n != "viscpm"}
            bad |= {n for n in names if n.split(".")[0] == "jobs" and folder == "pipelines"}
            assert not bad, f"{path} imports {bad}"


def relative_imports(path: Path) -> set[str]:
    """The modules a file imports relatively, resolved to dotted names under the repo root."""
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            found.add(".".join([*base, *(node.module.split(".") if node.module else [])]))
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_pipelines_rooms() -> None:
    top = sorted(p.name for p in (ROOT / "pipelines").iterdir() if p.suffix == ".py")
    assert top == ["__init__.py"], f"modules at the top of pipelines/: {top} (they belong in core/, caption/, paint/)"
    rooms = sorted(p.name for p in (ROOT / "pipelines").iterdir() if p.is_dir() and p.name != "__pycache__")
    assert rooms == ["caption", "core", "paint"], rooms
    for job, other in (("caption", "paint"), ("paint", "caption")):
        for path in (ROOT / "pipelines" / job).rglob("*.py"):
            bad = {m for m in relative_imports(path) if m.startswith(f"pipelines.{other}")}
            assert not bad, f"{path.relative_to(ROOT)} imports the {other} job: {bad}"
    for path in (ROOT / "pipelines" / "core").rglob("*.py"):
        bad = {m for m in relative_imports(path) if m.startswith(("pipelines.caption", "pipelines.paint"))}
        assert not bad, f"{path.relative_to(ROOT)} (shared code) imports a job: {bad}"


def test_modules_are_at_most_600_lines() -> None:
    for folder in ("viscpm", "pipelines", "jobs"):
        for path in (ROOT / folder).rglob("*.py"):
            lines = len(path.read_text(encoding="utf-8").splitlines())
            assert lines <= MAX_MODULE_LINES, f"{path.relative_to(ROOT)} has {lines} lines"


def test_job_configs_do_not_load_torch() -> None:
    code = ("import sys; from pipelines import CaptionJobConfig, PaintJobConfig; "
            "CaptionJobConfig(input='i', output='o').validate(); PaintJobConfig(input='i', output='o').validate(); "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_configs_and_to_rgb_do_not_import_torch() -> None:
    code = ("import sys; from viscpm import GenerationConfig, SamplingConfig, DEFAULT_QUESTION, ChatConfig, PaintConfig, "
            "CPMBeeConfig, BEiT3Config, VisionQueryConfig, MODEL_PRESETS, model_folder_problem; import viscpm; "
            "viscpm.to_rgb; [c.from_name(n) for c, n in ((ChatConfig, 'tiny'), (PaintConfig, 'viscpm-paint'), "
            "(GenerationConfig, 'original'), (SamplingConfig, 'fast'))]; from PIL import Image; "
            "viscpm.model_input_image(Image.new('L', (9, 5)), viscpm.chat_image_size('shapes')); "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0

