"""The output's dataset card, `.huggingface.yaml`: what `datasets.load_dataset("<output folder>")` reads to load
exactly the data rows - the data files (`configs`), their features (`dataset_info`) - plus what the output is
(`viscpm_batch`: job, model, settings, row counts by status, run, date). Rewritten at the end of every run (normal,
resumed, `--retry-errors`, `--incremental`) with the counts of the whole output; deleted by `--overwrite`.

Why that file and not a `README.md` card (verified with datasets 5.2, pyarrow 26, Ray 2.60):
* Without a card `load_dataset(folder)` fails on our outputs: it reads `_checkpoint/*.parquet` (the loader skips
  only `.` names and `__` folders) and the `_*.json` bookkeeping as data.
* A root `README.md` whose YAML header declares `configs: ... data_files` fixes the loader, but it is a data file to
  every reader that skips only `_`/`.` names: `pyarrow.parquet.read_table(folder)` and `pyarrow.dataset.dataset(
  folder)` fail on it ("Could not read schema from README.md"), so would Spark (same rule; Spark itself was not run
  here), and `ray.data.read_webdataset(folder)` (no extension filter) fails on it too; only `ray.data.read_parquet`
  (it filters on `.parquet`) copes.
* The loader also reads `.huggingface.yaml`, the standalone form of that header (merged over a README.md's), from
  the folder's root - and a `.` name is skipped by pyarrow, Spark, Ray Data and by the loader's own data file search.
  So all of them read the data rows only. The price: the file is hidden from `ls` (`ls -a`), and a person browsing
  the output finds the facts in it rather than in a README. (The loader looks for the same file in Hub
  repositories, so an uploaded output should load alike; not tried.)
* Features are declared because the loader infers WebDataset features from the first 5 samples: a first shard whose
  first rows are errors (null captions) types `caption` as null and the load fails on the next ok row.
* The loader caches what it loaded under a hash of the card's `dataset_info`, not of the files its patterns match:
  an output that grew would load stale from that cache. So `dataset_info.download_size` is the data files' total
  size in bytes (what the loader would download): it changes with the data, and with it the cache entry.
* `load_dataset("parquet", data_dir=folder)` does not read the card (the packaged builders take every file under
  `data_dir`): use `load_dataset(folder)`, or `data_files=f"{folder}/part-r*.parquet"`.
"""

from __future__ import annotations

import glob
import json
import logging
import posixpath
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from ..storage import Location, with_retries
from .files import EXTENSIONS, parse_data_file_name
from .manifest import Manifest
from .store import CARD_FILE

logger = logging.getLogger(__name__)

CARD_SECTION = "viscpm_batch"  # our facts, beside the keys the Hugging Face loader reads

# Arrow type -> the Hugging Face `dtype` name of a scalar feature (what `Value(dtype)` takes)
_SCALAR_DTYPES = {
    pa.string(): "string", pa.large_string(): "large_string", pa.bool_(): "bool", pa.int8(): "int8",
    pa.int16(): "int16", pa.int32(): "int32", pa.int64(): "int64", pa.uint8(): "uint8", pa.uint16(): "uint16",
    pa.uint32(): "uint32", pa.uint64(): "uint64", pa.float16(): "float16", pa.float32(): "float32",
    pa.float64(): "float64", pa.binary(): "binary", pa.large_binary(): "large_binary", pa.date32(): "date32",
}


@dataclass(frozen=True)
class CardLayout:
    """How a job's rows are stored, for the card's features.

    `schema`: the rows (the Parquet columns; the fields of the WebDataset `json` member). `members`: the WebDataset
    members besides `json`, as (suffix, `string` | `image`). `image_column`: a Parquet column of encoded image bytes
    (declared as an image; the `json` member leaves it out)."""

    schema: pa.Schema
    members: tuple[tuple[str, str], ...] = ()
    image_column: str | None = None


def _dtype(typ: pa.DataType, in_json: bool) -> str | None:
    if in_json and (pa.types.is_binary(typ) or pa.types.is_large_binary(typ)):
        return "string"  # the json member holds bytes as UTF-8 text (or "base64:..." text)
    return _SCALAR_DTYPES.get(typ)


def features(layout: CardLayout, output_format: str) -> list[dict[str, Any]] | None:
    """The `dataset_info.features` of an output, in the loader's YAML form; None when a column has a type this
    does not map (a nested `--keep-columns` column): the loader then infers the features itself."""
    fields = [f for f in layout.schema if f.name != layout.image_column or output_format == "parquet"]
    out: list[dict[str, Any]] = []
    for f in fields:
        if f.name == layout.image_column:
            out.append({"name": f.name, "dtype": "image"})
            continue
        dtype = _dtype(f.type, in_json=output_format == "webdataset")
        if dtype is None:
            logger.info("dataset card: column %r of type %s has no declared feature; the loader infers them",
                        f.name, f.type)
            return None
        out.append({"name": f.name, "dtype": dtype})
    if output_format == "parquet":
        return out
    # WebDataset, as the loader groups a tar: one column per member suffix, then __key__ and __url__
    return [*({"name": s, "dtype": d} for s, d in layout.members), {"name": "json", "struct": out},
            {"name": "__key__", "dtype": "string"}, {"name": "__url__", "dtype": "string"}]


