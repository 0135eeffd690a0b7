"""The command line both jobs share (`jobs/caption.py`, `jobs/paint.py`): flags generated from the job's config
class, `--config job.yaml`, Ray start-up, logging, exit status. Imported by the job scripts as `jobcli` (the
script's own folder is on sys.path when Python runs a script).

Exit status: see EXIT_STATUSES (also printed by --help).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

try:
    import pipelines  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .` (e.g. a `ray job submit` working dir)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.core.config import add_config_arguments, config_from_args  # noqa: E402

EXIT_STATUSES = """\
exit status:
  0    done: every input row is in the output, reconciled (error rows included: they are results)
  1    failed: reconciliation found missing, duplicated or unexpected ids, an --incremental run refused or failed
       an input file, or an error while running (the log says whether rerunning the same command helps)
  2    refused before any work: bad config or input, an --output holding another job or inside --input, GPUs
       the cluster lacks, another run holding --output's lease
  3    stopped on SIGTERM (preemption): what was written is kept, the same command resumes
  130  stopped on Ctrl-C (SIGINT): the same clean stop; a second Ctrl-C exits at once
"""


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """--config, the Ray flags, --log-level, --progress-bars."""
    parser.add_argument("--config", help="YAML file of options (same names as the flags, with _ or -); flags "
                                         "given on the command line override it")
    ray_group = parser.add_argument_group("ray")
    ray_group.add_argument("--ray-address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, a local "
                                                               "`ray start` cluster, or a new local Ray)")
    ray_group.add_argument("--num-cpus", type=float, default=None, help="start a local Ray with this many CPUs")
    ray_group.add_argument("--num-gpus", type=float, default=None, help="start a local Ray with this many GPUs")
    ray_group.add_argument("--object-store-memory", type=int, default=None, help="local Ray object store bytes")
    parser.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"))
    parser.add_argument("--progress-bars", action=argparse.BooleanOptionalAction, default=False,
                        help="Ray Data's per-operator progress bars, in addition to the job's own bar in rows "
                             "(which is shown whenever stderr is a terminal; without one, progress is logged every "
                             "--progress-every-s). Default: off")


def parse_args(argv: list[str] | None, config_type: type, description: str | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description, epilog=EXIT_STATUSES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    add_config_arguments(parser, config_type)
    return parser.parse_args(argv)


# Lines Ray writes on every run that say nothing to act on. The core-worker one is a known Ray Data false alarm
# (ray-project/ray#57733: its map actors take object refs as constructor arguments); it comes from C++, so only a
# filter on this process's stderr file descriptor can drop it.
HARMLESS_STDERR_LINES = (b"has constructor arguments in the object store and max_restarts > 0",)
# Ray's token-authentication notices ("enabled for this cluster", "generated a token") and Ray Data's "progress bars
# disabled" (we disable them on purpose when stderr is not a terminal): informational
QUIET_RAY_LOGGERS = ("ray._private.authentication.authentication_token_setup", "ray.data._internal.progress")


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def filter_stderr(drop: tuple[bytes, ...] = HARMLESS_STDERR_LINES) -> None:
    """Route this process's fd 2 through a thread that drops lines containing any of `drop` (C++ libraries write
    there directly, past Python's logging). Restored at exit, after everything written was passed on."""
    import atexit
    import threading

    read_end, write_end = os.pipe()
    terminal = os.dup(2)
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        with os.fdopen(read_end, "rb", buffering=0) as source:
            for line in iter(source.readline, b""):
                if not any(pattern in line for pattern in drop):
                    os.write(terminal, line)

    thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    thread.start()

    def restore() -> None:
        sys.stderr.flush()
        os.dup2(terminal, 2)  # closes the pipe's last write end: the pump reads to the end and stops
        thread.join(timeout=5)

    atexit.register(restore)


