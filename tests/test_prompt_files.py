"""Prompt files as benchmarks ship them (issue 20): PartiPrompts' `.tsv`, DrawBench's `Prompts,Category` CSV, COCO
captions (jsonl/parquet keyed by `id`), `--prompt-column` candidates over a folder of differently headed files,
`--key-column`, `--keep-columns` carried into every image row (Parquet column, WebDataset json), blank `.txt` lines
that are no prompts."""

from __future__ import annotations

import datetime
import decimal
import json
import logging
import tarfile
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import InputError, PaintJobConfig, run_paint_job
from pipelines.core.output.files import json_member
from pipelines.paint.prompts import ExpandStage, plan_prompts
from pipelines.paint.schema import IMAGE_ROW_SCHEMA

CANDIDATES = "Prompt,Prompts,caption,text"
JOB = {"steps": 2, "num_workers": 1, "batch_size": 4, "actor_start_timeout_s": 120, "no_progress_timeout_s": 120,
       "progress_every_s": 5.0}

PARTI = ("Prompt\tCategory\tChallenge\tNote\n"
         "bond\tAbstract\tBasic\t\n"
         'A sign that says "Hello, World"\tWorld Knowledge\tWriting & Symbols\tquotes are text\n'
         "a cat,\tAnimals\tSimple Detail\t\n")
DRAWBENCH = 'Prompts,Category\n"A red colored car.",Colors\n"A black colored banana, with ""quotes"".",Colors\n'
COCO = [{"image_id": 179765, "id": 38, "caption": "A black Honda motorcycle parked in front of a garage."},
        {"image_id": 179765, "id": 182, "caption": "A Honda motorcycle parked in a grass driveway"},
        {"image_id": 190236, "id": 401, "caption": "An office cubicle with four different types of computers."}]


def cfg(path, **kw) -> SimpleNamespace:
    """The plan reads only these fields of the job config; the real config's parsing is tested below."""
    config = PaintJobConfig(input=str(path), output="o", **kw)
    return SimpleNamespace(input=config.input, prompt_column=config.prompt_column, key_column=config.key_column,
                           keep_columns=config.keep_columns)


def write_coco(folder, name="captions.jsonl"):
    (folder / name).write_text("".join(json.dumps(r) + "\n" for r in COCO), encoding="utf-8")


# ---- the files one at a time ---------------------------------------------------------------------------------------
def test_partiprompts_tsv_with_its_columns_kept(tmp_path):
    (tmp_path / "PartiPrompts.tsv").write_text(PARTI, encoding="utf-8")
    plan = plan_prompts(cfg(tmp_path / "PartiPrompts.tsv", prompt_column="Prompt",
                            keep_columns=["Category", "Challenge", "Note"]))
    rows = plan.prompts.to_pylist()
    assert [r["prompt_key"] for r in rows] == ["1", "2", "3"]
    # tab-separated without quoting: quotes and commas are prompt text
    assert [r["prompt"] for r in rows] == ["bond", 'A sign that says "Hello, World"', "a cat,"]
    assert [r["Category"] for r in rows] == ["Abstract", "World Knowledge", "Animals"]
    assert [r["Note"] for r in rows] == ["", "quotes are text", ""]
    assert [f.name for f in plan.keep_fields] == ["Category", "Challenge", "Note"]
    assert all(r["error_message"] is None for r in rows)


def test_drawbench_csv_keeps_the_category(tmp_path):
    (tmp_path / "drawbench.csv").write_text(DRAWBENCH, encoding="utf-8")
    rows = plan_prompts(cfg(tmp_path / "drawbench.csv", prompt_column="Prompts", keep_columns=["Category"])
                        ).prompts.to_pylist()
    assert [(r["prompt"], r["Category"]) for r in rows] == [("A red colored car.", "Colors"),
                                                           ('A black colored banana, with "quotes".', "Colors")]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_coco_captions_keyed_by_id_with_image_id_kept(tmp_path, fmt):
    if fmt == "jsonl":
        write_coco(tmp_path, "captions.jsonl")
    else:
        pq.write_table(pa.Table.from_pylist(COCO), tmp_path / "captions.parquet")
    plan = plan_prompts(cfg(tmp_path / f"captions.{fmt}", prompt_column="caption", key_column="id",
                            keep_columns=["image_id", "id=coco_id"]))
    rows = plan.prompts.to_pylist()
    assert [r["prompt_key"] for r in rows] == ["38", "182", "401"]
    assert [r["prompt"] for r in rows] == [r["caption"] for r in COCO]
    assert [(r["image_id"], r["coco_id"]) for r in rows] == [(179765, 38), (179765, 182), (190236, 401)]
    assert [(f.name, f.type) for f in plan.keep_fields] == [("image_id", pa.int64()), ("coco_id", pa.int64())]


