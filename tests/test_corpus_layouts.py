"""Real corpora are not uniform (issue 10): WebDataset shards whose samples differ in their members, Parquet files
that differ in optional columns, prompt files that differ in optional columns - every sample/row must come out once,
with nulls where a member/column is absent. Plus the inputs refused before any work: a path that does not exist
(local, S3, a missing bucket) and a file that is not what --input-format says."""

from __future__ import annotations

import io
import re
import os
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline_fixtures import jpeg, png, write_webdataset_shards
from pipelines import CaptionJobConfig, InputError, run_caption_job
from pipelines.caption.readers import plan_input
from pipelines.caption import schema as S
from testing.standins import sleeping_caption_stage
from pipelines.paint.prompts import plan_prompts
from pipelines.core.storage import locate

FAST = {"max_new_tokens": 4, "beam_size": 2, "batch_size": 4, "rows_per_file": 8, "decode_batch_size": 4,
        "progress_every_s": 0.5, "actor_start_timeout_s": 120, "no_progress_timeout_s": 120}
DEFAULT_Q = "What is in the image?"


def webp(colour=(10, 120, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), colour).save(buf, "WEBP")
    return buf.getvalue()


def a_png(colour=(0, 200, 0)) -> bytes:
    return png(Image.new("RGB", (20, 30), colour))


def mixed_corpus() -> tuple[list[list[dict]], dict[str, dict]]:
    """Shards (lists of samples) in many layouts, and per key what the output row must say."""
    shards = [
        # jpg + question + json; one sample without the question member, one with an empty question
        [{"__key__": "a0", "jpg": jpeg(), "txt": "第0张？", "json": {"n": 0}},
         {"__key__": "a1", "jpg": jpeg(colour=(1, 2, 3)), "json": {"n": 1}},
         {"__key__": "a2", "jpg": jpeg(), "txt": "", "json": {"n": 2}}],
        # no jpg at all, png only, no question member in the whole shard, no json either
        [{"__key__": "b0", "png": a_png()}, {"__key__": "b1", "png": a_png((9, 9, 9))}],
        # webp; an extra member (cls) in this shard only; a sample with both png and jpg (jpg comes first)
        [{"__key__": "c0", "webp": webp(), "cls": "7", "txt": "what colour?"},
         {"__key__": "c1", "png": a_png(), "jpg": jpeg(), "cls": "8"}],
        # junk: an image member that is not an image, a sample with no image member, a member we never read
        [{"__key__": "d0", "jpg": b"\x00not a jpeg at all", "txt": "junk?"},
         {"__key__": "d1", "txt": "where is the picture?", "json": {"n": 9}},
         {"__key__": "d2", "jpeg": jpeg(), "xyz": b"\x01\x02junk member"}],
        # a one-sample shard with only a question member typed differently (bytes)
        [{"__key__": "e0", "webp": webp((200, 0, 0)), "txt": "e?".encode()}],
    ]
    expect = {
        "a0": ("ok", "第0张？", b'{"n": 0}', None), "a1": ("ok", DEFAULT_Q, b'{"n": 1}', None),
        "a2": ("ok", DEFAULT_Q, b'{"n": 2}', None), "b0": ("ok", DEFAULT_Q, None, None),
        "b1": ("ok", DEFAULT_Q, None, None), "c0": ("ok", "what colour?", None, b"7"),
        "c1": ("ok", DEFAULT_Q, None, b"8"), "d0": ("error", "junk?", None, None),
        "d1": ("error", "where is the picture?", b'{"n": 9}', None), "d2": ("ok", DEFAULT_Q, None, None),
        "e0": ("ok", "e?", None, None),
    }
    return shards, {k: dict(zip(("status", "question", "json", "cls"), v)) for k, v in expect.items()}


def write_shards(folder: Path, shards: list[list[dict]]) -> list[Path]:
    paths = []
    for i, samples in enumerate(shards):
        sub = folder / f"s{i}"
        paths += [p.rename(folder / f"shard-{i:03d}.tar") for p in write_webdataset_shards(sub, samples, 100)]
        sub.rmdir()
    return paths