def init_ray(args: argparse.Namespace) -> None:
    """--num-cpus/--num-gpus: a fresh local Ray with those resources; else join --ray-address / RAY_ADDRESS / a
    running local `ray start` cluster, or start a local Ray."""
    import ray

    kwargs: dict = {"include_dashboard": False} if (args.num_cpus is not None or args.num_gpus is not None) else {}
    if kwargs:
        kwargs.update(address="local", num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                      object_store_memory=args.object_store_memory)
    elif args.ray_address:
        kwargs["address"] = args.ray_address
    ray.init(**kwargs)


def start_ray(args: argparse.Namespace) -> None:
    import ray.data  # noqa: F401 - Ray configures its loggers on import: quiet them after that

    for name in QUIET_RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    init_ray(args)
    from pipelines.core import stop

    stop.install()  # again: ray.init replaced the SIGTERM handler with its own (which aborts the driver)
    from ray.data import DataContext

    # the job shows its own bar in rows for the whole run (pipelines.core.progress); Ray's per-operator bars only
    # on request (their carriage returns would clutter a log file)
    DataContext.get_current().enable_progress_bars = bool(args.progress_bars)
    # Ray Data configures its loggers when it is imported; quiet its per-execution INFO lines after that
    logging.getLogger("ray.data").setLevel(max(logging.WARNING, logging.getLogger().level))


def main(argv: list[str] | None, config_type: type, run: Callable[[Any], Any], description: str | None,
         job: str) -> int:
    """Parse flags (+ `--config`), validate, start Ray, run the job; returns the exit status."""
    from pipelines.core import stop

    try:
        return _main(argv, config_type, run, description, job)
    except KeyboardInterrupt:  # Ctrl-C before the stop handler was installed (flags, config, imports)
        logging.getLogger(f"jobs.{job}").warning("interrupted (Ctrl-C) before any work")
        return stop.EXIT_INTERRUPTED


def _main(argv: list[str] | None, config_type: type, run: Callable[[Any], Any], description: str | None,
          job: str) -> int:
    from pipelines import ClusterResourcesError, InputError, JobFailed, OutputConflictError
    from pipelines.core import stop
    from pipelines.core.lease import LeaseHeld

    logger = logging.getLogger(f"jobs.{job}")
    args = parse_args(argv, config_type, description)
    filter_stderr()
    configure_logging(args.log_level)
    try:
        config = config_from_args(args, args.config, config_type).validate()
    except (ValueError, OSError) as exc:
        logger.error("%s", exc)
        return 2
    stop.install()  # SIGTERM / SIGINT: stop taking work, keep what was written, release the lease, exit 3 / 130
    try:
        # Ray starts only after the input, the model folders and the output were checked: a refusal takes seconds
        result = run(config, ray_init=lambda: start_ray(args))
    except (InputError, OutputConflictError, ClusterResourcesError, LeaseHeld) as exc:
        logger.error("refused: %s", exc)
        return 2
    except JobFailed as exc:
        logger.error("failed: %s", exc)
        return 1
    except stop.StopRequested:
        logger.warning("stopped on %s; what was written is kept - rerun the same command to resume",
                       stop.signal_name())
        stop.finished()
        return stop.exit_status()
    logger.info("%s", result.one_line())
    if getattr(result, "report", None):
        logger.info("contact sheet: %s", result.report)
    if getattr(result, "stopped", False):
        logger.warning("stopped on %s; rerun the same command to resume", stop.signal_name())
        stop.finished()
        return stop.exit_status()
    if not result.succeeded:
        problems = result.problems() if hasattr(result, "problems") else result.reconciliation.problems()
        for problem in problems:
            logger.error("%s", problem)
        reconciliation = getattr(result, "reconciliation", None)
        if reconciliation is not None and not reconciliation.rerun_helps:
            logger.error("a rerun will not fix this: the output holds ids the input does not have (did the input "
                         "change since this output was started?). Use another --output, or --overwrite to start "
                         "it again (details in %s/_summary.json)", result.output)
        else:
            logger.error("rerun the same command to complete the missing %s (details in %s/_summary.json)",
                         result.unit, result.output)
        return 1
    return 0
