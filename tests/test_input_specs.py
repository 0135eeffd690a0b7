"""What an --input names (issue 20): WebDataset-style specs - brace ranges and lists, globs, `::`-joined specs - on
a local disk and on S3 (moto on loopback), compressed shards (`.tar.gz`, `.tgz`) read like `.tar`, and no silent
skips: a file under the input that is not read is named in the log, in `_summary.json` and in the end line, while
`_`/`.` bookkeeping names stay silent. Shards are written with the `webdataset` library; the keys expected are the
ones that library reads back."""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline_fixtures import jpeg
from pipelines import CaptionJobConfig, InputError, PaintJobConfig, run_caption_job, run_paint_job
from pipelines.caption import schema as S
from pipelines.caption.readers import plan_input
from pipelines.core import runner, stop
from pipelines.paint.prompts import plan_prompts
from testing.standins import sleeping_caption_stage

FAST = {"batch_size": 4, "rows_per_file": 3, "decode_batch_size": 4, "num_gpus_per_worker": 0,
        "actor_start_timeout_s": 120, "no_progress_timeout_s": 120, "progress_every_s": 5.0}
STANDIN = sleeping_caption_stage(0)


def write_shard(path: Path, keys: list[str], bad: frozenset[str] = frozenset()) -> Path:
    """One shard written by the `webdataset` library, gzip-compressed when its name ends in .gz/.tgz; keys in `bad`
    get image bytes that do not decode."""
    import webdataset as wds

    path.parent.mkdir(parents=True, exist_ok=True)
    compress = path.name.endswith((".gz", ".tgz"))
    with wds.TarWriter(str(path), compress=compress) as sink:
        for i, key in enumerate(keys):
            sink.write({"__key__": key, "jpg": b"not a jpeg" if key in bad else jpeg((24 + i, 16)),
                        "json": {"key": key}})
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == compress  # really compressed (or really not)
    return path


def library_keys(paths: list[Path]) -> list[str]:
    """The sample keys the `webdataset` library itself reads from these shards."""
    import webdataset as wds

    return [s["__key__"] for s in wds.WebDataset([str(p) for p in paths], shardshuffle=False)]


def corpus(folder: Path) -> dict[str, list[str]]:
    """shard-000.tar, shard-001.tar, shard-002.tar.gz, shard-003.tgz, sub/shard-004.tar; {name: keys}."""
    names = ["shard-000.tar", "shard-001.tar", "shard-002.tar.gz", "shard-003.tgz", "sub/shard-004.tar"]
    out = {}
    for i, name in enumerate(names):
        keys = [f"k{i}-{j}" for j in range(3)]
        write_shard(folder / name, keys)
        out[name] = keys
    return out


def wds_cfg(spec: str, output: str = "o", **kw) -> CaptionJobConfig:
    return CaptionJobConfig(input=spec, output=output, input_format="webdataset", **{**FAST, **kw})


def planned(spec: str) -> tuple[list[str], list[str], list[str]]:
    """(files relative to the plan's root, keys, skipped files) of a WebDataset plan."""
    plan = plan_input(wds_cfg(spec))
    root = plan.root.path.rstrip("/") + "/"
    return [f[len(root):] for f in plan.files], plan.keys.to_pylist(), plan.skipped_files


# ---- specs, planned (no Ray) ---------------------------------------------------------------------------------------
def test_brace_ranges_lists_globs_and_joined_specs_local(tmp_path, monkeypatch):
    shards = corpus(tmp_path / "c")
    c = tmp_path / "c"
    keys = lambda *names: [k for n in names for k in shards[n]]  # noqa: E731
    assert planned(f"{c}/shard-{{000..001}}.tar") == (["shard-000.tar", "shard-001.tar"], keys(
        "shard-000.tar", "shard-001.tar"), [])
    assert planned(f"{c}/shard-{{000.tar,002.tar.gz}}")[0] == ["shard-000.tar", "shard-002.tar.gz"]
    assert planned(f"{c}/shard-*.t*")[0] == ["shard-000.tar", "shard-001.tar", "shard-002.tar.gz", "shard-003.tgz"]
    assert planned(f"{c}/shard-00[13].t?[rz]")[0] == ["shard-001.tar", "shard-003.tgz"]
    assert planned(f"{c}/*/shard-*.tar")[0] == ["sub/shard-004.tar"]
    files, got, skipped = planned(f"{c}/shard-000.tar::{c}/sub::{c}/shard-00{{2..3}}.t*")
    assert files == ["shard-000.tar", "shard-002.tar.gz", "shard-003.tgz", "sub/shard-004.tar"] and skipped == []
    assert got == library_keys([c / f for f in files])  # the library's own keys, compressed shards included
    # the folder itself: every shard, compressed or not, in name order
    files, got, _ = planned(str(c))
    assert files == sorted(shards) and got == library_keys([c / f for f in files])
    # a relative spec is relative to the working directory, like a plain path
    monkeypatch.chdir(tmp_path)
    assert planned("c/shard-{000..001}.tar")[0] == ["shard-000.tar", "shard-001.tar"]