def check_rows(rows: list[dict], expect: dict[str, dict]) -> None:
    assert sorted(r[S.KEY] for r in rows) == sorted(expect)  # every sample exactly once
    by_key = {r[S.KEY]: r for r in rows}
    for key, want in expect.items():
        row = by_key[key]
        assert row[S.STATUS] == want["status"], (key, row[S.ERROR])
        assert row[S.QUESTION] == want["question"], key
        assert row["json"] == want["json"] and row["cls"] == want["cls"], key
    assert "decode" in by_key["d0"][S.ERROR] and "no image member" in by_key["d1"][S.ERROR]


def wds_config(input_uri: str, output: str, **kw) -> CaptionJobConfig:
    return CaptionJobConfig(input=input_uri, input_format="webdataset", question=DEFAULT_Q, question_column="txt",
                            keep_columns=["json", "cls"], output=output, num_gpus_per_worker=0,
                            **{"model": "tiny", **FAST, **kw})


# ---- WebDataset ---------------------------------------------------------------------------------------------------
def test_webdataset_shards_in_many_layouts_local(ray_session, tmp_path):
    shards, expect = mixed_corpus()
    write_shards(tmp_path / "corpus", shards)
    result = run_caption_job(wds_config(str(tmp_path / "corpus"), str(tmp_path / "out")))
    assert result.succeeded, result.reconciliation.problems()
    out = pq.read_table(str(tmp_path / "out"))
    assert out.schema.field("json").type == pa.binary() and out.schema.field("cls").type == pa.binary()
    check_rows(out.to_pylist(), expect)
    assert result.ok == 9 and result.error == 2


def test_webdataset_image_key_and_upper_case_suffixes(ray_session, tmp_path):
    """--image-key picks that member only (a sample without it is an error row); suffixes match case-insensitively
    (the `webdataset` library lower-cases them)."""
    write_webdataset_shards(tmp_path / "a", [{"__key__": "x0", "png": a_png(), "jpg": jpeg()},
                                             {"__key__": "x1", "jpg": jpeg()}], 10)
    write_webdataset_shards(tmp_path / "b", [{"__key__": "y0", "PNG": a_png()}], 10)
    (tmp_path / "b" / "shard-00000.tar").rename(tmp_path / "a" / "shard-00001.tar")
    result = run_caption_job(CaptionJobConfig(input=str(tmp_path / "a"), input_format="webdataset", image_key="png",
                                              output=str(tmp_path / "out"), **FAST),
                             model_stage=sleeping_caption_stage(0))
    rows = {r[S.KEY]: r for r in pq.read_table(str(tmp_path / "out")).to_pylist()}
    assert result.succeeded and sorted(rows) == ["x0", "x1", "y0"]
    assert rows["x0"][S.STATUS] == "ok" and rows["y0"][S.STATUS] == "ok"
    assert rows["x1"][S.STATUS] == "error" and "no image member" in rows["x1"][S.ERROR]
    assert "20x30" in rows["x0"][S.CAPTION]  # the png (20x30), not the jpg (64x48)


def test_webdataset_shards_in_many_layouts_s3(ray_session, s3, tmp_path):
    bucket = s3.bucket("mixed-corpus")
    shards, expect = mixed_corpus()
    fs = s3.fs()
    for path in write_shards(tmp_path / "corpus", shards):
        fs.put_file(str(path), f"{bucket}/wds/{path.name}")
    result = run_caption_job(wds_config(f"s3://{bucket}/wds/", f"s3://{bucket}/out"),
                             model_stage=sleeping_caption_stage(0))
    assert result.succeeded, result.reconciliation.problems()
    files = [p for p in fs.find(f"{bucket}/out") if p.endswith(".parquet") and "/_" not in p]
    rows = [r for p in files for r in pq.read_table(io.BytesIO(fs.cat_file(p))).to_pylist()]
    check_rows(rows, expect)


