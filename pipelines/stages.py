"""The stage contract: each stage declares the columns it needs (with a description) and checks them on every
batch, failing with a message that names the stage, the missing columns and the columns it got."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa


class StageInputError(ValueError):
    """A stage got a batch without the columns it declares."""


@dataclass(frozen=True)
class Column:
    name: str
    description: str


class Stage:
    """Base for the pipeline's stages (plain callables on `pyarrow.Table` batches, so tests call them directly)."""

    name: str = "stage"
    requires: tuple[Column, ...] = ()
    produces: tuple[Column, ...] = ()

    def check(self, batch: pa.Table) -> None:
        check_columns(self.name, self.requires, batch.column_names)


def check_columns(stage: str, requires: Iterable[Column], available: Iterable[str]) -> None:
    available = list(available)
    missing = [c for c in requires if c.name not in available]
    if missing:
        wanted = "; ".join(f"{c.name!r} ({c.description})" for c in missing)
        raise StageInputError(f"stage {stage!r} is missing input columns: {wanted}. Available columns: {available}")


def describe(stages: Iterable[Stage]) -> str:
    """One line per stage: what it needs and what it adds (for logs and docs)."""
    lines = []
    for stage in stages:
        needs = ", ".join(c.name for c in stage.requires) or "-"
        adds = ", ".join(c.name for c in stage.produces) or "-"
        lines.append(f"{stage.name}: needs [{needs}] -> adds [{adds}]")
    return "\n".join(lines)
