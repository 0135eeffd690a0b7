"""`--report`: `_report.html` under the output, a contact sheet of a sample of the whole output - error rows first,
then a deterministic sample - with each row's image, key, status, question, caption and error (the page is
`core.report`'s: self-contained, UTF-8, CJK fonts).

Caption outputs hold no images, so the pictures are read back from the input, after the run and on the driver:
nothing is added to the pipeline or the model path, and resumed / `--retry-errors` runs show the whole output. The
cost is about that of planning the input once more, plus the sampled images: the (key, status) index comes from the
checkpoints; then per input format - images: the sampled files; Parquet: the id column of each file, then only the
row groups holding a sampled id; WebDataset: the tar headers, extracting only the sampled samples' image members
(stopping once all are found).
"""

from __future__ import annotations

import html
import logging
import os
import tarfile
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..core.inputs import id_to_key
from ..core.output import OutputStore
from ..core.report import figure, generated_line, page, read_rows, text_block, thumbnail_data_uri, write_page
from ..core.storage import is_remote, locate, relative_key
from . import schema as S
from .readers import IMAGE_STRUCT, InputPlan
from .webdataset import _WDS_KEY, WDS_IMAGE_SUFFIXES

logger = logging.getLogger(__name__)

REPORT_ROWS = 48


def _spread(keys: pa.Array, n: int) -> list[str]:
    """`n` of `keys` at evenly spaced places of their sorted order: deterministic, spread over the whole key range,
    and done by Arrow (an output of millions of rows costs a sort, not a Python loop)."""
    if n <= 0 or len(keys) == 0:
        return []
    ordered = pc.take(keys, pc.sort_indices(keys))
    step = len(ordered) / min(n, len(ordered))
    return ordered.take(pa.array([int(i * step) for i in range(min(n, len(ordered)))])).to_pylist()


