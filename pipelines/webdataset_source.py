"""The Ray Data datasource of WebDataset shards for the caption job: Ray's file-based read machinery (file
listing, read tasks, retries, streaming from S3) around `readers.webdataset_blocks`, which gives every block the
same schema. Kept out of `readers.py` so that the planning code (and `prompts.py`, which uses it) never imports
Ray."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
from ray.data.datasource import FileBasedDatasource

from .readers import webdataset_blocks, webdataset_schema


class WebDatasetShards(FileBasedDatasource):
    """Reads `.tar` shards into blocks of `webdataset_schema(columns)` (see `readers.webdataset_blocks`)."""

    _FILE_EXTENSIONS = None  # the plan already chose the files; a shard named by --input may have any extension

    def __init__(self, paths: Sequence[str], columns: Sequence[str], **file_based_kwargs: Any) -> None:
        super().__init__(list(paths), schema=webdataset_schema(columns), **file_based_kwargs)
        self.columns = list(columns)

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        yield from webdataset_blocks(f, path, self.columns)
