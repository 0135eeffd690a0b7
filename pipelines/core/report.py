"""`--report` pages, the parts both jobs share: `_report.html` under the output, one self-contained HTML page (images
embedded as `data:` URIs, no external fonts, scripts or styles) to open in a browser. UTF-8 is declared and the font
stack falls back to the usual CJK fonts, so Chinese and English text show as written; text with CJK characters is
marked `lang="zh"` so browsers pick a Chinese face for it.

Also reading a data file's rows back (both formats) for the pages."""

from __future__ import annotations

import base64
import html
import io
import json
import re
import tarfile
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import pyarrow.parquet as pq

from . import columns as C
from .output import OutputStore
from .output.store import REPORT_FILE

__all__ = ["REPORT_FILE", "figure", "generated_line", "page", "read_rows", "text_block", "thumbnail_data_uri",
           "write_page"]

# Latin faces first, then CJK faces on macOS, Windows, Linux (Noto/Source Han, WenQuanYi), then the generic family
FONT_STACK = ('system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, "Noto Sans", '
              '"PingFang SC", "Hiragino Sans GB", "Microsoft YaHei", "Noto Sans CJK SC", "Source Han Sans SC", '
              '"WenQuanYi Micro Hei", "WenQuanYi Zen Hei", sans-serif')
THUMB_SIDE = 256
_CJK = re.compile(r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]")

STYLE = (
    f"body{{font-family:{FONT_STACK};margin:16px;color:#111;background:#fff}}"
    "h1{font-size:20px}.summary{font-size:14px;margin-bottom:12px}"
    f"figure{{display:inline-block;width:{THUMB_SIDE + 4}px;vertical-align:top;margin:6px;padding:4px;"
    "border:1px solid #ccc}"
    # every picture in the same square box, small ones scaled up (a 64 px render stays visible)
    f"figure.error{{border-color:#c00;background:#fff4f4}}"
    f"img{{width:{THUMB_SIDE}px;height:{THUMB_SIDE}px;object-fit:contain;background:#f4f4f4}}"
    f".none{{width:{THUMB_SIDE}px;height:{THUMB_SIDE // 2}px;background:#ddd;display:flex;align-items:center;"
    "justify-content:center;font-size:12px;text-align:center}"
    "figcaption{font-size:12px}.t{white-space:pre-wrap;word-break:break-word}.err{color:#a00}"
)


def thumbnail_data_uri(image: bytes, side: int = THUMB_SIDE) -> str:
    """Encoded image bytes -> a PNG thumbnail (longer side <= `side`, EXIF orientation applied) as a `data:` URI.
    Raises what Pillow raises for bytes that are no image (Pillow's decompression-bomb limit stays on)."""
    from PIL import Image, ImageOps

    im = Image.open(io.BytesIO(image))
    im.draft("RGB", (side, side))  # JPEG: decode at a fraction of the size
    im = ImageOps.exif_transpose(im).convert("RGB")
    im.thumbnail((side, side))
    sink = io.BytesIO()
    im.save(sink, "PNG")
    return "data:image/png;base64," + base64.b64encode(sink.getvalue()).decode("ascii")


def text_block(text: Any, cls: str = "t", limit: int = 300) -> str:
    """Escaped text in a span (shortened past `limit` characters), `lang="zh"` when it holds CJK characters."""
    value = "" if text is None else str(text)
    shown = value if len(value) <= limit else value[:limit] + f"... ({len(value)} chars)"
    lang = ' lang="zh"' if _CJK.search(value) else ""
    return f'<span class="{cls}"{lang}>{html.escape(shown)}</span>'


def figure(picture: str | None, placeholder: str, lines: Sequence[str], error: bool = False) -> str:
    """One cell: the picture (a `data:` URI) or a grey box saying `placeholder`, and the caption lines (HTML)."""
    shown = (f'<img src="{picture}" alt="">' if picture else
             f'<div class="none">{html.escape(placeholder)}</div>')
    return (f'<figure class="{"error" if error else "ok"}">{shown}<figcaption>' + "<br>".join(lines)
            + "</figcaption></figure>")


def page(title: str, summary: Sequence[str], cells: Iterable[str]) -> str:
    """The whole page: UTF-8 declared, inline style, `summary` lines (HTML) above the cells."""
    return ('<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><div class=\"summary\">" + "<br>".join(summary) + "</div>"
            + "".join(cells) + "</body></html>\n")


def generated_line() -> str:
    return f"generated {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}"


def write_page(store: OutputStore, text: str) -> str:
    """Write `_report.html` under the output; returns its URI."""
    target = store.location.child(REPORT_FILE)
    target.write_bytes_atomic(text.encode("utf-8"))
    return target.uri


def read_rows(store: OutputStore, name: str, keys: set[str] | None = None
              ) -> Iterator[tuple[dict[str, Any], bytes | None]]:
    """(row, the WebDataset sample's non-json member or None) of one data file, in file order (key order);
    `keys`: only these rows. Parquet rows are every column (an image column stays in the row)."""
    data = store.location.child(name).read_bytes()
    if store.output_format == "parquet":
        for row in pq.read_table(io.BytesIO(data)).to_pylist():
            if keys is None or row.get(C.KEY) in keys:
                yield row, None
        return
    samples: dict[str, dict[str, Any]] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for info in tar:
            if not info.isreg():
                continue
            stem, _, suffix = info.name.rpartition(".")
            sample = samples.setdefault(stem, {})
            content = tar.extractfile(info).read()
            if suffix == "json":
                sample["meta"] = json.loads(content.decode("utf-8"))
            else:
                sample["member"] = content
    for sample in samples.values():
        meta = sample.get("meta", {})
        if keys is None or meta.get(C.KEY) in keys:
            yield meta, sample.get("member")
