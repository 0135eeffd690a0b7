"""`--report`: `_report.html` under the output, a self-contained contact sheet of the first images (embedded
thumbnails, prompt, key, seed, status) to open in a browser."""

from __future__ import annotations

import base64
import html
import io
import json
import tarfile
from typing import Any

import pyarrow.parquet as pq

from ..core import columns as C
from ..core.output import OutputStore
from .schema import IMAGE_BYTES

REPORT_FILE = "_report.html"
REPORT_IMAGES = 48


def _report_rows(store: OutputStore, limit: int) -> list[tuple[dict[str, Any], bytes | None]]:
    """(metadata, image bytes) of the first `limit` rows, in key order of the data files (sorted by name)."""
    rows: list[tuple[dict[str, Any], bytes | None]] = []
    for name in store.data_files():
        data = store.location.child(name).read_bytes()
        if store.output_format == "parquet":
            for row in pq.read_table(io.BytesIO(data)).to_pylist():
                image = row.pop(IMAGE_BYTES, None)
                rows.append((row, image))
        else:
            samples: dict[str, dict[str, Any]] = {}
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
                for info in tar:
                    if not info.isreg():
                        continue
                    stem, _, suffix = info.name.rpartition(".")
                    content = tar.extractfile(info).read()
                    sample = samples.setdefault(stem, {})
                    if suffix == "json":
                        sample["meta"] = json.loads(content.decode("utf-8"))
                    else:
                        sample["image"] = content
            rows += [(s.get("meta", {}), s.get("image")) for s in samples.values()]
        if len(rows) >= limit:
            break
    rows.sort(key=lambda r: str(r[0].get(C.KEY)))
    return rows[:limit]


def thumbnail_data_uri(image: bytes, side: int = 256) -> str:
    """Encoded image bytes -> a PNG thumbnail (longer side <= `side`) as a `data:` URI for an HTML page."""
    from PIL import Image

    im = Image.open(io.BytesIO(image)).convert("RGB")
    im.thumbnail((side, side))
    sink = io.BytesIO()
    im.save(sink, "PNG")
    return "data:image/png;base64," + base64.b64encode(sink.getvalue()).decode("ascii")


def render_report(rows: list[tuple[dict[str, Any], bytes | None]], title: str) -> str:
    """A self-contained HTML contact sheet: embedded thumbnails, prompt (escaped, shortened), key, seed, status."""
    cells = []
    for meta, image in rows:
        prompt = str(meta.get("prompt") or "")
        shown = prompt if len(prompt) <= 300 else prompt[:300] + f"... ({len(prompt)} chars)"
        picture = (f'<img src="{thumbnail_data_uri(image)}" alt="{html.escape(str(meta.get(C.KEY)))}">' if image else
                   f'<div class="none">{html.escape(str(meta.get(C.STATUS)))}</div>')
        note = meta.get(C.ERROR) or ""
        cells.append(
            f'<figure>{picture}<figcaption><b>{html.escape(str(meta.get(C.KEY)))}</b> seed '
            f'{html.escape(str(meta.get("seed")))} [{html.escape(str(meta.get(C.STATUS)))}]<br>'
            f'<span class="p">{html.escape(shown)}</span>'
            f'{"<br><i>" + html.escape(note) + "</i>" if note else ""}</figcaption></figure>')
    return ("<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title><style>"
            "body{font-family:sans-serif}figure{display:inline-block;width:260px;vertical-align:top;margin:6px}"
            "img{width:256px}.none{width:256px;height:256px;background:#ddd;display:flex;align-items:center;"
            "justify-content:center}.p{white-space:pre-wrap;word-break:break-all;font-size:12px}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>" + "".join(cells) + "</body></html>")


def write_report(store: OutputStore, limit: int = REPORT_IMAGES) -> str:
    """Write `_report.html` under the output; returns its URI."""
    text = render_report(_report_rows(store, limit), f"paint run {store.location.uri}")
    target = store.location.child(REPORT_FILE)
    target.write_bytes_atomic(text.encode("utf-8"))
    return target.uri