def test_webdataset_blocks_have_one_schema_whatever_the_members(tmp_path, monkeypatch):
    """The reader itself (no Ray): every block has the same columns and types, null where a sample lacks a member,
    whatever each shard holds; blocks are cut by rows (and bytes); the plan's keys are the rows' keys."""
    from pipelines.caption import webdataset

    shards, expect = mixed_corpus()
    paths = write_shards(tmp_path, shards)
    # a hand-made tar with what the `webdataset` library never writes: a folder entry, a member without a suffix,
    # a sample key with a folder, upper-case suffixes
    odd = tmp_path / "odd.tar"
    with tarfile.open(odd, "w") as tar:
        for name, data in (("sub", None), ("README", b"x"), ("sub/k1.JPG", jpeg()), ("sub/k1.TXT", b"hi?"),
                           ("sub/k2.json", b"{}")):
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    monkeypatch.setattr(webdataset, "WDS_BLOCK_ROWS", 2)
    columns = ["jpg", "jpeg", "png", "webp", "txt", "json", "cls"]
    schema = webdataset.webdataset_schema(columns)
    rows = []
    for path in [*paths, odd]:
        with open(path, "rb") as fh:
            blocks = list(webdataset.webdataset_blocks(fh, str(path), columns))
        assert all(b.schema == schema and b.num_rows <= 2 for b in blocks), path
        rows += [r for b in blocks for r in b.to_pylist()]
        assert webdataset.tar_keys(locate(str(tmp_path)), str(path)) == [r["__key__"] for b in blocks for r in b.to_pylist()]
    by_key = {r["__key__"]: r for r in rows}
    assert sorted(by_key) == sorted([*expect, "sub/k1", "sub/k2"])
    assert by_key["b0"]["jpg"] is None and by_key["b0"]["png"] and by_key["b0"]["txt"] is None
    assert by_key["a0"]["txt"] == "第0张？".encode() and by_key["a1"]["txt"] is None
    assert by_key["d2"]["__members"] == "jpeg,xyz" and by_key["c0"]["cls"] == b"7"
    assert by_key["sub/k1"]["jpg"] == jpeg() and by_key["sub/k1"]["txt"] == b"hi?"
    assert by_key["sub/k2"]["json"] == b"{}" and by_key["sub/k2"]["jpg"] is None
    monkeypatch.setattr(webdataset, "WDS_BLOCK_BYTES", 1)  # a block as soon as any member bytes are held
    with open(paths[0], "rb") as fh:
        assert [b.num_rows for b in webdataset.webdataset_blocks(fh, "x", columns)] == [1, 1, 1]


# ---- Parquet --------------------------------------------------------------------------------------------------------
def test_parquet_files_differ_in_optional_columns(ray_session, tmp_path):
    corpus = tmp_path / "rows"
    corpus.mkdir()
    pq.write_table(pa.table({"id": ["p0", "p1"], "image": pa.array([jpeg(), jpeg()], pa.binary()),
                             "q": ["why?", None], "note": ["n0", "n1"]}), corpus / "a.parquet")
    # no q, no note at all
    pq.write_table(pa.table({"id": ["p2"], "image": pa.array([jpeg()], pa.binary())}), corpus / "b.parquet")
    # note present but all null (type null), q present; another column order and an extra column
    pq.write_table(pa.table({"extra": [1], "q": ["how many?"], "note": pa.nulls(1), "image":
                             pa.array([b"junk"], pa.binary()), "id": ["p3"]}), corpus / "c.parquet")
    config = CaptionJobConfig(input=str(corpus), output=str(tmp_path / "out"), question=DEFAULT_Q,
                              question_column="q", keep_columns=["note"], **FAST)
    plan = plan_input(config)
    assert [f.name for f in plan.keep_fields] == ["note"] and plan.keep_fields[0].type == pa.string()
    result = run_caption_job(config, model_stage=sleeping_caption_stage(0))
    assert result.succeeded, result.reconciliation.problems()
    rows = {r[S.KEY]: r for r in pq.read_table(str(tmp_path / "out")).to_pylist()}
    assert sorted(rows) == ["p0", "p1", "p2", "p3"]
    assert [rows[k][S.QUESTION] for k in sorted(rows)] == ["why?", DEFAULT_Q, DEFAULT_Q, "how many?"]
    assert [rows[k]["note"] for k in sorted(rows)] == ["n0", "n1", None, None]
    assert [rows[k][S.STATUS] for k in sorted(rows)] == ["ok", "ok", "ok", "error"]


