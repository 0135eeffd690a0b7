"""Ray Data pipelines for VisCPM. Imports go one way: `jobs` -> `pipelines` -> `viscpm`.

    from pipelines import CaptionJobConfig, run_caption_job
    result = run_caption_job(CaptionJobConfig(input="s3://bucket/images/", input_format="images",
                                              output="s3://bucket/captions/", model="s3://bucket/models/chat"))
    result.succeeded, result.one_line()

Stages (each a callable on `pyarrow.Table` batches with declared input columns, usable without Ray):
`NormalizeStage`, `KeyFilter`, `DecodeStage`, `CaptionStage`, `WriteStage`; `build_pipeline` wires them into a lazy
Ray Dataset. The output format and the resume rules are described in `pipelines.schema` and `pipelines.resume`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Lazy exports: a Ray worker that unpickles the write or read stage imports only those modules, not torch (which
# the decode and caption stages need) - ~200 MB less per worker process.
_EXPORTS = {
    "CaptionJobConfig": "config", "CaptionJobResult": "job", "CaptionStage": "captioner", "DecodeError": "decode",
    "DecodeStage": "decode", "InputError": "readers", "KeyFilter": "readers", "NormalizeStage": "readers",
    "OutputConflictError": "resume", "Reconciliation": "resume", "Resources": "runner", "StageInputError": "stages",
    "WriteStage": "writers", "build_pipeline": "job", "decode_image": "decode", "plan_input": "readers",
    "run_caption_job": "job", "PaintJobConfig": "paint_job", "PaintJobResult": "paint_job",
    "run_paint_job": "paint_job", "JobResult": "runner", "ClusterResourcesError": "runner", "JobFailed": "runner",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # static names for type checkers and IDEs
    from .captioner import CaptionStage  # noqa: F401
    from .config import CaptionJobConfig  # noqa: F401
    from .decode import DecodeError, DecodeStage, decode_image  # noqa: F401
    from .job import CaptionJobResult, build_pipeline, run_caption_job  # noqa: F401
    from .paint_job import PaintJobConfig, PaintJobResult, run_paint_job  # noqa: F401
    from .readers import InputError, KeyFilter, NormalizeStage, plan_input  # noqa: F401
    from .resume import OutputConflictError, Reconciliation  # noqa: F401
    from .runner import ClusterResourcesError, JobFailed, JobResult, Resources  # noqa: F401
    from .stages import StageInputError  # noqa: F401
    from .writers import WriteStage  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