def test_duplicate_and_missing_keys_of_a_named_key_column_are_refused(tmp_path):
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({**r, "id": 7}) + "\n" for r in COCO), encoding="utf-8")
    with pytest.raises(InputError, match=r"1 ids occur more than once \(prompt 'id' column.*7"):
        plan_prompts(cfg(tmp_path / "c.jsonl", prompt_column="caption", key_column="id"))
    (tmp_path / "c.jsonl").write_text(json.dumps({"caption": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"c\.jsonl: missing key column 'id' \(--key-column"):
        plan_prompts(cfg(tmp_path / "c.jsonl", prompt_column="caption", key_column="id"))
    (tmp_path / "c.tsv").write_text("caption\tidx\nx\t1\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"c\.tsv: missing key column 'id'.*Header: \['caption', 'idx'\]"):
        plan_prompts(cfg(tmp_path / "c.tsv", prompt_column="caption", key_column="id"))
    (tmp_path / "p.txt").write_text("x\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"p\.txt: a \.txt file has no columns, so no key column 'id'"):
        plan_prompts(cfg(tmp_path / "p.txt", key_column="id"))
    # without --key-column the optional `key` column is still the key, and duplicates are still refused
    (tmp_path / "d.csv").write_text("key,prompt\na,x\na,y\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"more than once"):
        plan_prompts(cfg(tmp_path / "d.csv"))


def test_blank_txt_lines_are_no_prompts_and_are_counted(tmp_path):
    (tmp_path / "p.txt").write_bytes(b"first\n\n   \n\r\nsecond\r\n\t\nthird")
    plan = plan_prompts(cfg(tmp_path / "p.txt"))
    assert [(r["prompt_key"], r["prompt"]) for r in plan.prompts.to_pylist()] == [
        ("1", "first"), ("5", "second"), ("7", "third")]
    assert plan.blank_lines == 4
    # a whitespace-only prompt where a column holds it is still a prompt (only .txt lines are separators)
    (tmp_path / "p.jsonl").write_text('{"prompt": "  "}\n', encoding="utf-8")
    assert plan_prompts(cfg(tmp_path / "p.jsonl")).prompts["prompt"].to_pylist() == ["  "]


# ---- a folder of differently headed files -------------------------------------------------------------------------
def test_prompt_column_candidates_over_a_folder_of_mixed_files(tmp_path, caplog):
    (tmp_path / "parti.tsv").write_text(PARTI, encoding="utf-8")
    (tmp_path / "drawbench.csv").write_text(DRAWBENCH, encoding="utf-8")
    write_coco(tmp_path, "coco.jsonl")
    pq.write_table(pa.table({"text": ["from parquet"], "Category": ["Parquet"]}), tmp_path / "t.parquet")
    (tmp_path / "plain.txt").write_text("plain one\n\nplain two\n", encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="pipelines.paint.prompts"):
        plan = plan_prompts(cfg(tmp_path, prompt_column=CANDIDATES, keep_columns=["Category", "image_id"]))
    rows = {r["prompt_key"]: r for r in plan.prompts.to_pylist()}
    assert rows["parti.tsv:2"]["prompt"] == 'A sign that says "Hello, World"'
    assert rows["drawbench.csv:1"]["prompt"] == "A red colored car."
    assert rows["coco.jsonl:3"]["prompt"] == COCO[2]["caption"]
    assert rows["t.parquet:1"]["prompt"] == "from parquet"
    assert rows["plain.txt:3"]["prompt"] == "plain two" and plan.blank_lines == 1
    assert len(rows) == 3 + 2 + 3 + 1 + 2
    assert [rows[k]["Category"] for k in ("parti.tsv:1", "drawbench.csv:2", "t.parquet:1", "coco.jsonl:1")] == [
        "Abstract", "Colors", "Parquet", None]
    assert rows["coco.jsonl:2"]["image_id"] == 179765 and rows["plain.txt:1"]["image_id"] is None
    # the log names the column each file's prompts came from
    for column, name in (("Prompt", "parti.tsv"), ("Prompts", "drawbench.csv"), ("caption", "coco.jsonl"),
                         ("text", "t.parquet")):
        assert f"'{column}' in 1 file(s): '{name}'" in caplog.text
    # a file with none of the candidates is refused, naming them and its header
    (tmp_path / "other.csv").write_text("title\nx\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"other\.csv: missing any of the prompt columns \['Prompt', 'Prompts', "
                                         r"'caption', 'text'\].*Header: \['title'\]"):
        plan_prompts(cfg(tmp_path, prompt_column=CANDIDATES))


def test_keep_columns_typos_type_clashes_and_output_collisions(tmp_path):
    (tmp_path / "a.csv").write_text("prompt,n\nx,1\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"--keep-columns 'm' is in none of the 1 prompt files"):
        plan_prompts(cfg(tmp_path, keep_columns=["m"]))
    pq.write_table(pa.table({"prompt": ["y"], "n": [2]}), tmp_path / "b.parquet")
    with pytest.raises(InputError, match=r"--keep-columns 'n' has types that do not combine.*string in .*a\.csv; "
                                         r"int64 in .*b\.parquet"):
        plan_prompts(cfg(tmp_path, keep_columns=["n"]))
    with pytest.raises(ValueError, match=r"--keep-columns 'prompt'.*collides with the output column 'prompt'.*"
                                         r"prompt=<new name>"):
        PaintJobConfig(input="p", output="o", keep_columns=["prompt"]).validate()
    with pytest.raises(ValueError, match=r"'key'.*collides with the output column 'key'.*key=<new name>"):
        PaintJobConfig(input="p", output="o", keep_columns="key").validate()
    PaintJobConfig(input="p", output="o", keep_columns="key=source_key,Category").validate()


def test_config_parses_candidates_and_old_outputs_keep_their_fingerprint():
    config = PaintJobConfig(input="p", output="o", prompt_column=CANDIDATES, keep_columns="a, b=c").validate()
    assert config.prompt_column == ["Prompt", "Prompts", "caption", "text"] and config.keep_columns == ["a", "b=c"]
    assert config.fingerprint()["prompt_column"] == ["Prompt", "Prompts", "caption", "text"]
    # at their defaults the new options leave the fingerprint as it was before they existed (outputs still resume)
    fp = PaintJobConfig(input="p", output="o").fingerprint()
    assert fp["prompt_column"] == "prompt" and "key_column" not in fp and "keep_columns" not in fp
    fp = PaintJobConfig(input="p", output="o", key_column="id", keep_columns=["x"]).fingerprint()
    assert fp["key_column"] == "id" and fp["keep_columns"] == ["x"]


def test_expand_repeats_keep_columns_on_every_image_row(tmp_path):
    write_coco(tmp_path)
    plan = plan_prompts(cfg(tmp_path / "captions.jsonl", prompt_column="caption", key_column="id",
                            keep_columns=["image_id"]))
    out = ExpandStage(2, base_seed=1)(plan.prompts.slice(1))  # a batch not starting at the table's first row
    assert out.schema.names == [*IMAGE_ROW_SCHEMA.names, "image_id"]
    assert out["key"].to_pylist() == ["182-0", "182-1", "401-0", "401-1"]
    assert out["image_id"].to_pylist() == [179765, 179765, 190236, 190236]


def test_kept_columns_of_types_json_lacks_reach_the_webdataset_json(tmp_path):
    """A Parquet prompt file's timestamp and decimal columns, kept: the `json` member holds their text."""
    pq.write_table(pa.table({"prompt": ["a cat"], "when": pa.array([datetime.datetime(2026, 1, 2, 3, 4)]),
                             "price": pa.array([decimal.Decimal("1.50")], pa.decimal128(5, 2))}),
                   tmp_path / "p.parquet")
    plan = plan_prompts(cfg(tmp_path / "p.parquet", keep_columns=["when", "price"]))
    row = ExpandStage(1, base_seed=1)(plan.prompts).to_pylist()[0]
    member = json.loads(json_member(row))
    assert member["when"] == "2026-01-02T03:04:00" and member["price"] == "1.50" and member["prompt"] == "a cat"


# ---- end to end: the tiny model on the session's local Ray ---------------------------------------------------------
def test_coco_jsonl_to_parquet_with_kept_columns(ray_session, tmp_path):
    write_coco(tmp_path)
    out = tmp_path / "out"
    result = run_paint_job(PaintJobConfig(input=str(tmp_path / "captions.jsonl"), output=str(out),
                                          output_format="parquet", prompt_column=CANDIDATES, key_column="id",
                                          keep_columns=["image_id", "id=coco_id"], images_per_prompt=2, **JOB))
    assert result.succeeded and result.ok == 6, result.reconciliation.problems()
    table = pq.read_table(str(out))
    assert table.schema.field("image_id").type == pa.int64() and table.schema.names[-1] == "image"
    rows = {r["key"]: r for r in table.to_pylist()}
    assert sorted(rows) == ["182-0", "182-1", "38-0", "38-1", "401-0", "401-1"]
    assert {k: (r["image_id"], r["coco_id"], r["prompt"]) for k, r in rows.items() if k.endswith("-1")} == {
        f"{c['id']}-1": (c["image_id"], c["id"], c["caption"]) for c in COCO}


def test_partiprompts_tsv_in_a_folder_to_webdataset_json(ray_session, tmp_path):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "parti.tsv").write_text(PARTI, encoding="utf-8")
    (prompts / "extra.txt").write_text("one more\n\n", encoding="utf-8")
    out = tmp_path / "out"
    result = run_paint_job(PaintJobConfig(input=str(prompts), output=str(out), prompt_column="Prompt",
                                          keep_columns=["Category", "Challenge=parti_challenge"], **JOB))
    assert result.succeeded and result.ok == 4, result.reconciliation.problems()
    metas = {}
    for shard in sorted(out.glob("part-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    metas[meta["key"]] = meta
    assert sorted(metas) == ["extra.txt:1-0", "parti.tsv:1-0", "parti.tsv:2-0", "parti.tsv:3-0"]
    assert metas["parti.tsv:2-0"]["Category"] == "World Knowledge"
    assert metas["parti.tsv:2-0"]["parti_challenge"] == "Writing & Symbols"
    assert metas["extra.txt:1-0"]["Category"] is None and "Challenge" not in metas["parti.tsv:1-0"]
    summary = json.loads((out / "_summary.json").read_text(encoding="utf-8"))
    assert summary["blank_lines_skipped"] == 1