def test_parquet_required_columns_stay_required_in_every_file(tmp_path):
    pq.write_table(pa.table({"id": ["a"], "image": pa.array([b"x"], pa.binary()), "note": ["n"]}),
                   tmp_path / "a.parquet")
    pq.write_table(pa.table({"id": ["b"], "img": pa.array([b"x"], pa.binary())}), tmp_path / "b.parquet")
    with pytest.raises(InputError, match=r"b\.parquet: missing column\(s\) \['image'\].*Available columns"):
        plan_input(CaptionJobConfig(input=str(tmp_path), output="o", keep_columns=["note"]))
    (tmp_path / "b.parquet").unlink()
    # optional columns may be absent from some files, not from all (a typo is still refused)
    with pytest.raises(InputError, match=r"'nope'.*in none of the 1 input files"):
        plan_input(CaptionJobConfig(input=str(tmp_path), output="o", keep_columns=["note", "nope"]))
    with pytest.raises(InputError, match=r"'qq'.*in none"):
        plan_input(CaptionJobConfig(input=str(tmp_path), output="o", question_column="qq"))
    pq.write_table(pa.table({"id": ["c"], "image": ["path/to.jpg"]}), tmp_path / "c.parquet")
    with pytest.raises(InputError, match=r"--image-column 'image'.*binary in .*a\.parquet.*string in .*c\.parquet"):
        plan_input(CaptionJobConfig(input=str(tmp_path), output="o"))
    pq.write_table(pa.table({"id": ["c"], "image": pa.array([b"x"], pa.binary()), "note": [3]}),
                   tmp_path / "c.parquet")
    with pytest.raises(InputError, match=r"--keep-columns 'note'.*string.*int64"):
        plan_input(CaptionJobConfig(input=str(tmp_path), output="o", keep_columns=["note"]))


# ---- prompt files of the paint job ---------------------------------------------------------------------------------
def prompt_cfg(path, **kw):
    return SimpleNamespace(input=str(path), prompt_column=kw.pop("prompt_column", "prompt"), **kw)


def test_prompt_files_differ_in_optional_columns(tmp_path):
    pq.write_table(pa.table({"key": ["k1", "k2"], "prompt": ["a", "b"], "seed": [1, None]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"key": ["k3"], "prompt": ["c"], "negative_prompt": ["blur"]}), tmp_path / "b.parquet")
    pq.write_table(pa.table({"key": [4], "prompt": ["d"], "seed": pa.nulls(1), "negative_prompt": pa.nulls(1)}),
                   tmp_path / "c.parquet")
    (tmp_path / "d.jsonl").write_text('{"key": "k5", "prompt": "e", "seed": 5}\n{"key": "k6", "prompt": "f"}\n')
    (tmp_path / "e.csv").write_text("key,prompt,negative_prompt\nk7,g,\nk8,h,dark\n")
    rows = {r["prompt_key"]: r for r in plan_prompts(prompt_cfg(tmp_path)).prompts.to_pylist()}
    assert sorted(rows) == ["4", "k1", "k2", "k3", "k5", "k6", "k7", "k8"]
    assert [rows[k]["seed"] for k in ("k1", "k2", "k3", "4", "k5", "k6")] == [1, None, None, None, 5, None]
    assert [rows[k]["negative_prompt"] for k in ("k1", "k3", "4", "k7", "k8")] == [None, "blur", None, None, "dark"]
    assert all(r["error_message"] is None for r in rows.values())


# ---- refused before any work ---------------------------------------------------------------------------------------
def test_missing_input_paths_are_named(tmp_path):
    missing = tmp_path / "no" / "such" / "corpus"
    for fmt in ("parquet", "webdataset", "images"):
        with pytest.raises(InputError, match=rf"{missing}.* does not exist"):
            plan_input(CaptionJobConfig(input=str(missing), output="o", input_format=fmt))
    with pytest.raises(InputError, match=rf"{missing}.* does not exist"):
        plan_prompts(prompt_cfg(missing))
    # a folder that exists but holds other files: say what is there
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.jpg").write_bytes(jpeg())
    with pytest.raises(InputError, match=r"no \.parquet files .*pics.*found: a\.jpg"):
        plan_input(CaptionJobConfig(input=str(tmp_path / "pics"), output="o"))


def test_missing_s3_paths_and_buckets_are_named(s3):
    bucket = s3.bucket("present-bucket")
    s3.fs().pipe_file(f"{bucket}/data/part-0.parquet", b"x")
    for uri in (f"s3://{bucket}/nothing-here/", f"s3://{bucket}/data/nope-", "s3://no-such-bucket-x/corpus/"):
        for fmt in ("parquet", "webdataset"):
            with pytest.raises(InputError, match=rf"{uri.rstrip('/')}.* does not exist"):
                plan_input(CaptionJobConfig(input=uri, output="o", input_format=fmt))
        with pytest.raises(InputError, match=rf"{uri.rstrip('/')}.* does not exist"):
            plan_prompts(prompt_cfg(uri))


