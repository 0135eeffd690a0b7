"""The stage contract and how stages are applied.

* A stage is a plain callable on `pyarrow.Table` batches (tests call it directly) that declares the columns it needs
  (with a description) and checks them on every batch, failing with a message that names the stage, the missing
  columns and the columns it got.
* A row that fails in a stage carries `error_message = "<stage>: <ExceptionType>: <message>"` (`error_text`).
* A job's pipeline is a list of `StageSpec`s (what to run, with which constructor arguments and resources) applied to
  a Dataset by one loop, `apply_stages` - as `ray.data.llm`'s processors apply their stage specs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from . import columns as C

MAX_ERROR_CHARS = 500
SAMPLE = 10  # how many ids a message lists


class StageInputError(ValueError):
    """A stage got a batch without the columns it declares."""


@dataclass(frozen=True)
class Column:
    name: str
    description: str


class Stage:
    """Base for the pipeline's stages."""

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


def error_text(stage: str, exc: BaseException) -> str:
    """An error row's message: `<stage>: <ExceptionType>: <message>`, cut to MAX_ERROR_CHARS."""
    text = f"{stage}: {type(exc).__name__}: {exc}"
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def sample_text(values: Sequence[str]) -> str:
    """Up to SAMPLE values for a message, with the total when there are more."""
    shown = ", ".join(repr(v) for v in values[:SAMPLE])
    return shown + (f", ... ({len(values)} in all)" if len(values) > SAMPLE else "")


class KeyFilter(Stage):
    """Keeps the rows whose key is in (keep=True) / not in (keep=False) a key set shipped once via the object store;
    resume uses it to skip finished ids."""

    name = "resume-filter"
    requires = (Column(C.KEY, "row id"),)

    def __init__(self, keys_ref: Any, keep: bool) -> None:
        self.keys_ref, self.keep = keys_ref, keep
        self._keys: pa.Array | None = None

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.check(batch)
        if self._keys is None:
            import ray

            self._keys = ray.get(self.keys_ref) if isinstance(self.keys_ref, ray.ObjectRef) else self.keys_ref
        mask = pc.is_in(batch.column(C.KEY), value_set=self._keys)
        return batch.filter(mask if self.keep else pc.invert(mask))


@dataclass
class StageSpec:
    """One step of a job's pipeline. `fn`: a Stage instance (run as tasks) or a Stage class (run by a fixed actor
    pool of `actors` replicas, built with `constructor_kwargs`); `batch_size` None: whole blocks;
    `rows_per_block`: repartition into blocks of that many rows first (Ray hands an actor whole blocks);
    `calls_per_actor`: batches an actor works on at once (threads; a ModelStage serialises the device part)."""

    fn: Any
    batch_size: int | None = None
    num_cpus: float | None = None
    num_gpus: float | None = None
    actors: int | None = None
    constructor_kwargs: Mapping[str, Any] = field(default_factory=dict)
    rows_per_block: int | None = None
    ray_remote_args: Mapping[str, Any] = field(default_factory=dict)
    calls_per_actor: int = 1


def apply_stages(ds: Any, specs: Sequence[StageSpec]) -> Any:
    """The lazy Dataset `ds` with each spec applied in order (`map_batches` on Arrow batches)."""
    from ray.data import ActorPoolStrategy

    for spec in specs:
        if spec.rows_per_block:
            ds = ds.repartition(target_num_rows_per_block=spec.rows_per_block)
        kwargs: dict[str, Any] = {"batch_format": "pyarrow", "batch_size": spec.batch_size, **spec.ray_remote_args}
        if spec.num_cpus is not None:
            kwargs["num_cpus"] = spec.num_cpus
        if spec.num_gpus:
            kwargs["num_gpus"] = spec.num_gpus
        if spec.actors is not None:
            # more than one call: Ray runs them in threads of the actor (true multi-threading, or it would run one
            # UDF at a time and only overlap the batching around it)
            threaded = spec.calls_per_actor > 1
            kwargs["compute"] = ActorPoolStrategy(size=spec.actors, max_concurrent_calls_per_actor=spec.calls_per_actor,
                                                  enable_true_multi_threading=threaded)
            kwargs["fn_constructor_kwargs"] = dict(spec.constructor_kwargs)
        ds = ds.map_batches(spec.fn, **kwargs)
    return ds
