"""Caption (or ask a question about) every image of a corpus with VisCPM-Chat on Ray.

    python jobs/caption.py --input s3://bucket/shards/ --input-format webdataset --output s3://bucket/captions/ \
        --model s3://bucket/models/viscpm-chat --num-workers 4 --batch-size 16
    python jobs/caption.py --config job.yaml --max-new-tokens 32          # flags override the YAML file
    ray job submit --address http://head:8265 --working-dir . -- python jobs/caption.py ...

Ray: joins the cluster named by --ray-address / RAY_ADDRESS (as under `ray job submit`), or a running local
`ray start` cluster, or starts a local Ray; --num-cpus/--num-gpus always start a fresh local Ray with those
resources. S3 settings come from the standard AWS_* environment variables (or --storage-options).

Exit status: 0 done and reconciled; 1 failed (reconciliation found missing/duplicated ids, or an error while
running); 2 refused before any work (bad config, bad input, --output holding another job).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

try:
    import pipelines  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .` (e.g. a `ray job submit` working dir)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines import CaptionJobConfig, InputError, OutputConflictError, run_caption_job  # noqa: E402
from pipelines.config import add_config_arguments, config_from_args  # noqa: E402

logger = logging.getLogger("jobs.caption")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    add_config_arguments(parser)
    return parser.parse_args(argv)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """--config, the Ray flags, --log-level, --progress-bars (shared with jobs/paint.py)."""
    parser.add_argument("--config", help="YAML file of options (same names as the flags, with _ or -); flags "
                                         "given on the command line override it")
    ray_group = parser.add_argument_group("ray")
    ray_group.add_argument("--ray-address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, a local "
                                                               "`ray start` cluster, or a new local Ray)")
    ray_group.add_argument("--num-cpus", type=float, default=None, help="start a local Ray with this many CPUs")
    ray_group.add_argument("--num-gpus", type=float, default=None, help="start a local Ray with this many GPUs")
    ray_group.add_argument("--object-store-memory", type=int, default=None, help="local Ray object store bytes")
    parser.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"))
    parser.add_argument("--progress-bars", action=argparse.BooleanOptionalAction, default=True,
                        help="Ray Data's progress bars (rows per stage)")


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def init_ray(args: argparse.Namespace) -> None:
    import ray

    kwargs: dict = {"include_dashboard": False} if (args.num_cpus is not None or args.num_gpus is not None) else {}
    if kwargs:
        kwargs.update(address="local", num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                      object_store_memory=args.object_store_memory)
    elif args.ray_address:
        kwargs["address"] = args.ray_address
    ray.init(**kwargs)


def start_ray(args: argparse.Namespace) -> None:
    init_ray(args)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = args.progress_bars
    # Ray Data configures its loggers when it is imported; quiet its per-execution INFO lines after that
    logging.getLogger("ray.data").setLevel(max(logging.WARNING, logging.getLogger().level))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level)
    try:
        config: CaptionJobConfig = config_from_args(args, args.config).validate()
    except (ValueError, OSError) as exc:
        logger.error("%s", exc)
        return 2
    start_ray(args)
    try:
        result = run_caption_job(config)
    except (InputError, OutputConflictError) as exc:
        logger.error("refused: %s", exc)
        return 2
    logger.info("%s", result.one_line())
    if not result.succeeded:
        for problem in result.reconciliation.problems():
            logger.error("%s", problem)
        logger.error("rerun the same command to complete the missing ids (details in %s/_summary.json)",
                     result.output)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
