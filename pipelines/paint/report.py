"""`--report`: `_report.html` under the output, a self-contained contact sheet of the first images (embedded
thumbnails, prompt, key, seed, status) to open in a browser. The page itself is `core.report`'s."""

from __future__ import annotations

import html
from typing import Any

from ..core import columns as C
from ..core.output import OutputStore
from ..core.report import (REPORT_FILE, figure, generated_line, page, read_rows, text_block, thumbnail_data_uri,
                           write_page)
from .schema import IMAGE_BYTES

__all__ = ["REPORT_FILE", "REPORT_IMAGES", "render_report", "thumbnail_data_uri", "write_report"]

REPORT_IMAGES = 48


def _report_rows(store: OutputStore, limit: int) -> list[tuple[dict[str, Any], bytes | None]]:
    """(metadata, image bytes) of the first `limit` rows, in key order of the data files (sorted by name)."""
    rows: list[tuple[dict[str, Any], bytes | None]] = []
    for name in store.data_files():
        for row, member in read_rows(store, name):
            image = row.pop(IMAGE_BYTES, None) if store.output_format == "parquet" else member
            rows.append((row, image))
        if len(rows) >= limit:
            break
    rows.sort(key=lambda r: str(r[0].get(C.KEY)))
    return rows[:limit]


def render_report(rows: list[tuple[dict[str, Any], bytes | None]], title: str) -> str:
    """A self-contained HTML contact sheet: embedded thumbnails, prompt (escaped, shortened), key, seed, status."""
    cells = []
    for meta, image in rows:
        status = str(meta.get(C.STATUS))
        lines = [f"<b>{html.escape(str(meta.get(C.KEY)))}</b> seed {html.escape(str(meta.get('seed')))} "
                 f"[{html.escape(status)}]", text_block(meta.get("prompt"))]
        if meta.get(C.ERROR):
            lines.append(text_block(meta.get(C.ERROR), cls="t err"))
        cells.append(figure(thumbnail_data_uri(image) if image else None, status, lines,
                            error=status == C.STATUS_ERROR))
    return page(title, [f"the first {len(rows)} images, in key order", generated_line()], cells)


def write_report(store: OutputStore, limit: int = REPORT_IMAGES) -> str:
    """Write `_report.html` under the output; returns its URI."""
    return write_page(store, render_report(_report_rows(store, limit), f"paint run {store.location.uri}"))
