"""Regenerate the README's option tables (between the `<!-- caption-config-reference -->` and
`<!-- paint-config-reference -->` markers) from the job config classes. `tests/test_pipeline_units.py` fails when
they are stale.

    python tools/update_readme_tables.py
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines import CaptionJobConfig, PaintJobConfig  # noqa: E402
from pipelines.core.config import reference_markdown  # noqa: E402


def main() -> None:
    readme = REPO / "README.md"
    text = readme.read_text(encoding="utf-8")
    for job, cls in (("caption", CaptionJobConfig), ("paint", PaintJobConfig)):
        opening, closing = f"<!-- {job}-config-reference -->\n", f"<!-- /{job}-config-reference -->"
        start = text.index(opening) + len(opening)
        text = text[:start] + reference_markdown(cls) + "\n" + text[text.index(closing):]
    readme.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
