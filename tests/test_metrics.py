"""The jobs' metrics: a caption job submitted with `ray job submit` to a real `ray start --head
--metrics-export-port P` on loopback, its series scraped from Ray's Prometheus endpoint while it runs and after;
the Grafana dashboard and the Prometheus alert rules checked against the names the jobs emit."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline_fixtures import PYTHON, REPO_ROOT, bad_and_odd_images, free_port, job_env, ray_head
from pipelines.core import metrics as M
from testing.standins import STANDIN_TOKENS
from testing.synthetic import synthetic_images_table

DASHBOARD = REPO_ROOT / "infra" / "grafana" / "viscpm-dashboard.json"
ALERTS = REPO_ROOT / "infra" / "prometheus" / "viscpm-alerts.yaml"
METRIC_TOKEN = re.compile(r"\b(?:ray_)?viscpm_[a-z0-9_]+\b")


def scrape(port: int) -> dict[str, dict[tuple, float]]:
    """Our series from Ray's metrics endpoint: exported name -> {sorted labels without Ray's own: value summed over
    the processes (WorkerId) that reported it}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    series: dict[str, dict[tuple, float]] = defaultdict(lambda: defaultdict(float))
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("ray_viscpm_"):
                labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k in ("job", "status", "stage",
                                                                                         "outcome", "le")))
                series[sample.name][labels] += sample.value
    return series


def total(series: dict, name: str, **labels: str) -> float:
    return sum(v for k, v in series.get(name, {}).items() if set(labels.items()) <= set(k))


