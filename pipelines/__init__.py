"""Ray Data pipelines for VisCPM. Imports go one way: `jobs` -> `pipelines` -> `viscpm`.

    from pipelines import CaptionJobConfig, run_caption_job
    result = run_caption_job(CaptionJobConfig(input="s3://bucket/images/", input_format="images",
                                              output="s3://bucket/captions/", model="s3://bucket/models/chat"))
    result.succeeded, result.one_line()

Rooms: `core/` (what both jobs share), `caption/` and `paint/` (one job each; they never import each other).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Lazy exports: a Ray worker that unpickles one stage imports only that stage's modules - a write task never pays
# for torch (~200 MB less per worker process).
_EXPORTS = {
    "CaptionJobConfig": "caption.config", "CaptionJobResult": "caption.job", "run_caption_job": "caption.job",
    "PaintJobConfig": "paint.config", "PaintJobResult": "paint.job", "run_paint_job": "paint.job",
    "JobResult": "core.runner", "InputError": "core.inputs", "OutputConflictError": "core.output",
    "ClusterResourcesError": "core.runner", "JobFailed": "core.runner",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # static names for type checkers and IDEs
    from .caption.config import CaptionJobConfig  # noqa: F401
    from .caption.job import CaptionJobResult, run_caption_job  # noqa: F401
    from .core.inputs import InputError  # noqa: F401
    from .core.output import OutputConflictError  # noqa: F401
    from .core.runner import ClusterResourcesError, JobFailed, JobResult  # noqa: F401
    from .paint.config import PaintJobConfig  # noqa: F401
    from .paint.job import PaintJobResult, run_paint_job  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