def choose_sample(index: pa.Table, limit: int) -> list[str]:
    """Keys to show: error rows first (at most half the sheet when there are other rows), then the others; each part
    evenly spaced over its keys in sorted order."""
    keys = index[S.KEY].combine_chunks() if index.num_rows else pa.array([], pa.string())
    bad = pc.equal(index[S.STATUS].combine_chunks(), S.STATUS_ERROR) if index.num_rows else pa.array([], pa.bool_())
    errors, others = pc.filter(keys, bad), pc.filter(keys, pc.invert(bad))
    n_errors = min(len(errors), limit if len(others) == 0 else max(limit // 2, limit - len(others)))
    return _spread(errors, n_errors) + _spread(others, limit - n_errors)


# ---- images from the input -----------------------------------------------------------------------------------------
def _read_path(plan: InputPlan, path: str, storage_options: Mapping[str, Any]) -> bytes:
    """An image path of a Parquet input, resolved as the decode stage does (relative: to the input folder)."""
    if not is_remote(path) and not os.path.isabs(path) and not path.startswith("file://"):
        path = plan.root.uri.rstrip("/") + "/" + path
    return locate(path, storage_options).read_bytes()


def _parquet_images(plan: InputPlan, config: Any, wanted: set[str], storage_options: Mapping[str, Any]
                    ) -> dict[str, bytes | None]:
    found: dict[str, bytes | None] = {}
    for path in plan.files:
        if len(found) == len(wanted):
            break
        with plan.root.fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            if plan.id_column is not None:
                keys = id_to_key(pf.read(columns=[plan.id_column]).column(0)).to_pylist()
            else:  # ids derived from file and row, as the plan made them
                name = relative_key(plan.root.path, path)
                keys = [f"{name}#{i}" for i in range(pf.metadata.num_rows)]
            start = 0
            for group in range(pf.metadata.num_row_groups):
                rows = pf.metadata.row_group(group).num_rows
                hits = [(i, k) for i, k in enumerate(keys[start:start + rows]) if k in wanted]
                if hits:
                    images = pf.read_row_group(group, columns=[config.image_column]).column(0).to_pylist()
                    for i, key in hits:
                        found[key] = images[i]
                start += rows
    for key, value in found.items():
        if plan.image_kind == IMAGE_STRUCT:  # HuggingFace `datasets` Image: the bytes, else the path
            value = value or {}
            found[key] = value = value.get("bytes") or value.get("path")
            if isinstance(value, (bytes, bytearray)):
                continue
        elif not plan.image_is_path:
            continue
        try:
            found[key] = _read_path(plan, value, storage_options) if value else None
        except (OSError, ValueError) as exc:
            logger.info("report: image of %r not readable: %s", key, exc)
            found[key] = None
    return found


def _webdataset_images(plan: InputPlan, config: Any, wanted: set[str]) -> dict[str, bytes | None]:
    suffixes = [config.image_key.lower()] if config.image_key else list(WDS_IMAGE_SUFFIXES)
    found: dict[str, dict[str, bytes]] = {}
    for path in plan.files:
        if len(found) == len(wanted):
            break
        # a seekable tar: headers are read, the data of members we do not extract is skipped
        with plan.root.fs.open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r:*") as tar:
            for info in tar:
                m = _WDS_KEY.match(info.name) if info.isreg() else None
                if m and m.group(1) in wanted and m.group(2).lower() in suffixes:
                    members = found.setdefault(m.group(1), {})
                    members.setdefault(m.group(2).lower(), tar.extractfile(info).read())
    return {key: next((members[s] for s in suffixes if s in members), None) for key, members in found.items()}


def input_images(plan: InputPlan, config: Any, keys: list[str], storage_options: Mapping[str, Any]
                 ) -> dict[str, bytes | None]:
    """The image bytes of `keys`, read from the input (None: the row has none, or it cannot be read)."""
    wanted = set(keys)
    if not wanted:
        return {}
    if plan.input_format == "images":
        out: dict[str, bytes | None] = {}
        for key in keys:
            try:
                out[key] = plan.root.child(key).read_bytes()
            except OSError:
                out[key] = None
        return out
    if plan.input_format == "parquet":
        return _parquet_images(plan, config, wanted, storage_options)
    return _webdataset_images(plan, config, wanted)


# ---- the page ------------------------------------------------------------------------------------------------------
def _picture(image: bytes | None) -> tuple[str | None, str]:
    if not image:
        return None, "no image"
    try:
        return thumbnail_data_uri(image), ""
    except Exception as exc:  # noqa: BLE001 - any undecodable input is shown as such; the row says why
        return None, f"not shown: {type(exc).__name__}"


def render_caption_report(rows: list[dict[str, Any]], images: Mapping[str, bytes | None], title: str,
                          summary: list[str]) -> str:
    cells = []
    for row in rows:
        picture, placeholder = _picture(images.get(row[S.KEY]))
        status = str(row.get(S.STATUS))
        lines = [f"<b>{html.escape(str(row[S.KEY]))}</b> [{html.escape(status)}]",
                 "Q: " + text_block(row.get(S.QUESTION), limit=120)]
        if row.get(S.CAPTION) is not None:
            lines.append("A: " + text_block(row.get(S.CAPTION)))
        if row.get(S.ERROR):
            lines.append(text_block(row[S.ERROR], cls="t err"))
        cells.append(figure(picture, placeholder, lines, error=status == S.STATUS_ERROR))
    return page(title, summary, cells)


def write_caption_report(store: OutputStore, plan: InputPlan, config: Any, storage_options: Mapping[str, Any],
                         limit: int = REPORT_ROWS) -> str:
    """Write `_report.html` for the whole output; returns its URI."""
    index = store.checkpoint_index()
    keys = choose_sample(index, limit)
    chosen = index.filter(pc.is_in(index[S.KEY], value_set=pa.array(keys, pa.string()))) if keys else index.slice(0, 0)
    files: dict[str, set[str]] = {}
    for key, name in zip(chosen[S.KEY].to_pylist(), chosen["file"].to_pylist()):
        files.setdefault(name, set()).add(key)
    rows: dict[str, dict[str, Any]] = {}
    for name, wanted in sorted(files.items()):
        rows.update((row[S.KEY], row) for row, _ in read_rows(store, name, wanted))
    images = input_images(plan, config, keys, storage_options)
    statuses = pc.value_counts(index[S.STATUS]).to_pylist() if index.num_rows else []
    counts = ", ".join(f"{html.escape(str(s['values']))} {s['counts']}" for s in statuses)
    n_errors = sum(1 for k in keys if rows.get(k, {}).get(S.STATUS) == S.STATUS_ERROR)
    summary = [f"{index.num_rows} rows in the output ({counts or 'none'}); model {html.escape(str(config.model))}",
               f"shown: {len(keys)} rows - {n_errors} error rows first, then a deterministic sample (evenly spaced "
               "over the sorted keys)",
               generated_line()]
    text = render_caption_report([rows[k] for k in keys if k in rows], images, f"caption run {store.location.uri}",
                                 summary)
    return write_page(store, text)


__all__ = ["REPORT_ROWS", "choose_sample", "input_images", "render_caption_report", "write_caption_report"]