@pytest.mark.slow
def test_metrics_scraped_from_a_head_while_a_submitted_job_runs(tmp_path):
    bad = {k: v for k, v in bad_and_odd_images().items() if k in ("truncated", "random-bytes", "null", "cmyk")}
    good = synthetic_images_table(36, size=(40, 30))
    table = pa.table({"id": list(bad) + good["id"].to_pylist(),
                      "image": pa.concat_arrays([pa.array([v[0] for v in bad.values()], pa.binary()),
                                                 good["image"].combine_chunks()])})
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=10)
    out = tmp_path / "out"
    port = free_port()
    # report every second instead of every 10 s: the test sees values while the short job runs
    env = job_env(RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0", RAY_metrics_report_interval_ms="1000",
                  STANDIN_SECONDS="0.25")
    env["PATH"] = f"{Path(PYTHON).parent}{os.pathsep}{env['PATH']}"
    ray_bin = str(Path(PYTHON).parent / "ray")
    started = time.time()
    with ray_head(tmp_path / "head.log", env, extra_args=(f"--metrics-export-port={port}",)) as (_, url):
        submit = subprocess.Popen(
            [ray_bin, "job", "submit", "--address", url, "--working-dir", str(REPO_ROOT), "--", PYTHON,
             "testing/standin_caption_job.py", "--input", str(tmp_path / "in.parquet"), "--output", str(out),
             "--batch-size", "2", "--decode-batch-size", "4", "--rows-per-file", "4", "--num-gpus-per-worker", "0",
             "--no-progress-bars", "--actor-start-timeout-s", "120", "--no-progress-timeout-s", "120"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        during: dict = {}
        last_success = todo = 0.0
        deadline = time.monotonic() + 240
        while submit.poll() is None and time.monotonic() < deadline:
            try:
                seen = scrape(port)
            except OSError:
                seen = {}
            if not during and 0 < total(seen, "ray_viscpm_rows_total") and submit.poll() is None:
                during = seen
            # the driver's gauges: exported while it runs (it lingers a report interval after success)
            last_success = max(last_success, total(seen, "ray_viscpm_last_success_timestamp_seconds", job="caption"))
            todo = max(todo, total(seen, "ray_viscpm_run_todo_rows", job="caption"))
            time.sleep(0.2)
        output, _ = submit.communicate(timeout=240)
        assert submit.returncode == 0, output[-4000:]
        assert during, "no viscpm series while the job ran:\n" + output[-3000:]
        assert 0 < total(during, "ray_viscpm_rows_total") < len(table)  # mid-run: some rows, not all
        assert total(during, "ray_viscpm_model_load_seconds_count", job="caption") >= 1

        rows = pq.read_table(str(out)).to_pylist()
        ok = sum(r["status"] == "ok" for r in rows)
        errors = len(rows) - ok
        assert (ok, errors) == (37, 3)
        after: dict = {}
        for _ in range(40):  # the driver flushes at exit; the agent exports within a report interval
            after = scrape(port)
            if total(after, "ray_viscpm_rows_total", status="ok") == ok:
                break
            time.sleep(0.25)
    # the counts are the output's
    assert total(after, "ray_viscpm_rows_total", job="caption", status="ok") == ok
    assert total(after, "ray_viscpm_rows_total", job="caption", status="error") == errors
    assert total(after, "ray_viscpm_stage_errors_total", job="caption", stage="decode") == errors
    assert total(after, "ray_viscpm_files_written_total", job="caption") == len(list(out.glob("part-*.parquet")))
    # model calls: every ok row went through one call of 1 or 2 rows (--batch-size 2). Bucket counts are exact;
    # Ray 2.60 exports a histogram's _sum from bucket midpoints, so it is not asserted
    calls = total(after, "ray_viscpm_model_batch_rows_count", job="caption")
    single = total(after, "ray_viscpm_model_batch_rows_bucket", job="caption", le="1.0")
    assert total(after, "ray_viscpm_model_batch_rows_bucket", job="caption", le="2.0") == calls
    assert single + 2 * (calls - single) == ok
    assert total(after, "ray_viscpm_model_batch_seconds_count", job="caption") == calls
    assert total(after, "ray_viscpm_model_batch_seconds_bucket", job="caption", le="0.25") == 0  # each sleeps 0.25 s
    assert total(after, "ray_viscpm_generated_tokens_total", job="caption") == STANDIN_TOKENS * ok
    assert total(after, "ray_viscpm_runs_total", job="caption", outcome="succeeded") == 1
    assert started <= last_success <= time.time()
    assert todo == len(table)
    # every series the job emitted is one the dashboard/alerts may use, and the caption job emits all but paint's
    emitted = set(after) | {"ray_viscpm_last_success_timestamp_seconds", "ray_viscpm_run_todo_rows"}
    assert emitted <= M.exported_names()
    # not by a normal caption run: paint's images, and the input files an --incremental run lists
    assert M.exported_names() - emitted == {"ray_viscpm_images_rendered_total", "ray_viscpm_input_files_total"}


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10 and all(exprs)
    return exprs


def test_dashboard_queries_use_only_the_metrics_the_jobs_emit():
    used: set[str] = set()
    for expr in dashboard_exprs():
        names = set(METRIC_TOKEN.findall(expr))
        assert names, f"a panel query without any of our metrics: {expr}"
        unknown = names - M.exported_names()
        assert not unknown, f"{expr} uses {unknown}, which the jobs do not emit"
        used |= names
    # what the issue asks the dashboard to show
    for wanted in ("ray_viscpm_rows_total", "ray_viscpm_stage_errors_total", "ray_viscpm_model_batch_seconds_bucket",
                   "ray_viscpm_model_batch_rows_bucket", "ray_viscpm_generated_tokens_total",
                   "ray_viscpm_images_rendered_total", "ray_viscpm_model_load_seconds_bucket",
                   "ray_viscpm_last_success_timestamp_seconds"):
        assert wanted in used, wanted


def test_alert_rules_parse_and_use_emitted_metrics():
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} >= {"ViscpmNoSuccessfulRun26h", "ViscpmErrorShareOver5Percent"}
    for rule in rules:
        names = set(METRIC_TOKEN.findall(rule["expr"]))
        assert names and names <= M.exported_names(), rule["expr"]
    assert "26h" in next(r for r in rules if r["alert"] == "ViscpmNoSuccessfulRun26h")["expr"]
    assert "0.05" in next(r for r in rules if r["alert"] == "ViscpmErrorShareOver5Percent")["expr"]


def test_names_are_exported_with_rays_prefix_and_prometheus_suffixes():
    names = M.exported_names()
    assert {"ray_viscpm_rows_total", "ray_viscpm_model_batch_seconds_bucket", "ray_viscpm_model_batch_seconds_sum",
            "ray_viscpm_model_batch_seconds_count", "ray_viscpm_last_success_timestamp_seconds"} <= names
    assert "ray_viscpm_input_files_total" in names  # --incremental runs record it


def test_recording_is_a_no_op_when_switched_off(monkeypatch):
    monkeypatch.setenv(M.ENV_SWITCH, "0")
    monkeypatch.setattr(M, "_objects", {})  # other tests in this process made metric objects already
    assert not M.enabled()
    M.written("caption", {"ok": 3}, ["decode: X: y", None])  # nothing raised, nothing made
    M.run_ended("caption", True)
    assert not M._objects
