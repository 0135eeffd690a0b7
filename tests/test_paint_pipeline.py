"""Paint pipeline (issue 6), first slice: prompt readers, seeds, expansion, the Paint stage on the tiny model, the
shared writer with the paint WebDataset layout, the paint config/CLI. No Ray here: stages are plain callables."""

from __future__ import annotations

import argparse
import io
import json
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from numeric import assert_pixels_within
from pipelines.caption import schema as S
from pipelines.core import columns as C
from pipelines.core.config import add_config_arguments, config_from_args, reference_markdown
from pipelines.paint.config import PaintJobConfig, parse_size
from pipelines.paint.schema import OUTPUT_SCHEMA, paint_members
from testing.standins import preloaded_stage
from pipelines.paint.prompts import MAX_SEED, ExpandStage, derive_seed, image_key, image_seed, plan_prompts
from pipelines.paint.schema import IMAGE_ROW_SCHEMA
from pipelines.core.inputs import InputError
from pipelines.core.output import OutputStore, reconcile
from pipelines.core.storage import locate
from pipelines.core.output import WriteStage
from pipelines.core.output.files import drop_keys, read_index

pytestmark = pytest.mark.numeric  # rerun by .ci/run on the AVX2 and baseline CPU kernels

ODD_PROMPTS = ["", "   \t ", "画一只猫在月亮上", "a cat 🐱🚀", "ctrl\x00\x01\x0b\x1b[31m\u2028end", "<ans> </s> <unk>",
               "a < b > c <image>", "x" * 20_000]


def cfg(path, **kw):
    return SimpleNamespace(input=str(path), prompt_column=kw.pop("prompt_column", "prompt"), **kw)


# ---- seeds and keys --------------------------------------------------------------------------------------------------
def test_derived_seeds_are_deterministic_distinct_and_in_range():
    seeds = {derive_seed(7, k, j) for k in ("1", "2", "a", "a-1") for j in range(4)}
    assert len(seeds) == 16 and all(0 <= s < MAX_SEED for s in seeds)
    assert derive_seed(7, "a", 0) == derive_seed(7, "a", 0) != derive_seed(8, "a", 0)
    # pinned value: a change here silently changes every derived image of every past run
    assert derive_seed(0, "1", 0) == 8164605045769181702 and derive_seed(7, "画", 3) == 7977457005286383517
    assert image_seed(41, 0, "k", 1) == 42 and image_seed(MAX_SEED - 1, 0, "k", 1) == 0
    assert image_seed(None, 3, "k", 2) == derive_seed(3, "k", 2)


def test_image_keys_are_injective():
    keys = [image_key(k, j) for k in ("a", "a-1", "a-1-0", "a-10") for j in range(11)]
    assert len(set(keys)) == len(keys)


