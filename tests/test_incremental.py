"""`--incremental` on real parts: the session's local Ray, moto S3 on loopback behind a fault-injecting proxy that
records every request, WebDataset shards written with the `webdataset` library, prompt files for the paint job.

In-process runs use the stand-in caption model (the model does not matter here) and the tiny paint model."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline_fixtures import jpeg, write_webdataset_shards
from pipelines import CaptionJobConfig, PaintJobConfig, run_caption_job, run_paint_job
from s3_proxy import Faults, S3Proxy
from testing.standins import sleeping_caption_stage

FAST = {"batch_size": 4, "rows_per_file": 4, "decode_batch_size": 4, "num_gpus_per_worker": 0,
        "actor_start_timeout_s": 120, "no_progress_timeout_s": 120}


def shard_bytes(tmp: Path, name: str, keys: list[str], bad: set[str] = frozenset()) -> bytes:
    """One WebDataset shard (written by the `webdataset` library); keys in `bad` get undecodable image bytes."""
    samples = [{"__key__": k, "jpg": b"not a jpeg" if k in bad else jpeg((24, 16))} for k in keys]
    path = write_webdataset_shards(tmp / name, samples, per_shard=len(samples) or 1)[0]
    return path.read_bytes()


def output_keys(fs, prefix: str) -> dict[str, list[str]]:
    """{output file name: its keys} of the data files under an S3 output prefix."""
    out = {}
    fs.invalidate_cache()  # this test's s3fs instance lists again what the job changed
    for path in sorted(fs.find(prefix)):
        name = path[len(prefix) + 1:]
        if not name.startswith("_") and name.endswith(".parquet"):
            out[name] = pq.read_table(io.BytesIO(fs.cat_file(path)))["key"].to_pylist()
    return out


def test_growing_s3_prefix_through_a_faulty_proxy(ray_session, s3, tmp_path):
    """Run 1 over 4 shards; 2 new shards + a bad one (only the new ones read, old outputs untouched, the bad one
    refused by name); a no-op run; a replaced shard; --retry-errors; a deleted shard kept, then pruned. Every S3
    request goes through a proxy that fails 10% of them (503 SlowDown or a connection reset): nothing is lost or
    duplicated."""
    bucket = s3.bucket("grow-bucket")
    fs = s3.fs()
    shard = {i: [f"s{i}-{j:03d}" for j in range(5)] for i in range(7)}

    def put_shard(i: int, keys: list[str], bad: set[str] = frozenset(), name: str | None = None) -> None:
        fs.pipe_file(f"{bucket}/in/{name or f'shard-{i:05d}.tar'}", shard_bytes(tmp_path / f"w{i}-{len(keys)}", "s",
                                                                               keys, bad))

    for i in range(4):
        put_shard(i, shard[i], bad={"s2-004"})
    with S3Proxy(s3.endpoint, Faults(share=0.1, seed=7)) as proxy:
        config = CaptionJobConfig(input=f"s3://{bucket}/in/", input_format="webdataset", output=f"s3://{bucket}/out",
                                  incremental=True, storage_options={"endpoint_url": proxy.endpoint}, **FAST)
        stage = sleeping_caption_stage(0)

        def run(**changes):
            proxy.clear()
            import dataclasses

            return run_caption_job(dataclasses.replace(config, **changes), model_stage=stage)

        first = run()
        assert first.succeeded and first.files["new"] == 4 and first.statuses == {"ok": 19, "error": 1}
        assert any(status in (503, -1) for _, _, status in proxy.log) or len(proxy.log) < 30  # faults did happen
        outputs = output_keys(fs, f"{bucket}/out")
        assert outputs == {f"shard-{i:05d}-0000{p}.parquet": shard[i][4 * p:4 * p + 4] for i in range(4) for p in (0, 1)}

        # 2 new shards and one whose ids repeat: only the new ones are opened; the bad one is refused by name
        put_shard(4, shard[4])
        put_shard(5, shard[5])
        put_shard(6, ["dup", "x", "dup"], name="shard-00006-bad.tar")
        second = run()
        read = {p.rsplit("/", 1)[-1] for m, p, _ in proxy.log if m in ("GET", "HEAD") and "/in/" in p}
        assert read == {"shard-00004.tar", "shard-00005.tar", "shard-00006-bad.tar"}, read
        written = {p for m, p, _ in proxy.log if m in ("PUT", "POST", "DELETE") and "/out/shard-0000" in p
                   and not p.rsplit("/", 1)[-1].startswith("_")}
        assert all(("shard-00004" in p or "shard-00005" in p) for p in written), written  # old outputs untouched
        assert not second.succeeded and [r["path"] for r in second.refused] == ["shard-00006-bad.tar"]
        assert "occurs twice" in second.refused[0]["reason"] and second.files["done"] == 2
        fs.rm_file(f"{bucket}/in/shard-00006-bad.tar")

        # nothing new: one listing + the manifest, no shard read, no data written
        noop = run()
        assert noop.succeeded and noop.files["new"] == noop.files["changed"] == 0 and noop.processed == 0
        assert not [r for r in proxy.log if "/in/shard" in r[1]]
        assert not [r for r in proxy.log if r[0] in ("PUT", "POST") and "/out/shard" in r[1]]

        # a replaced shard: only it is read again, and its output holds exactly the new keys
        new_keys = [f"s1-new-{j}" for j in range(3)]
        put_shard(1, new_keys)
        replaced = run()
        assert replaced.succeeded and replaced.files["changed"] == 1 and replaced.processed == 3
        assert {p.rsplit("/", 1)[-1] for m, p, _ in proxy.log if m == "GET" and "/in/shard" in p} == {"shard-00001.tar"}
        outputs = output_keys(fs, f"{bucket}/out")
        assert outputs["shard-00001.parquet"] == new_keys
        assert not any(n.startswith("shard-00001-") for n in outputs)  # the old parts are gone

        # --retry-errors: only the error row of shard 2 is processed again; one row per id
        retried = run(retry_errors=True)
        assert retried.succeeded and retried.processed == 1 and retried.files["retried"] == 1
        assert sorted(k for keys in output_keys(fs, f"{bucket}/out").values() for k in keys) == sorted(
            shard[0] + new_keys + shard[2] + shard[3] + shard[4] + shard[5])

        # a deleted shard: exit 0, its output kept and reported; --prune deletes it
        fs.rm_file(f"{bucket}/in/shard-00003.tar")
        kept = run()
        assert kept.succeeded and kept.removed == ["shard-00003.tar"] and "shard-00003-00000.parquet" in \
            output_keys(fs, f"{bucket}/out")
        pruned = run(prune=True)
        assert pruned.succeeded and pruned.files["pruned"] == 1
        assert not any(n.startswith("shard-00003") for n in output_keys(fs, f"{bucket}/out"))
    fs.invalidate_cache()
    summary = json.loads(fs.cat_file(f"{bucket}/out/_summary.json"))
    assert summary["files"]["removed"] == 1 and summary["files"]["unchanged"] == 5 and summary["succeeded"]
    assert json.loads(fs.cat_file(f"{bucket}/out/_last_success.json"))["run"] == summary["run"]
    assert not fs.exists(f"{bucket}/out/_lock")


def test_paint_growing_prompt_folder(ray_session, tmp_path, monkeypatch):
    from pipelines.core import metrics

    counted: list[tuple[str, float, dict]] = []  # what the driver records (the scrape test covers the export)
    real_count = metrics.count
    monkeypatch.setattr(metrics, "count", lambda name, value, **tags: (counted.append((name, value, tags)),
                                                                       real_count(name, value, **tags)))
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "a.txt").write_text("a cat\na dog\n", encoding="utf-8")
    (prompts / "b.jsonl").write_text('{"key": "k1", "prompt": "一只猫"}\n', encoding="utf-8")
    out = tmp_path / "out"
    config = PaintJobConfig(input=str(prompts), output=str(out), incremental=True, steps=2, images_per_prompt=2,
                            scheduler="dpmsolver", batch_size=2, num_gpus_per_worker=0, output_format="webdataset",
                            actor_start_timeout_s=120, no_progress_timeout_s=120)
    first = run_paint_job(config)
    assert first.succeeded and first.files["new"] == 2 and first.processed == 6

    def tar_keys(name: str) -> list[str]:
        with tarfile.open(out / name) as tar:
            return sorted({json.loads(tar.extractfile(m).read())["key"] for m in tar if m.name.endswith(".json")})

    assert tar_keys("a.tar") == ["1-0", "1-1", "2-0", "2-1"] and tar_keys("b.tar") == ["k1-0", "k1-1"]
    a_before = (out / "a.tar").stat().st_mtime_ns
    (prompts / "c.csv").write_text("prompt\na bird\n", encoding="utf-8")
    (prompts / "b.jsonl").write_text('{"key": "k2", "prompt": "一只狗"}\n', encoding="utf-8")
    second = run_paint_job(config)
    assert second.succeeded and (second.files["new"], second.files["changed"], second.files["unchanged"]) == (1, 1, 1)
    files = {t["kind"]: v for n, v, t in [c for c in counted if c[0] == metrics.INPUT_FILES][-4:]}
    assert files == {"new": 1, "changed": 1, "unchanged": 1, "removed": 0}
    assert tar_keys("b.tar") == ["k2-0", "k2-1"] and tar_keys("c.tar") == ["1-0", "1-1"]
    assert (out / "a.tar").stat().st_mtime_ns == a_before  # never rewritten
    (prompts / "a.txt").unlink()
    kept = run_paint_job(config)
    assert kept.succeeded and kept.removed == ["a.txt"] and (out / "a.tar").exists() and kept.processed == 0
    import dataclasses

    pruned = run_paint_job(dataclasses.replace(config, prune=True))
    assert pruned.succeeded and not (out / "a.tar").exists()
    manifest = json.loads(sorted((out / "_manifest").glob("snapshot-*.json"))[-1].read_text())["entries"]
    assert sorted(manifest) == ["b.jsonl", "c.csv"] and manifest["c.csv"]["statuses"] == {"ok": 2}
    assert manifest["b.jsonl"]["outputs"] == ["b.tar"] and manifest["b.jsonl"]["rows"] == 2


def test_incremental_refusals_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="--prune applies to --incremental"):
        CaptionJobConfig(input="x", output="y", prune=True).validate()
    with pytest.raises(ValueError, match="not on single image files"):
        CaptionJobConfig(input="x", output="y", incremental=True, input_format="images").validate()


# ---- the lease (no Ray) ---------------------------------------------------------------------------------------------
def test_lease_refuses_a_live_holder_and_takes_over_gone_ones(tmp_path, s3):
    import os
    import subprocess
    import time

    from pipelines.core.lease import Lease, LeaseHeld
    from pipelines.core.storage import locate

    for output in (locate(str(tmp_path / "out")), locate(f"s3://{s3.bucket('lease-bucket')}/out")):
        lock = output.child("_lock")
        first = Lease(output, ttl_s=60, job="caption").acquire()
        doc = json.loads(lock.read_bytes())
        assert doc["pid"] == os.getpid() and doc["token"] == first.token
        # another live process of this host holds it: refused at once, naming the holder
        sleeper = subprocess.Popen(["sleep", "30"])
        try:
            lock.write_bytes_atomic(json.dumps({**doc, "pid": sleeper.pid, "holder": f"x@h:{sleeper.pid}",
                                                "token": "other"}).encode())
            with pytest.raises(LeaseHeld, match=f"in use by another run: x@h:{sleeper.pid}"):
                Lease(output, ttl_s=60).acquire()
        finally:
            sleeper.kill()
            sleeper.wait()
        # ... whose process is gone: taken over at once
        second = Lease(output, ttl_s=60).acquire()
        assert second.took_over["pid"] == sleeper.pid
        second.release()
        assert not lock.exists()
        # another host: alive until its lease expires
        other = {"holder": "u@elsewhere:1", "host": "elsewhere", "pid": 1, "token": "t", "expires": "later",
                 "expires_ts": time.time() + 60}
        lock.write_bytes_atomic(json.dumps(other).encode())
        with pytest.raises(LeaseHeld, match="u@elsewhere:1"):
            Lease(output).acquire()
        lock.write_bytes_atomic(json.dumps({**other, "expires_ts": time.time() - 1}).encode())
        third = Lease(output, ttl_s=0.6).acquire()
        assert third.took_over["host"] == "elsewhere"
        time.sleep(0.5)  # renewed while held
        assert json.loads(lock.read_bytes())["expires_ts"] > time.time() and not third.lost
        third.release()
        first.release()  # no longer ours: leaves the lock alone (there is none)


def test_transient_storage_faults_are_retried_permanent_ones_are_not():
    from pipelines.core.storage import is_transient, with_retries

    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError(5, "SlowDown: Please reduce your request rate.")
        return "ok"

    assert with_retries(flaky, "test") == "ok" and len(calls) == 3
    assert is_transient(ConnectionResetError()) and is_transient(TimeoutError())
    for permanent in (PermissionError("Access Denied"), FileNotFoundError("NoSuchBucket")):
        calls.clear()

        def deny(exc=permanent):
            calls.append(1)
            raise exc

        with pytest.raises(type(permanent)):
            with_retries(deny, "test")
        assert len(calls) == 1
