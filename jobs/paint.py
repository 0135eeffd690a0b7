r"""Render prompt lists into images with VisCPM-Paint on Ray: images + metadata to WebDataset shards or Parquet.

    python jobs/paint.py --input prompts.txt --output s3://bucket/renders/ --model s3://bucket/models/viscpm-paint \
        --images-per-prompt 4 --steps 20 --scheduler dpmsolver --size 512 --seed 1 --num-workers 4 --report
    python jobs/paint.py --config render.yaml --steps 30            # flags override the YAML file

Inputs: .txt (one prompt per line), .jsonl, .csv, .parquet (`--prompt-column`; optional key, negative_prompt, seed
columns), local or s3:// (S3 via the standard AWS_* environment variables). Ray, exit status (listed at the end
of --help) and resume work as in jobs/caption.py (`jobs/jobcli.py`); see pipelines/paint/job.py for the design and
pipelines/paint/schema.py for the output fields.
"""

from __future__ import annotations

import sys

from jobcli import main as run_cli  # jobs/jobcli.py; it also makes `pipelines` importable from a bare checkout

from pipelines import PaintJobConfig, run_paint_job  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_cli(argv, PaintJobConfig, run_paint_job, __doc__, job="paint")


if __name__ == "__main__":
    sys.exit(main())
