"""`--incremental` benchmark: prints measured numbers from one machine.

1. no-op - the time of an incremental run with nothing new over N WebDataset shards on S3 (a moto server on
   loopback): one listing + the manifest, no shard opened. Against it: what every normal rerun does first, a full
   listing + a read of every shard's tar headers (`plan_input`).
2. throughput - rows/s of an incremental run (one pipeline per input file) against a normal run over the same
   shards (one pipeline for all), with the stand-in caption model sleeping a fixed time per call (an emulated
   accelerator), whole job call including Ray's actor start(s).

    python benchmarks/incremental.py --shards 1000                  # no-op
    python benchmarks/incremental.py --only throughput --tput-shards 8 --rows-per-shard 200
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]
os.environ.update({"RAY_AUTH_MODE": "disabled", "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_USAGE_STATS_ENABLED": "0"})


def tar_of(keys: list[str], payload: bytes) -> bytes:
    sink = io.BytesIO()
    with tarfile.open(fileobj=sink, mode="w") as tar:
        for k in keys:
            info = tarfile.TarInfo(f"{k}.jpg")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return sink.getvalue()


def noop(shards: int, samples: int) -> dict:
    from moto.server import ThreadedMotoServer
    import s3fs

    from pipelines import CaptionJobConfig, run_caption_job
    from pipelines.caption.readers import plan_input
    from pipelines.core.output.manifest import Manifest, source_identity
    from pipelines.core.storage import list_input_files, locate, relative_key

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    endpoint = f"http://127.0.0.1:{server._server.server_port}"
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="x", secret="x")
    fs.mkdir("bench")
    payload = b"\xff\xd8\xff" + b"0" * 2000
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: fs.pipe_file(f"bench/in/shard-{i:05d}.tar",
                                             tar_of([f"s{i}-{j}" for j in range(samples)], payload)), range(shards)))
    config = CaptionJobConfig(input="s3://bench/in/", input_format="webdataset", output="s3://bench/out",
                              incremental=True)
    # the manifest a finished first run leaves: every shard done (written directly - running 1,000 pipelines to
    # get there would measure nothing more)
    listing = list_input_files(config.input, None, ["tar"])
    root, infos = listing.root.path, listing.files
    manifest = Manifest(locate(config.output))
    for path, info in infos.items():
        rel = relative_key(root, path)
        manifest.entries[rel] = {**source_identity(info), "rows": samples, "statuses": {"ok": samples},
                                 "outputs": [rel.replace(".tar", ".parquet")], "run": 1}
    manifest.compact(1)
    out = locate(config.output)
    out.child("_incremental.json").write_bytes_atomic(json.dumps(
        {"version": 1, "job": "caption", "fingerprint": json.loads(json.dumps(config.fingerprint(), sort_keys=True,
                                                                                default=str)),
         "last_run": 1}).encode())
    times, scans = [], []
    for _ in range(3):
        t = time.perf_counter()
        result = run_caption_job(config)
        times.append(time.perf_counter() - t)
        assert result.succeeded and result.files["unchanged"] == shards and result.processed == 0, result.one_line()
        plain = CaptionJobConfig(input="s3://bench/in/", input_format="webdataset", output="s3://bench/o2")
        t = time.perf_counter()
        plan = plan_input(plain)
        scans.append(time.perf_counter() - t)
        assert len(plan.keys) == shards * samples
    server.stop()
    return {"shards": shards, "samples_per_shard": samples, "noop_run_s": [round(x, 3) for x in times],
            "listing_plus_header_scan_s": [round(x, 3) for x in scans]}


def throughput(shards: int, rows: int, sleep_s: float, batch: int) -> dict:
    import ray

    sys.path.insert(0, str(REPO / "tests"))
    from pipeline_fixtures import jpeg, write_webdataset_shards
    from pipelines import CaptionJobConfig, run_caption_job
    from testing.standins import sleeping_caption_stage

    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=1 << 30, log_to_driver=False)
    tmp = Path(tempfile.mkdtemp(prefix="incr-bench-"))
    samples = [{"__key__": f"s{i:06d}", "jpg": jpeg((64, 48))} for i in range(shards * rows)]
    write_webdataset_shards(tmp / "in", samples, rows)
    common = dict(input=str(tmp / "in"), input_format="webdataset", num_gpus_per_worker=0, batch_size=batch,
                  decode_batch_size=batch, rows_per_file=1000)
    stage = sleeping_caption_stage(sleep_s)
    out = {}
    for name, extra in (("normal", {}), ("incremental", {"incremental": True})):
        config = CaptionJobConfig(output=str(tmp / f"out-{name}"), **common, **extra)
        t = time.perf_counter()
        result = run_caption_job(config, model_stage=stage)
        seconds = time.perf_counter() - t
        assert result.succeeded and result.processed == shards * rows
        out[name] = {"seconds": round(seconds, 2), "rows_per_s": round(shards * rows / seconds, 1)}
    out["incremental_vs_normal"] = round(out["incremental"]["rows_per_s"] / out["normal"]["rows_per_s"], 3)
    out.update(shards=shards, rows_per_shard=rows, model_sleep_s_per_batch=sleep_s, batch=batch)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["noop", "throughput"])
    parser.add_argument("--shards", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--tput-shards", type=int, default=8)
    parser.add_argument("--rows-per-shard", type=int, default=200)
    parser.add_argument("--sleep-s", type=float, default=0.05)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    import logging

    logging.basicConfig(level="WARNING")
    if args.only in (None, "noop"):
        print(json.dumps({"noop": noop(args.shards, args.samples)}))
    if args.only in (None, "throughput"):
        print(json.dumps({"throughput": throughput(args.tput_shards, args.rows_per_shard, args.sleep_s,
                                                   args.batch)}))


if __name__ == "__main__":
    main()