def data_file_patterns(output_format: str, outputs: Iterable[str] | None = None) -> list[str]:
    """The card's `data_files`: a normal output's `part-r*.<ext>` (never `_checkpoint/`: `*` stays in its folder);
    an `--incremental` output's `<dir>/*.<ext>` for each folder holding outputs (a pattern per folder, not a list of
    files: the loader globs each entry, and stale names would fail the load). Temporary files are `_tmp-*` without
    an extension, so no pattern matches them."""
    ext = EXTENSIONS[output_format]
    if outputs is None:
        return [f"part-r*.{ext}"]
    folders = sorted({posixpath.dirname(name) for name in outputs})
    return [f"{glob.escape(d)}/*.{ext}" if d else f"*.{ext}" for d in folders]


def _plain(value: Any) -> Any:
    """Only what YAML's safe dumper writes (tuples and other objects via JSON)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def render_card(*, job: str, output_format: str, mode: str, run: int, model: str, settings: Mapping[str, Any],
                rows: int, statuses: Mapping[str, int], complete: bool, data_files: Sequence[str],
                feature_list: list[dict[str, Any]] | None, data_bytes: int) -> str:
    """The card's text (YAML)."""
    import yaml

    card: dict[str, Any] = {
        "pretty_name": f"viscpm-batch {job} output",
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": list(data_files)}]}],
    }
    card["dataset_info"] = {"download_size": int(data_bytes)}
    if feature_list is not None:
        card["dataset_info"]["features"] = feature_list
    card[CARD_SECTION] = {
        "job": job, "mode": mode, "output_format": output_format, "model": model, "rows": int(rows),
        "statuses": {k: int(v) for k, v in sorted(statuses.items())}, "complete": bool(complete), "run": int(run),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "settings": _plain(dict(settings)),
    }
    head = (f"# Dataset card of this {job} output (viscpm-batch), rewritten at the end of every run.\n"
            "# datasets.load_dataset(\"<this folder>\") reads `configs` and `dataset_info` and loads the data rows\n"
            "# only; `viscpm_batch` says what the output holds. A README.md header would do the same for the\n"
            "# loader, but pyarrow/Spark/Ray would read a README.md as data: names starting with '.' they skip.\n")
    return head + yaml.safe_dump(card, allow_unicode=True, sort_keys=False, width=120)


def read_card(location: Location) -> dict[str, Any] | None:
    """The card of an output (None: it has none)."""
    import yaml

    target = location.child(CARD_FILE)
    return yaml.safe_load(target.read_bytes().decode("utf-8")) if target.exists() else None


def write_card(location: Location, *, job: str, output_format: str, mode: str, run: int, model: str,
               settings: Mapping[str, Any], rows: int, statuses: Mapping[str, int], complete: bool,
               layout: CardLayout | None, data_bytes: int, outputs: Iterable[str] | None = None) -> str:
    """Write the output's card; returns its URI. `outputs`: an `--incremental` output's data file names (None: a
    normal output). `layout` None keeps the features of the card already there (an incremental run that planned
    no input file cannot know the types of `--keep-columns`)."""
    if layout is not None:
        feature_list = features(layout, output_format)
    else:
        old = read_card(location) or {}
        feature_list = (old.get("dataset_info") or {}).get("features")
    text = render_card(job=job, output_format=output_format, mode=mode, run=run, model=model, settings=settings,
                       rows=rows, statuses=statuses, complete=complete,
                       data_files=data_file_patterns(output_format, outputs), feature_list=feature_list,
                       data_bytes=data_bytes)
    target = location.child(CARD_FILE)
    target.write_bytes_atomic(text.encode("utf-8"))
    return target.uri


def write_job_card(config: Any, location: Location, job: str, layout: CardLayout | None, run: int,
                   complete: bool, statuses: Mapping[str, int] | None = None) -> str:
    """The card at the end of a job run: `statuses` are the whole output's rows by status (a normal run's
    reconciliation); an `--incremental` output's counts and data files come from its manifest instead."""
    outputs: list[str] | None = None
    if config.incremental:
        entries = Manifest.read(location).entries.values()
        outputs = [name for entry in entries for name in entry.get("outputs", [])]
        counts: dict[str, int] = {}
        for entry in entries:
            for status, n in entry.get("statuses", {}).items():
                counts[status] = counts.get(status, 0) + n
        statuses = counts
        wanted = {location.child(name).path for name in outputs}
        sizes = [info.get("size") or 0 for path, info in location.list_details().items() if path in wanted]
    else:
        location.fs.invalidate_cache(location.path)  # s3fs caches listings; the write tasks wrote elsewhere
        listing = with_retries(lambda: location.fs.ls(location.path, detail=True), f"list {location.uri}")
        sizes = [e.get("size") or 0 for e in listing if parse_data_file_name(e["name"].rstrip("/").rsplit("/", 1)[-1])]
    statuses = dict(statuses or {})
    return write_card(location, job=job, output_format=config.output_format,
                      mode="incremental" if config.incremental else "normal", run=run, model=config.model,
                      settings=config.fingerprint(), rows=sum(statuses.values()), statuses=statuses,
                      complete=complete, layout=layout, data_bytes=sum(sizes), outputs=outputs)