# ---- prompt readers ------------------------------------------------------------------------------------------------
def test_txt_keeps_odd_prompts_verbatim_and_keys_are_line_numbers(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes("\n".join(ODD_PROMPTS[:7]).encode("utf-8") + b"\r\nlast\n")
    plan = plan_prompts(cfg(path))
    rows = plan.prompts.to_pylist()
    # lines 1 and 2 ("", "   \t ") are blank: no prompts (issue 20), counted; the others keep their line numbers
    assert [r["prompt_key"] for r in rows] == [str(i) for i in range(3, 9)] and plan.blank_lines == 2
    assert [r["prompt"] for r in rows] == ODD_PROMPTS[2:7] + ["last"]  # \u2028 and \x0b are NOT line breaks
    assert all(r["error_message"] is None for r in rows)
    assert plan.image_keys(2).to_pylist()[:3] == ["3-0", "3-1", "4-0"]


def test_jsonl_columns_and_error_rows(tmp_path):
    path = tmp_path / "p.jsonl"
    lines = [{"key": "a", "prompt": "cat", "negative_prompt": "blur", "seed": 5},
             {"key": "b", "prompt": None}, {"key": 3, "prompt": 12}, {"key": "d", "prompt": "dog", "seed": -1},
             {"key": "e"}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    rows = {r["prompt_key"]: r for r in plan_prompts(cfg(path)).prompts.to_pylist()}
    assert rows["a"] == {"prompt_key": "a", "prompt": "cat", "negative_prompt": "blur", "seed": 5,
                         "error_message": None}
    assert "null" in rows["b"]["error_message"] and "null" in rows["e"]["error_message"]
    assert "must be text" in rows["3"]["error_message"]
    assert "seed -1" in rows["d"]["error_message"]


@pytest.mark.parametrize("content, message", [
    ('{"text": "a"}\n', "prompt column 'prompt'"),
    ('{"key": "a", "prompt": "x"}\n{"key": "a", "prompt": "y"}\n', "more than once"),
    ('{"key": "a", "prompt": "x"}\n{"prompt": "y"}\n', "every row needs one"),
    ('{"prompt": "x"}\nnot json\n', "line 2"),
])
def test_jsonl_refused_before_work(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=message):
        plan_prompts(cfg(path))


def test_csv_quoted_newlines_custom_column_and_missing_column(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('id,text,seed\n1,"two\nlines",9\n2,"<ans>",\n', encoding="utf-8")
    rows = plan_prompts(cfg(path, prompt_column="text")).prompts.to_pylist()
    assert [(r["prompt_key"], r["prompt"], r["seed"]) for r in rows] == [("1", "two\nlines", 9), ("2", "<ans>", None)]
    with pytest.raises(InputError, match="missing prompt column 'prompt'"):
        plan_prompts(cfg(path))


def test_parquet_int_keys_duplicates_and_types(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"key": [10, 11], "prompt": ["a", None]}), path)
    rows = plan_prompts(cfg(path)).prompts.to_pylist()
    assert [r["prompt_key"] for r in rows] == ["10", "11"] and rows[1]["error_message"]
    pq.write_table(pa.table({"key": [1, 1], "prompt": ["a", "b"]}), path)
    with pytest.raises(InputError, match="more than once"):
        plan_prompts(cfg(path))
    pq.write_table(pa.table({"prompt": [1, 2]}), path)
    with pytest.raises(InputError, match="expected string"):
        plan_prompts(cfg(path))


def test_folder_of_mixed_files_prefixes_row_keys(tmp_path):
    (tmp_path / "a.txt").write_text("x\ny\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"prompt": "z"}\n', encoding="utf-8")
    (tmp_path / "_skip.txt").write_text("hidden\n", encoding="utf-8")
    keys = plan_prompts(cfg(tmp_path)).prompt_keys.to_pylist()
    assert keys == ["a.txt:1", "a.txt:2", "b.jsonl:1"]


def test_no_prompt_files(tmp_path):
    with pytest.raises(InputError, match="no prompt files"):
        plan_prompts(cfg(tmp_path))


# ---- expansion -----------------------------------------------------------------------------------------------------
def test_expand_rows_seeds_and_errors(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"key": "a", "prompt": "cat", "seed": 100}\n{"key": "b", "prompt": "dog"}\n'
                    '{"key": "c", "prompt": null}\n', encoding="utf-8")
    plan = plan_prompts(cfg(path))
    out = ExpandStage(2, base_seed=7, negative_prompt="ugly")(plan.prompts)
    assert out.schema == IMAGE_ROW_SCHEMA
    rows = out.to_pylist()
    assert [r["key"] for r in rows] == plan.image_keys(2).to_pylist()
    assert [r["seed"] for r in rows[:2]] == [100, 101]
    assert [r["seed"] for r in rows[2:4]] == [derive_seed(7, "b", 0), derive_seed(7, "b", 1)]
    assert {r["negative_prompt"] for r in rows} == {"ugly"}
    assert [r["status"] for r in rows] == ["ok"] * 4 + ["error"] * 2


# ---- paint stage on the tiny model ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_paint():
    from viscpm import PaintModel

    return PaintModel.from_pretrained("tiny")


SAMPLING = {"num_inference_steps": 2, "guidance_scale": 3.0, "height": None, "width": None, "scheduler": "ddpm"}


def paint_stage(model, batch_size=4, image_format="png"):
    from pipelines.paint.stage import PaintStage

    return preloaded_stage(PaintStage, model)("tiny", SAMPLING, model_batch_size=batch_size, image_format=image_format)


def image_rows(prompts, seeds=None, negative=None):
    table = pa.table({"prompt_key": [str(i) for i in range(len(prompts))], "prompt": prompts,
                      "negative_prompt": [negative] * len(prompts),
                      "seed": pa.array(seeds or [None] * len(prompts), pa.int64()),
                      "error_message": pa.array([None if p is not None else "input: ValueError: the prompt is null"
                                                 for p in prompts], pa.string())})
    return ExpandStage(1, base_seed=1)(table)


def test_paint_stage_renders_odd_prompts_and_passes_errors(tiny_paint):
    out = paint_stage(tiny_paint)(image_rows(ODD_PROMPTS + [None]))
    rows = out.to_pylist()
    assert [r["status"] for r in rows] == ["ok"] * len(ODD_PROMPTS) + ["error"]
    for r in rows[:-1]:
        image = Image.open(io.BytesIO(r["image"]))
        assert image.format == "PNG" and image.size == (64, 64) and image.mode == "RGB"
        assert r["size"] == "64x64" and r["steps"] == 2 and r["scheduler"] == "ddpm" and r["model"] == "tiny"
    assert rows[-1]["image"] is None and rows[-1]["error_message"] == "input: ValueError: the prompt is null"
    assert rows[ODD_PROMPTS.index("x" * 20_000)]["prompt_truncated"] is True
    assert rows[0]["prompt_truncated"] is False
    assert {r[C.ACTOR] for r in rows} <= {"local", "driver"}  # outside an actor (Ray may be up in the session)


def test_paint_stage_image_depends_only_on_prompt_and_seed(tiny_paint):
    stage = paint_stage(tiny_paint, batch_size=3)
    together = stage(image_rows(["a red cube", "画一只猫", "a red cube"], seeds=[5, 6, 7])).to_pylist()
    alone = paint_stage(tiny_paint, batch_size=1)(image_rows(["画一只猫"], seeds=[6])).to_pylist()
    # batch neighbours and batch size move a pixel by at most a level or two (one batched UNet call per step since
    # prompts of any length share it); --bitwise-reproducible is the byte-exact mode (tested with the job)
    assert_pixels_within(np.asarray(Image.open(io.BytesIO(together[1]["image"]))),
                         np.asarray(Image.open(io.BytesIO(alone[0]["image"]))), "画一只猫 in a batch of 3 vs alone")
    assert together[0]["image"] != together[2]["image"]  # another seed, another image
    again = stage(image_rows(["a red cube", "画一只猫", "a red cube"], seeds=[5, 6, 7])).to_pylist()
    assert [r["image"] for r in again] == [r["image"] for r in together]  # byte-identical rerun


def test_paint_stage_isolates_a_failing_row(tiny_paint, monkeypatch):
    stage = paint_stage(tiny_paint)
    real = tiny_paint.generate

    def flaky(prompts, *a, **kw):
        if "boom" in prompts:
            raise RuntimeError("boom")
        return real(prompts, *a, **kw)

    monkeypatch.setattr(stage.model, "generate", flaky)
    rows = stage(image_rows(["fine", "boom", "also fine"])).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "error", "ok"]
    assert rows[1]["error_message"] == "paint: RuntimeError: boom" and rows[1]["image"] is None