def test_the_same_patterns_select_parquet_and_prompt_files(tmp_path):
    (tmp_path / "rows").mkdir()
    for i in range(3):
        pq.write_table(pa.table({"id": [f"p{i}"], "image": pa.array([jpeg()], pa.binary())}),
                       tmp_path / "rows" / f"part-{i}.parquet")
    plan = plan_input(CaptionJobConfig(input=f"{tmp_path}/rows/part-{{0..1}}.parquet", output="o"))
    assert plan.keys.to_pylist() == ["p0", "p1"]
    plan = plan_input(CaptionJobConfig(input=f"{tmp_path}/rows/part-[12].parquet::{tmp_path}/rows/part-0.parquet",
                                       output="o"))
    assert plan.keys.to_pylist() == ["p0", "p1", "p2"]
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "a.txt").write_text("red circle\nblue square\n")
    (prompts / "b.txt").write_text("green star\n")
    (prompts / "c.jsonl").write_text('{"key": "j1", "prompt": "yellow ring"}\n')
    cfg = lambda spec: SimpleNamespace(input=spec, prompt_column="prompt")  # noqa: E731
    assert plan_prompts(cfg(f"{prompts}/*.txt")).prompts["prompt"].to_pylist() == [
        "red circle", "blue square", "green star"]
    both = plan_prompts(cfg(f"{prompts}/{{a.txt,c.jsonl}}"))
    assert both.prompt_keys.to_pylist() == ["a.txt:1", "a.txt:2", "j1"]  # b.txt is not named


def test_s3_brace_ranges_globs_and_joined_specs(s3, tmp_path):
    bucket = s3.bucket("spec-bucket")
    fs = s3.fs()
    shards = corpus(tmp_path / "c")
    for name in shards:
        fs.put_file(str(tmp_path / "c" / name), f"{bucket}/wds/{name}")
    fs.pipe_file(f"{bucket}/wds/notes.csv", b"a,b\n")
    base = f"s3://{bucket}/wds"
    assert planned(f"{base}/shard-{{000..001}}.tar")[:2] == (["shard-000.tar", "shard-001.tar"], [
        *shards["shard-000.tar"], *shards["shard-001.tar"]])
    assert planned(f"{base}/shard-*.t*")[0] == ["shard-000.tar", "shard-001.tar", "shard-002.tar.gz",
                                                 "shard-003.tgz"]
    assert planned(f"{base}/shard-00[02].tar*::{base}/sub/*")[0] == ["shard-000.tar", "shard-002.tar.gz",
                                                                     "sub/shard-004.tar"]
    files, keys, skipped = planned(f"{base}/")
    assert files == sorted(shards) and skipped == ["notes.csv"]
    assert keys == library_keys([tmp_path / "c" / f for f in files])
    # refused, naming the spec or the expanded name that is missing
    with pytest.raises(InputError, match=rf"s3://{bucket}/wds/\*\.zip matches no file"):
        plan_input(wds_cfg(f"{base}/*.zip"))
    with pytest.raises(InputError, match=rf"s3://{bucket}/wds/shard-007\.tar does not exist \(from --input "
                                         rf"'s3://{bucket}/wds/shard-\{{000,001,007\}}\.tar'\)"):
        plan_input(wds_cfg(f"{base}/shard-{{000,001,007}}.tar"))
    with pytest.raises(InputError, match="s3://no-such-spec-bucket/x.*does not exist"):
        plan_input(wds_cfg(f"{base}/shard-000.tar::s3://no-such-spec-bucket/x/*.tar"))


