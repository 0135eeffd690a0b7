"""Shared fixtures and helpers of the pipeline tests (import with `from pipeline_fixtures import *`).

* `ray_session`: ONE local Ray per pytest session (2 CPUs, 2 fake GPUs, 1 GiB object store), reused if some other
  fixture already started one.
* `s3`: a moto S3 server on 127.0.0.1. It starts AFTER Ray on purpose and sets the AWS_* variables only in this
  process: Ray's workers never see them, so a passing S3 test shows that the pipeline itself carries the settings
  to the workers.
* bad-image and WebDataset helpers.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

QUIET_ENV = {
    "RAY_AUTH_MODE": "disabled",  # Ray 2.60 turns token auth on by default
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    # metrics reported every second: a job on a joined cluster lingers one interval for its last-success gauge
    "RAY_metrics_report_interval_ms": "1000",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_session():
    import logging

    import ray

    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    started = False
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, object_store_memory=1 << 30,
                 log_to_driver=False)
        started = True
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_no_progress_timeout_s = 120
    ctx.wait_for_min_actors_s = 120
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    yield ray
    if started:
        ray.shutdown()


class S3Server:
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.endpoint, key="testing", secret="testing", skip_instance_cache=True)


@pytest.fixture(scope="session")
def s3(ray_session):
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    s3server = S3Server(f"http://127.0.0.1:{port}")
    saved = {k: os.environ.get(k) for k in s3server.env}
    os.environ.update(s3server.env)
    yield s3server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


# ---- images ----------------------------------------------------------------------------------------------------
def jpeg(size=(64, 48), colour=(200, 30, 30), mode="RGB", **kw) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, "JPEG", **kw)
    return buf.getvalue()


def png(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", **kw)
    return buf.getvalue()


def png_with_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression bomb: Pillow refuses it at open)."""
    data = bytearray(png(Image.new("L", (1, 1))))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    start = 8 + 8  # signature, then length + b"IHDR"
    data[start:start + 13] = ihdr
    data[start + 13:start + 17] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


def animated_gif() -> bytes:
    frames = [Image.new("P", (16, 16), i * 40) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def exif_rotated_jpeg() -> bytes:
    """40x20 pixels stored, EXIF orientation 6 (rotate 90 CW): shown as 20x40."""
    image = Image.new("RGB", (40, 20), (10, 200, 10))
    exif = image.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    image.save(buf, "JPEG", exif=exif)
    return buf.getvalue()


def bad_and_odd_images() -> dict[str, tuple[bytes | None, str | None]]:
    """id -> (image bytes, expected error substring or None when the row must be ok)."""
    good = jpeg()
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([255, 0, 0] * 256)
    return {
        "ok-jpeg": (good, None),
        "truncated": (good[: len(good) // 2], "truncated"),
        "zero-bytes": (b"", "empty"),
        "random-bytes": (os.urandom(300), "not an image"),
        "png-bomb": (png_with_size(50_000, 50_000), "DecompressionBomb"),
        "png-bomb-warning-range": (png_with_size(10_000, 10_000), "DecompressionBomb"),
        "null": (None, "null"),
        "cmyk": (jpeg(mode="CMYK", colour=(0, 255, 255, 0)), None),
        "16-bit": (png(Image.new("I;16", (20, 10), 40000)), None),
        "animated-gif": (animated_gif(), None),
        "palette-alpha": (png(palette, transparency=0), None),
        "grayscale": (png(Image.new("L", (12, 12), 128)), None),
        "exif-rotated": (exif_rotated_jpeg(), None),
    }


def images_table(items: dict[str, tuple[bytes | None, str | None]]) -> pa.Table:
    return pa.table({"id": list(items), "image": pa.array([v[0] for v in items.values()], pa.binary())})


def write_webdataset_shards(folder: Path, samples: list[dict], per_shard: int) -> list[Path]:
    """Shards written with the `webdataset` library (samples: dicts with __key__ and member suffixes)."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, start in enumerate(range(0, len(samples), per_shard)):
        path = folder / f"shard-{s:05d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for sample in samples[start:start + per_shard]:
                sink.write(sample)
        paths.append(path)
    return paths


def read_webdataset_output(paths: list[str | Path]) -> list[dict]:
    """Our WebDataset output read back with the `webdataset` library."""
    import webdataset as wds

    return list(wds.WebDataset([str(p) for p in paths], shardshuffle=False).decode())


def tar_member_names(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.getnames()


def job_env(**extra: str) -> dict[str, str]:
    """Environment of a job subprocess: quiet Ray, repo importable."""
    env = {**os.environ, **QUIET_ENV, **extra}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    env.pop("RAY_ADDRESS", None)
    return env


__all__ = [
    "PYTHON", "QUIET_ENV", "REPO_ROOT", "S3Server", "animated_gif", "bad_and_odd_images", "exif_rotated_jpeg",
    "free_port", "images_table", "jpeg", "job_env", "png", "png_with_size", "ray_session", "read_webdataset_output",
    "s3", "tar_member_names", "write_webdataset_shards",
]


def wait_gone(proc: subprocess.Popen, timeout: float) -> None:
    """Wait until every process of `proc`'s session (started by us with start_new_session) has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True).stdout.split()
        if not alive:
            return
        time.sleep(0.5)
    for pid in subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True).stdout.split():
        os.kill(int(pid), signal.SIGKILL)  # leftovers of the Ray this test's driver started


def kill_driver_mid_run(command: list[str], out: Path, cwd: Path, checkpoints: int = 2,
                        timeout: float = 120) -> None:
    """Run a job command and SIGKILL its driver (only) once `checkpoints` data files are checkpointed in `out`,
    then wait for what the driver left (Ray's agents outlive it) to exit or kill it."""
    proc = subprocess.Popen(command, env=job_env(), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            done = list((out / "_checkpoint").glob("*.parquet")) if (out / "_checkpoint").exists() else []
            if len(done) >= checkpoints:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the job ended before it could be killed:\n" + proc.stdout.read().decode()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        wait_gone(proc, timeout=10)


def wait_for_dashboard(url: str, head: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert head.poll() is None, "ray start --head exited:\n" + log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError("the head's dashboard did not come up:\n" + log.read_text()[-3000:])


@contextlib.contextmanager
def ray_head(log: Path, env: dict[str, str], num_cpus: int = 2, extra_args: tuple[str, ...] = ()):
    """A `ray start --head` on loopback (no GPUs), stopped by PID afterwards; yields (GCS address, dashboard URL).
    `extra_args`: more `ray start` flags (e.g. `--metrics-export-port=P`)."""
    import shutil
    import tempfile

    port, dashboard, client, agent = free_port(), free_port(), free_port(), free_port()
    ray_bin = str(Path(PYTHON).parent / "ray")
    temp_dir = tempfile.mkdtemp(prefix="rh-", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    head = subprocess.Popen([ray_bin, "start", "--head", f"--port={port}", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
                             f"--dashboard-agent-listen-port={agent}", f"--num-cpus={num_cpus}", "--num-gpus=0",
                             f"--temp-dir={temp_dir}", "--block", *extra_args],
                            env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{dashboard}"
        wait_for_dashboard(url, head, log)
        yield f"127.0.0.1:{port}", url
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        wait_gone(head, timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)