class BlockWord:
    """A prompt checker stand-in with PromptSafetyChecker's interface: refuses prompts containing 'forbidden'."""

    threshold = 0.5

    def scores(self, texts):
        return [0.9 if "forbidden" in t else 0.1 for t in texts]


def test_blocked_prompt_gives_a_row_without_image(tiny_paint, tmp_path, monkeypatch):
    import webdataset as wds

    stage = paint_stage(tiny_paint)
    monkeypatch.setattr(stage.model, "prompt_checker", BlockWord())
    rows = stage(image_rows(["a forbidden thing", "a fine thing"]))
    assert rows["status"].to_pylist() == ["blocked", "ok"] and rows["image"].to_pylist()[0] is None
    assert rows["prompt_flagged"].to_pylist() == [True, False] and rows["prompt_score"].to_pylist() == [0.9, 0.1]
    WriteStage(OutputStore(locate(str(tmp_path)), "webdataset", "paint", paint_members), 1, OUTPUT_SCHEMA)(rows)
    got = {s["__key__"]: s for s in wds.WebDataset([str(p) for p in tmp_path.glob("part-*.tar")],
                                                    shardshuffle=False, empty_check=False)}
    assert "png" not in got["0-0"] and json.loads(got["0-0"]["json"])["status"] == "blocked"
    assert "png" in got["1-0"]


@pytest.mark.parametrize("fmt, pil", [("png", "PNG"), ("jpg", "JPEG"), ("webp", "WEBP")])
def test_encode_image_formats_are_deterministic(fmt, pil):
    from pipelines.paint.stage import encode_image

    array = (np.arange(64 * 48 * 3) % 251).astype(np.uint8).reshape(48, 64, 3)
    data = encode_image(array, fmt)
    assert data == encode_image(array, fmt)
    image = Image.open(io.BytesIO(data))
    assert image.format == pil and image.size == (64, 48)
    if fmt != "jpg":  # lossless
        assert np.array_equal(np.asarray(image.convert("RGB")), array)


