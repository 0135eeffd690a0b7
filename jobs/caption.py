r"""Caption (or ask a question about) every image of a corpus with VisCPM-Chat on Ray.

    python jobs/caption.py --input s3://bucket/shards/ --input-format webdataset --output s3://bucket/captions/ \
        --model s3://bucket/models/viscpm-chat --num-workers 4 --batch-size 16
    python jobs/caption.py --config job.yaml --max-new-tokens 32          # flags override the YAML file
    ray job submit --address http://head:8265 --working-dir . -- python jobs/caption.py ...

Ray: joins the cluster named by --ray-address / RAY_ADDRESS (as under `ray job submit`), or a running local
`ray start` cluster, or starts a local Ray; --num-cpus/--num-gpus always start a fresh local Ray with those
resources. S3 settings come from the standard AWS_* environment variables (or --storage-options).

Exit status: listed at the end of --help (jobs/jobcli.py).
"""

from __future__ import annotations

import sys

from jobcli import main as run_cli  # jobs/jobcli.py; it also makes `pipelines` importable from a bare checkout

from pipelines import CaptionJobConfig, run_caption_job  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_cli(argv, CaptionJobConfig, run_caption_job, __doc__, job="caption")


if __name__ == "__main__":
    sys.exit(main())
