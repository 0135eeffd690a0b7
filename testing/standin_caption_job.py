"""`jobs/caption.py` with the sleeping stand-in model ($STANDIN_SECONDS per model call, default 0.2) instead of
`--model`: for tests that need a job slow enough to kill mid-run. Takes the same flags."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "jobs")]

from jobcli import main  # noqa: E402

from pipelines import CaptionJobConfig, run_caption_job  # noqa: E402
from testing.standins import sleeping_caption_stage  # noqa: E402

if __name__ == "__main__":
    stage = sleeping_caption_stage(float(os.environ.get("STANDIN_SECONDS", "0.2")))
    sys.exit(main(None, CaptionJobConfig, functools.partial(run_caption_job, model_stage=stage), __doc__,
                  job="caption"))