# ---- writing: shared WriteStage with the paint layout -------------------------------------------------------------------
@pytest.fixture(scope="module")
def painted(tiny_paint):
    return paint_stage(tiny_paint)(image_rows(["a", "画", "<ans>", None]))


def test_webdataset_output_reads_back_with_webdataset(tmp_path, painted):
    import webdataset as wds

    stage = WriteStage(OutputStore(locate(str(tmp_path)), "webdataset", "paint", paint_members), 1, OUTPUT_SCHEMA)
    stats = stage(painted).to_pylist()[0]
    assert (stats["rows"], stats["ok"], stats["error"]) == (4, 3, 1)
    shards = sorted(str(p) for p in tmp_path.glob("part-*.tar"))
    samples = {s["__key__"]: s for s in wds.WebDataset(shards, shardshuffle=False, empty_check=False)}
    assert sorted(samples) == ["0-0", "1-0", "2-0", "3-0"]
    meta = json.loads(samples["1-0"]["json"])
    assert meta["prompt"] == "画" and meta["key"] == "1-0" and meta["status"] == "ok" and "image" not in meta
    assert np.asarray(Image.open(io.BytesIO(samples["1-0"]["png"]))).shape == (64, 64, 3)
    assert "png" not in samples["3-0"] and json.loads(samples["3-0"]["json"])["status"] == "error"
    data = (tmp_path / stats["file"]).read_bytes()
    assert read_index(data, "webdataset").to_pylist()[1] == {"key": "1-0", "status": "ok"}
    _, left = drop_keys(data, "webdataset", {"1-0"})
    assert left["key"].to_pylist() == ["0-0", "2-0", "3-0"]
    # the shared resume store sees these files and reconciles image keys
    store = OutputStore(locate(str(tmp_path)), "webdataset", "paint", paint_members)
    assert reconcile(pa.array(["0-0", "1-0", "2-0", "3-0"]), store.data_index()).ok


def test_parquet_output_has_image_bytes(tmp_path, painted):
    WriteStage(OutputStore(locate(str(tmp_path)), "parquet", "paint", paint_members), 1, OUTPUT_SCHEMA)(painted)
    table = pq.read_table(next(tmp_path.glob("part-*.parquet")))
    assert table.schema.names == OUTPUT_SCHEMA.names
    row = table.to_pylist()[0]
    assert Image.open(io.BytesIO(row["image"])).size == (64, 64) and row["seed"] == derive_seed(1, "0", 0)


# ---- config ------------------------------------------------------------------------------------------------------------
def test_paint_config_flags_yaml_and_validation(tmp_path):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, PaintJobConfig)
    yaml_path = tmp_path / "job.yaml"
    yaml_path.write_text("steps: 30\nscheduler: dpmsolver\nimages-per-prompt: 2\n", encoding="utf-8")
    argv = ["--input", "p.txt", "--output", "out", "--size", "64", "--steps", "3", "--prompt-column", "text",
            "--output-format", "parquet", "--guidance-scale", "2.5", "--seed", "9", "--batch-size", "2",
            "--num-workers", "2", "--num-gpus-per-worker", "0.5"]
    config = config_from_args(parser.parse_args(argv), yaml_path, PaintJobConfig).validate()
    assert (config.steps, config.scheduler, config.images_per_prompt, config.size) == (3, "dpmsolver", 2, "64")
    assert config.sampling_kwargs() == {"num_inference_steps": 3, "guidance_scale": 2.5, "height": 64, "width": 64,
                                        "scheduler": "dpmsolver++"}
    assert "`--prompt-column`" in reference_markdown(PaintJobConfig)
    assert parse_size("768x512") == (768, 512) and parse_size(None) == (None, None)
    with pytest.raises(ValueError, match="multiple of 8"):
        PaintJobConfig(input="a", output="b", size="63").validate()
    with pytest.raises(ValueError, match="--images-per-prompt"):
        PaintJobConfig(input="a", output="b", images_per_prompt=0).validate()
    with pytest.raises(ValueError, match="--rerank needs --reranker"):
        PaintJobConfig(input="a", output="b", rerank=4).validate()
    with pytest.raises(ValueError, match="--reranker needs --rerank N"):
        PaintJobConfig(input="a", output="b", reranker="/models/clip").validate()
    with pytest.raises(ValueError, match="--cpus-per-worker must be >= 0"):
        PaintJobConfig(input="a", output="b", cpus_per_worker=-1).validate()
    assert PaintJobConfig(input="a", output="b", rerank=4, reranker="/models/clip").validate().rerank == 4