def test_specs_that_match_nothing_are_refused_naming_them(tmp_path):
    corpus(tmp_path / "c")
    c = tmp_path / "c"
    cases = {
        f"{c}/*.zip": rf"{c}/\*\.zip matches no file",
        f"{c}/shard-{{000..009}}.tar": rf"{c}/shard-002\.tar does not exist \(from --input '.*\{{000\.\.009\}}",
        f"{c}/shard-000.tar::{c}/nope/*.tar": rf"{c}/nope/\*\.tar does not exist",
        f"{c}/shard-000.tar::{c}/missing": rf"{c}/missing does not exist",
        f"{c}/shard-000.tar::s3://some-bucket/x.tar": "mixes filesystems",
    }
    for spec, message in cases.items():
        with pytest.raises(InputError, match=message):
            plan_input(wds_cfg(spec))
        with pytest.raises(InputError, match=message):
            plan_prompts(SimpleNamespace(input=spec, prompt_column="prompt"))
    # a folder whose only files are of another kind: refused, and the message says what it holds
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.csv").write_text("x\n")
    with pytest.raises(InputError, match=r"no \.tar shards .*found: notes\.csv"):
        plan_input(wds_cfg(str(tmp_path / "docs")))


def test_bookkeeping_names_are_silent_other_files_are_named(tmp_path, caplog):
    c = tmp_path / "c"
    write_shard(c / "shard-000.tar", ["a"])
    write_shard(c / "shard-001.tar.gz", ["b"])
    for name in ("_SUCCESS", ".DS_Store", "_meta/x.txt", ".cache/y.tar", "notes.csv", "sub/README.md"):
        (c / name).parent.mkdir(parents=True, exist_ok=True)
        (c / name).write_text("x")
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        files, keys, skipped = planned(str(c))
    assert files == ["shard-000.tar", "shard-001.tar.gz"] and keys == ["a", "b"]
    assert skipped == ["notes.csv", "sub/README.md"]
    logged = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(logged) == 1 and "2 files skipped: notes.csv, sub/README.md" in logged[0], logged
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        assert planned(f"{c}/*.tar*")[2] == []  # a glob that names only shards: nothing skipped, nothing logged
    assert not [r for r in caplog.records if "skipped" in r.getMessage()]
    (c / "pic.png").write_bytes(b"")  # the images format: the shards and notes are the files it skips
    images = plan_input(CaptionJobConfig(input=str(c), output="o", input_format="images"))
    assert images.keys.to_pylist() == ["pic.png"]
    assert images.skipped_files == ["notes.csv", "shard-000.tar", "shard-001.tar.gz", "sub/README.md"]


# ---- through the jobs (local Ray) ---------------------------------------------------------------------------------
def test_caption_job_reads_compressed_shards_and_names_the_file_it_skipped(ray_session, tmp_path, caplog):
    """The `shapes` model over .tar + .tar.gz + .tgz shards with a notes.csv among them: every sample once, keys as
    the library reads them; notes.csv in the log, the end line and `_summary.json`; `_`/`.` names nowhere."""
    c = tmp_path / "c"
    paths = [write_shard(c / "shard-000.tar", ["a0", "a1"]), write_shard(c / "shard-001.tar.gz", ["b0", "b1", "b2"]),
             write_shard(c / "shard-002.tgz", ["c0"])]
    (c / "notes.csv").write_text("shard,rows\n")
    (c / "_SUCCESS").write_text("")
    (c / ".index").write_text("")
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        result = run_caption_job(wds_cfg(str(c), str(out), model="shapes", max_new_tokens=8))
    assert result.succeeded and result.ok == 6, result.one_line()
    rows = pq.read_table(str(out)).to_pylist()
    assert sorted(r[S.KEY] for r in rows) == sorted(library_keys(paths))
    assert all(r[S.CAPTION] for r in rows)
    assert result.skipped_files == ["notes.csv"]
    assert result.one_line().endswith("; 1 file skipped: notes.csv")
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["skipped_files"] == ["notes.csv"] and summary["succeeded"] is True
    assert any("1 file skipped: notes.csv" in r.getMessage() for r in caplog.records)
    assert not any("_SUCCESS" in r.getMessage() or ".index" in r.getMessage() for r in caplog.records)

    # the same corpus without the stray file: the run does not look the same
    (c / "notes.csv").unlink()
    clean = run_caption_job(wds_cfg(str(c), str(tmp_path / "clean")), model_stage=STANDIN)
    assert clean.skipped_files == [] and "skipped" not in clean.one_line()
    assert json.loads((tmp_path / "clean" / "_summary.json").read_text())["skipped_files"] == []


