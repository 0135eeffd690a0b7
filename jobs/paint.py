"""Render prompt lists into images with VisCPM-Paint on Ray: images + metadata to WebDataset shards or Parquet.

    python jobs/paint.py --input prompts.txt --output s3://bucket/renders/ --model s3://bucket/models/viscpm-paint \
        --images-per-prompt 4 --steps 20 --scheduler dpmsolver --size 512 --seed 1 --num-workers 4 --report
    python jobs/paint.py --config render.yaml --steps 30            # flags override the YAML file

Inputs: .txt (one prompt per line), .jsonl, .csv, .parquet (`--prompt-column`; optional key, negative_prompt, seed
columns), local or s3:// (S3 via the standard AWS_* environment variables). Ray, exit status (0 done and
reconciled, 1 failed, 2 refused before any work) and resume work as in jobs/caption.py; see
pipelines/paint_job.py for the design and pipelines/paint_schema.py for the output fields.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # jobs/caption.py: the shared CLI plumbing
try:
    import pipelines  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .` (e.g. a `ray job submit` working dir)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from caption import add_common_arguments, configure_logging, start_ray  # noqa: E402

from pipelines import InputError, OutputConflictError  # noqa: E402
from pipelines.config import add_config_arguments, config_from_args  # noqa: E402
from pipelines.paint_job import PaintJobConfig, run_paint_job  # noqa: E402

logger = logging.getLogger("jobs.paint")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    add_config_arguments(parser, PaintJobConfig)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level)
    try:
        config: PaintJobConfig = config_from_args(args, args.config, PaintJobConfig).validate()
    except (ValueError, OSError) as exc:
        logger.error("%s", exc)
        return 2
    start_ray(args)
    try:
        result = run_paint_job(config)
    except (InputError, OutputConflictError) as exc:
        logger.error("refused: %s", exc)
        return 2
    logger.info("%s", result.one_line())
    if result.report:
        logger.info("contact sheet: %s", result.report)
    if not result.succeeded:
        for problem in result.reconciliation.problems():
            logger.error("%s", problem)
        logger.error("rerun the same command to complete the missing images (details in %s/_summary.json)",
                     result.output)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