def test_input_that_is_not_what_input_format_says(tmp_path):
    pq.write_table(pa.table({"id": ["a"], "image": pa.array([b"x"], pa.binary())}), tmp_path / "t.parquet")
    write_webdataset_shards(tmp_path / "wds", [{"__key__": "s", "jpg": jpeg()}], 10)
    tar = tmp_path / "wds" / "shard-00000.tar"
    with pytest.raises(InputError, match=r"t\.parquet.*not a tar.*--input-format webdataset"):
        plan_input(CaptionJobConfig(input=str(tmp_path / "t.parquet"), output="o", input_format="webdataset"))
    with pytest.raises(InputError, match=r"shard-00000\.tar.*not a Parquet file.*--input-format parquet"):
        plan_input(CaptionJobConfig(input=str(tar), output="o"))
    renamed = tmp_path / "wds" / "looks.parquet"
    renamed.write_bytes(tar.read_bytes())
    with pytest.raises(InputError, match=r"looks\.parquet.*not a Parquet file"):
        plan_input(CaptionJobConfig(input=str(tmp_path / "wds"), output="o"))
    fake_tar = tmp_path / "fake" / "x.tar"
    fake_tar.parent.mkdir()
    fake_tar.write_bytes(os.urandom(2000))
    with pytest.raises(InputError, match=r"x\.tar.*not a tar"):
        plan_input(CaptionJobConfig(input=str(fake_tar.parent), output="o", input_format="webdataset"))
    with pytest.raises(InputError, match=r"t\.parquet.*not an image file"):
        plan_input(CaptionJobConfig(input=str(tmp_path / "t.parquet"), output="o", input_format="images"))
    # prompt files: an extension we do not read, a corrupt parquet
    (tmp_path / "prompts.yaml").write_text("a: b\n")
    with pytest.raises(InputError, match=r"prompts\.yaml.*not a prompt file"):
        plan_prompts(prompt_cfg(tmp_path / "prompts.yaml"))
    with pytest.raises(InputError, match=r"looks\.parquet.*not a Parquet file"):
        plan_prompts(prompt_cfg(renamed))


def test_refusals_through_the_job(ray_session, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.parquet").write_bytes(b"PAR1 this is no parquet")
    with pytest.raises(InputError, match=r"a\.parquet.*not a Parquet file"):
        run_caption_job(CaptionJobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out")))
    with pytest.raises(InputError, match="does not exist"):
        run_caption_job(CaptionJobConfig(input=str(tmp_path / "missing"), output=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()  # nothing written


def test_cli_refusals_exit_2_naming_the_file(s3, tmp_path):
    """The programs: exit status 2, the path in the message, no traceback (jobs/jobcli.py maps InputError)."""
    import subprocess

    from pipeline_fixtures import PYTHON, REPO_ROOT, job_env

    pq.write_table(pa.table({"id": ["a"], "image": pa.array([b"x"], pa.binary())}), tmp_path / "t.parquet")
    runs = {
        "caption": ([str(REPO_ROOT / "jobs" / "caption.py"), "--input", str(tmp_path / "t.parquet"),
                     "--input-format", "webdataset"], r"t\.parquet: not a tar archive"),
        "paint": ([str(REPO_ROOT / "jobs" / "paint.py"), "--input", "s3://no-such-bucket-cli/prompts.txt"],
                  r"s3://no-such-bucket-cli/prompts\.txt does not exist"),
    }
    env = job_env()  # with the moto server's AWS_* variables
    for job, (args, message) in runs.items():
        done = subprocess.run([PYTHON, *args, "--output", str(tmp_path / f"out-{job}"), "--num-cpus", "1",
                               "--object-store-memory", str(128 << 20), "--no-progress-bars"], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
        text = done.stdout + done.stderr
        assert done.returncode == 2, text[-3000:]
        assert re.search(message, text) and "Traceback" not in text, text[-3000:]
        assert not (tmp_path / f"out-{job}").exists()