def test_resume_over_compressed_shards(ray_session, tmp_path, monkeypatch):
    """A run stopped after its first written file (SIGTERM's clean stop) resumes over .tar.gz/.tgz shards: only the
    rest is read again, every key once; --retry-errors re-reads just the error row from the compressed shard."""
    c = tmp_path / "c"
    write_shard(c / "a.tar.gz", [f"a{i}" for i in range(5)], bad=frozenset({"a3"}))
    write_shard(c / "b.tgz", [f"b{i}" for i in range(4)])
    config = wds_cfg(str(c), str(tmp_path / "out"), keep_columns=["json"])
    update = runner.RowProgress.update

    def stop_after_first_file(self, *args, **kwargs):
        update(self, *args, **kwargs)
        stop.requested.set()

    monkeypatch.setattr(runner.RowProgress, "update", stop_after_first_file)
    try:
        with pytest.raises(stop.StopRequested):
            run_caption_job(config, model_stage=STANDIN)
    finally:
        stop.requested.clear()
    monkeypatch.setattr(runner.RowProgress, "update", update)
    resumed = run_caption_job(config, model_stage=STANDIN)
    assert resumed.succeeded and 0 < resumed.skipped < 9 and resumed.processed == 9 - resumed.skipped
    rows = pq.read_table(str(tmp_path / "out")).to_pylist()
    assert sorted(r[S.KEY] for r in rows) == sorted(library_keys([c / "a.tar.gz", c / "b.tgz"]))
    assert all(json.loads(r["json"]) == {"key": r[S.KEY]} for r in rows)  # the members, read from gzip
    retry = run_caption_job(dataclasses.replace(config, retry_errors=True), model_stage=STANDIN)
    assert retry.succeeded and retry.processed == 1 and retry.skipped == 8 and retry.error == 1


def test_incremental_over_compressed_shards(ray_session, tmp_path):
    c = tmp_path / "c"
    write_shard(c / "shard-000.tar", ["a0", "a1"])
    write_shard(c / "shard-001.tar.gz", ["b0", "b1", "b2", "b3"])
    (c / "notes.csv").write_text("x\n")
    out = tmp_path / "out"
    config = wds_cfg(str(c), str(out), incremental=True)
    first = run_caption_job(config, model_stage=STANDIN)
    assert first.succeeded and first.files["new"] == 2 and first.skipped_files == ["notes.csv"]
    assert first.one_line().endswith("; 1 file skipped: notes.csv")
    assert json.loads((out / "_summary.json").read_text())["skipped_files"] == ["notes.csv"]
    # `<name>.tar.gz` -> `<name>.parquet` (parts past --rows-per-file), like `<name>.tar`
    assert pq.read_table(out / "shard-000.parquet")["key"].to_pylist() == ["a0", "a1"]
    assert [pq.read_table(out / f"shard-001-0000{p}.parquet")["key"].to_pylist() for p in (0, 1)] == [
        ["b0", "b1", "b2"], ["b3"]]
    write_shard(c / "shard-002.tgz", ["c0"])
    (c / "notes.csv").unlink()
    second = run_caption_job(config, model_stage=STANDIN)
    assert second.succeeded and second.files["new"] == 1 and second.files["unchanged"] == 2
    assert second.processed == 1 and second.skipped_files == []
    assert pq.read_table(out / "shard-002.parquet")["key"].to_pylist() == ["c0"]


