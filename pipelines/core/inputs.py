"""What both jobs do with their input before any work: list it (with messages that say what is wrong), tell a
file of the wrong kind, and check the ids. This module imports neither Ray nor torch."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from .stage import sample_text
from .storage import InputListing, InputNotFound, Location, is_pattern, list_input_files

logger = logging.getLogger(__name__)


class InputError(ValueError):
    """The input cannot be processed as configured (missing columns, bad or duplicate ids, no files)."""


# ---- what is at the input path ------------------------------------------------------------------------------------
_LISTING_MODULES = ("botocore", "aiobotocore", "s3fs")  # their errors (network, auth) are not always OSErrors
SKIPPED_SHOWN = 5  # skipped file names shown in a log or end line (`_summary.json` holds them all)


def skipped_files_text(names: Sequence[str]) -> str:
    """"2 files skipped: notes.csv, README.md" - for the log and the end line of a run."""
    shown = ", ".join(names[:SKIPPED_SHOWN]) + (", ..." if len(names) > SKIPPED_SHOWN else "")
    return f"{len(names)} file{'' if len(names) == 1 else 's'} skipped: {shown}"


def list_input(spec: str, storage_options: Mapping[str, Any] | None, extensions: Sequence[str], what: str,
               allow_empty: bool = False) -> InputListing:
    """The one listing of an --input (`list_input_files`: paths, folders, prefixes, brace ranges and lists, globs,
    `::`-joined specs), with every way it can come up empty turned into an InputError that says which: a spec or
    name matches nothing (a missing bucket included), cannot be listed, or holds no `what` (then the message shows
    what it does hold, since a wrong --input-format is the usual cause). Files it names but does not read (another
    extension) are logged here as a warning; the run reports them again in its end line and `_summary.json`."""
    try:
        listing = list_input_files(spec, storage_options, extensions)
    except InputNotFound as exc:
        raise InputError(str(exc)) from None
    except FileNotFoundError as exc:  # gone while being listed
        raise InputError(f"{spec} does not exist ({exc})") from None
    except ValueError as exc:
        raise InputError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - a listing failure of any kind is the input's problem, said plainly
        if not isinstance(exc, OSError) and not type(exc).__module__.startswith(_LISTING_MODULES):
            raise
        raise InputError(f"cannot list {spec}: {type(exc).__name__}: {exc}") from None
    if not listing.files and not allow_empty:
        names = listing.skipped_names
        found = (f" (found: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}; is --input-format right?)"
                 if names else " (it holds no files)")
        raise InputError(f"no {what} found at {spec if is_pattern(spec) else listing.root.uri}{found}")
    if listing.skipped:
        logger.warning("input %s: %s - not %s (names starting with _ or . are bookkeeping, skipped silently)",
                       spec, skipped_files_text(listing.skipped_names), what)
    return listing


def _sniff(head: bytes) -> str | None:
    """What a file looks like from its first bytes, for "wrong --input-format?" hints."""
    if head[:4] == b"PAR1":
        return "a Parquet file (--input-format parquet)"
    if head[257:262] == b"ustar":
        return "a tar archive (--input-format webdataset)"
    if (head[:3] == b"\xff\xd8\xff" or head[:8] == b"\x89PNG\r\n\x1a\n" or head[:6] in (b"GIF87a", b"GIF89a")
            or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")):
        return "an image (--input-format images)"
    return None


def not_a(location: Location, path: str, expected: str, input_format: str, exc: BaseException | None) -> InputError:
    """The InputError for a file that is not what --input-format says: names the file, what was expected, why,
    and what it looks like instead."""
    try:
        with location.fs.open(path, "rb") as fh:
            looks = _sniff(fh.read(512))
    except OSError:
        looks = None
    # the last line is the telling one (tarfile lists each compression it tried, the plain tar attempt last)
    lines = [line.strip(" -") for line in str(exc).splitlines() if line.strip(" -")] if exc is not None else []
    why = f" ({type(exc).__name__}: {lines[-1] if lines else ''})" if exc is not None else ""
    hint = f"; it looks like {looks}" if looks else ""
    return InputError(f"{location.uri_of(path)}: not {expected}, which --input-format {input_format} expects"
                      f"{why}{hint}")


# ---- ids -----------------------------------------------------------------------------------------------------------
def check_unique_keys(keys: pa.Array, what: str) -> None:
    if len(keys) == 0:
        return
    nulls = keys.null_count
    if nulls:
        raise InputError(f"{nulls} rows have no id ({what}): every row needs one")
    empty = pc.sum(pc.equal(pc.utf8_length(keys), 0)).as_py() or 0
    if empty:
        raise InputError(f"{empty} rows have an empty id ({what}): ids must be non-empty")
    counts = pc.value_counts(keys)
    dup = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1)).to_pylist()
    if dup:
        raise InputError(f"{len(dup)} ids occur more than once ({what}): {sample_text(sorted(dup))}. "
                         "Ids must be unique.")


def id_to_key(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The one conversion from an id column to `key` (used by the plan and by the reader, so they agree)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if pa.types.is_string(values.type):
        return values
    return pc.cast(values, pa.string())