def test_caption_job_on_s3_with_a_glob_over_compressed_shards(ray_session, s3, tmp_path):
    bucket = s3.bucket("spec-job-bucket")
    fs = s3.fs()
    paths = [write_shard(tmp_path / "c" / "shard-000.tar", ["a0", "a1"]),
             write_shard(tmp_path / "c" / "shard-001.tar.gz", ["b0", "b1", "b2"])]
    for p in paths:
        fs.put_file(str(p), f"{bucket}/in/{p.name}")
    fs.pipe_file(f"{bucket}/in/README.md", b"# corpus\n")
    result = run_caption_job(wds_cfg(f"s3://{bucket}/in/*", f"s3://{bucket}/out"), model_stage=STANDIN)
    assert result.succeeded and result.ok == 5 and result.skipped_files == ["README.md"]
    assert json.loads(fs.cat_file(f"{bucket}/out/_summary.json"))["skipped_files"] == ["README.md"]
    rows = [r for p in fs.find(f"{bucket}/out") if p.endswith(".parquet") and "/_" not in p
            for r in pq.read_table(fs.open(p, "rb")).to_pylist()]
    assert sorted(r[S.KEY] for r in rows) == sorted(library_keys(paths))


def test_paint_job_names_the_files_it_skipped(ray_session, tmp_path, caplog):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "a.txt").write_text("a red circle\n")
    (prompts / "b.jsonl").write_text('{"key": "b1", "prompt": "a blue square"}\n')
    (prompts / "notes.md").write_text("# prompts for the spring catalogue\n")
    (prompts / "extra.yaml").write_text("prompt: a green star\n")
    (prompts / "_done").write_text("")
    (prompts / ".a.txt.swp").write_text("")
    out = tmp_path / "out"
    config = PaintJobConfig(input=str(prompts), output=str(out), model="shapes", steps=2, images_per_prompt=1,
                            scheduler="dpmsolver", batch_size=2, num_gpus_per_worker=0, output_format="parquet",
                            actor_start_timeout_s=120, no_progress_timeout_s=120)
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        result = run_paint_job(config)
    assert result.succeeded and result.ok == 2
    assert result.skipped_files == ["extra.yaml", "notes.md"]
    assert result.one_line().endswith("; 2 files skipped: extra.yaml, notes.md")
    assert json.loads((out / "_summary.json").read_text())["skipped_files"] == ["extra.yaml", "notes.md"]
    assert any("2 files skipped: extra.yaml, notes.md" in r.getMessage() for r in caplog.records)
    assert sorted(pq.read_table(str(out))["key"].to_pylist()) == ["a.txt:1-0", "b1-0"]
    # a spec that names only prompt files skips nothing
    assert plan_prompts(dataclasses.replace(config, input=f"{prompts}/*.{{txt,jsonl}}")).skipped_files == []


def test_gzip_magic_not_the_name_decides(tmp_path):
    """A `.tgz` whose bytes are a plain tar, and a `.tar` that is gzipped: the plan reads both (tarfile looks at the
    bytes), so a mislabelled shard is neither skipped nor misread."""
    c = tmp_path / "c"
    plain = write_shard(tmp_path / "x" / "p.tar", ["p0"])
    c.mkdir()
    (c / "p.tgz").write_bytes(plain.read_bytes())
    (c / "g.tar").write_bytes(gzip.compress(write_shard(tmp_path / "x" / "g.tar", ["g0"]).read_bytes()))
    assert planned(str(c))[:2] == (["g.tar", "p.tgz"], ["g0", "p0"])


def test_each_part_of_a_joined_spec_is_spelled_canonically(tmp_path, monkeypatch):
    """The job's fingerprint holds the input canonically: `./a/*.tar::b/` from the input's folder and the absolute
    spelling are the same job (a rerun resumes instead of being refused as another job)."""
    monkeypatch.chdir(tmp_path)
    relative = CaptionJobConfig(input="./a/*.tar::b/::s3://bkt/x/", output="o", input_format="webdataset")
    absolute = CaptionJobConfig(input=f"{tmp_path}/a/*.tar::{tmp_path}/b::s3://bkt/x", output="o",
                                input_format="webdataset")
    assert relative.fingerprint() == absolute.fingerprint()
    assert relative.fingerprint()["input"] == f"{tmp_path}/a/*.tar::{tmp_path}/b::s3://bkt/x"
