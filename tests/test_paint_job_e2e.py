"""The paint job end to end with real parts only (the session's local Ray, moto S3, the tiny random-weight model,
tiny random REAL prompt checker / image checker / reranker folders, the `webdataset` reader, PIL):

1. the number of actors never changes a byte; --batch-size keeps the pictures but may move a value by a level or
   two, unless --bitwise-reproducible (one image per model call): then not a byte;
2. a resumed run (an interrupted output) renders only what is missing and gives the uninterrupted run's bytes;
3. the optional components loaded by the actors from folders: blocked rows, blacked-out NSFW images, best-of-N,
   and --retry-errors keeping the blocked rows;
4. prompts, model and parquet output on S3 (AWS_* variables only);
5. jpg / webp images.
"""

from __future__ import annotations

import functools
import io
import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from numeric import assert_pixels_within
from pipelines.paint.config import PaintJobConfig
from pipelines.paint.job import run_paint_job
from pipelines.paint.stage import encode_image
from pipelines.paint.prompts import derive_seed
from pipelines.core.output.files import CHECKPOINT_DIR, checkpoint_name

pytestmark = pytest.mark.numeric  # rerun by .ci/run on the AVX2 and baseline CPU kernels

FAST = {"steps": 2, "guidance_scale": 3.0, "actor_start_timeout_s": 120, "no_progress_timeout_s": 120}


# ---- helpers ---------------------------------------------------------------------------------------------------------
def read_samples(folder: Path) -> dict[str, dict]:
    """key -> raw WebDataset sample (member suffix -> bytes), read with the `webdataset` library."""
    import webdataset as wds

    shards = sorted(str(p) for p in folder.glob("part-*.tar"))
    out: dict[str, dict] = {}
    for sample in wds.WebDataset(shards, shardshuffle=False, empty_check=False):
        assert sample["__key__"] not in out, f"key {sample['__key__']} twice in the output"
        out[sample["__key__"]] = sample
    return out


def images_of(samples: dict[str, dict], suffix: str = "png") -> dict[str, bytes]:
    return {k: s[suffix] for k, s in samples.items()}


def meta(sample: dict) -> dict:
    return json.loads(sample["json"])


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def summary_of(folder: Path) -> dict:
    return json.loads((folder / "_summary.json").read_text(encoding="utf-8"))


def write_txt(path: Path, prompts: list[str]) -> Path:
    path.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    return path


def run_ok(config: PaintJobConfig):
    result = run_paint_job(config)
    assert result.succeeded, result.reconciliation.problems()
    return result


def assert_same_picture(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """Equal up to the documented tolerance: where CPU kernels differ (batch shape, torch thread count: the actors
    run single-threaded, this process does not) a value may move by a level or two."""
    assert_pixels_within(got, want, what)


def expected_image(prompt: str, negative: str | None, seed: int) -> np.ndarray:
    """The tiny model's image for one row, rendered alone in this process with the job's sampling settings."""
    from viscpm.paint import SamplingConfig

    model = _tiny_model()
    sampling = SamplingConfig(**PaintJobConfig(input="x", output="y", **FAST).sampling_kwargs())
    return model.generate([prompt], [negative], seeds=[seed], sampling=sampling, output="np")[0].image


@functools.cache
def _tiny_model() -> Any:
    from viscpm.paint import PaintModel

    return PaintModel.tiny()


# ==== 1 + 2: --num-workers, --batch-size and a resume against the bytes ===============================================
# two 1-char prompts share a text length, so batch_size=3 puts different prompts into one UNet call
PROMPTS = ["a red cube", "画一只猫在月亮上", "b", "c", "<ans></s> odd \x1b[31m 🐱\u2028"]
KEYS = sorted(f"{i}-{j}" for i in range(1, len(PROMPTS) + 1) for j in range(2))


@pytest.fixture(scope="module")
def batching_runs(ray_session, tmp_path_factory):
    """The same prompts rendered one image per model call by one actor, three per call by two actors, three per
    call by one actor, and three rows per actor call but one image per model call (--bitwise-reproducible) by two
    actors."""
    root = tmp_path_factory.mktemp("batching")
    prompts = write_txt(root / "prompts.txt", PROMPTS)
    base = {"input": str(prompts), "images_per_prompt": 2, "seed": 5, **FAST}
    configs = {"single": PaintJobConfig(output=str(root / "single"), batch_size=1, num_workers=1, rows_per_file=3,
                                        **base),
               "batched": PaintJobConfig(output=str(root / "batched"), batch_size=3, num_workers=2, rows_per_file=3,
                                         **base),
               "batched-1": PaintJobConfig(output=str(root / "batched-1"), batch_size=3, num_workers=1,
                                           rows_per_file=3, **base),
               "exact": PaintJobConfig(output=str(root / "exact"), batch_size=3, num_workers=2, rows_per_file=2,
                                       bitwise_reproducible=True, **base)}
    results = {name: run_ok(config) for name, config in configs.items()}
    return root, configs, results


def test_workers_keep_the_bytes_and_batch_size_the_pictures(batching_runs):
    root, _, results = batching_runs
    single, batched, one_actor = (read_samples(root / n) for n in ("single", "batched", "batched-1"))
    assert sorted(single) == sorted(batched) == sorted(one_actor) == KEYS
    assert {r.processed for r in results.values()} == {len(KEYS)}
    assert len(summary_of(root / "batched")["actors"]) == 2 and len(summary_of(root / "batched-1")["actors"]) == 1
    for key in KEYS:
        prompt_key, index = key.rsplit("-", 1)
        assert Image.open(io.BytesIO(single[key]["png"])).size == (64, 64)
        assert meta(single[key])["seed"] == meta(batched[key])["seed"] == derive_seed(5, prompt_key, int(index))
        assert meta(single[key])["prompt"] == meta(batched[key])["prompt"] == PROMPTS[int(prompt_key) - 1]
    assert len(set(images_of(single).values())) == len(KEYS)  # every (prompt, index) is its own image
    # the number of actors never changes a byte (the same rows meet in the same model calls)
    assert images_of(batched) == images_of(one_actor)
    # --batch-size: the same pictures, but NOT always the same bytes: a UNet/VAE call on 3 images computes each
    # image's floats slightly differently from a call on 1 (CPU kernels depend on the batch shape), and the rounding
    # to uint8 can move a value by a level or two (README: "within 2 uint8 levels of itself alone").
    for key in KEYS:
        assert_pixels_within(pixels(batched[key]["png"]), pixels(single[key]["png"]), f"{key} batched vs single")
    # --bitwise-reproducible: other --batch-size, --num-workers and --rows-per-file, and not a byte differs; it
    # really made one model call per image (the batched run did not), so the equality is not a coincidence of sizes
    assert images_of(read_samples(root / "exact")) == images_of(single)
    model_calls = {n: sum(a["batches"] for a in summary_of(root / n)["actors"].values()) for n in ("exact", "batched")}
    assert model_calls["exact"] == len(KEYS) > model_calls["batched"], model_calls


def test_resume_after_an_interrupted_run_gives_the_same_bytes(batching_runs, tmp_path):
    """An output as a killed run leaves it (one data file never written, one written without its checkpoint, a
    temporary file, the run never finished), resumed with the same settings but two actors: only the missing images
    are rendered, and every image is byte-identical to the uninterrupted run's (batch_size=1: one image per model
    call, see the test above)."""
    root, configs, _ = batching_runs
    out = tmp_path / "resumed"
    shutil.copytree(root / "single", out)
    files = sorted(out.glob("part-*.tar"))
    assert len(files) >= 3
    lost = set(read_samples_of(files[0])) | set(read_samples_of(files[1]))
    files[0].unlink()  # never written: neither data file nor checkpoint
    (out / CHECKPOINT_DIR / checkpoint_name(files[0].name)).unlink()
    (out / CHECKPOINT_DIR / checkpoint_name(files[1].name)).unlink()  # killed between data file and checkpoint
    (out / "_tmp-0123abcd.tar").write_bytes(b"half a tar")  # an atomic write that never finished
    job = json.loads((out / "_job.json").read_text())
    job["runs"][-1].update(finished=None, ok=None)
    (out / "_job.json").write_text(json.dumps(job))
    (out / "_summary.json").unlink()

    result = run_ok(PaintJobConfig(**{**configs["single"].__dict__, "output": str(out), "num_workers": 2}))
    assert result.run == 2
    assert (result.processed, result.skipped) == (len(lost), len(KEYS) - len(lost))
    assert result.ok == len(lost) and result.error == 0
    assert not list(out.glob("_tmp-*")) and not files[1].exists()  # the orphan data file was cleaned up
    resumed = read_samples(out)
    assert sorted(resumed) == KEYS
    assert images_of(resumed) == images_of(read_samples(root / "single"))
    summary = summary_of(out)
    assert summary["run"] == 2 and summary["reconciliation"]["ok"] and summary["processed_this_run"] == len(lost)
    assert [r["run"] for r in json.loads((out / "_job.json").read_text())["runs"]] == [1, 2]


def read_samples_of(tar: Path) -> dict[str, dict]:
    import webdataset as wds

    return {s["__key__"]: s for s in wds.WebDataset([str(tar)], shardshuffle=False, empty_check=False)}


# ==== 3: the optional components, real and loaded by the actors from folders ==========================================
COMPONENT_ROWS = [
    {"key": "cat", "prompt": "a red cat"},  # refused by the prompt checker
    {"key": "zh-sea", "prompt": "猫 海边"},  # refused by the prompt checker
    {"key": "dog", "prompt": "the dog sky"},  # rendered; every candidate is flagged by the image checker
    {"key": "moon", "prompt": "画一只猫在月亮上"},  # rendered; no candidate is flagged
    {"key": "null", "prompt": None},  # an input error row
]
BLOCKED_KEYS, FLAGGED_KEY, CLEAN_KEY = ("cat", "zh-sea"), "dog", "moon"
# --rerank N: not the original's 4, so a job that ignored N would draw a 4th, unflagged candidate for FLAGGED_KEY
CANDIDATES = 3


def _refuse_only(folder: Path, texts: list[str], refused: set[str]) -> None:
    """Give the real BERT checker in `folder` a classification head that refuses exactly `refused` among `texts`
    (logit margin +-4: P(unsafe) 0.982 / 0.018 against the 0.75 threshold), and save it back to the folder."""
    from viscpm.safety import PromptSafetyChecker

    checker = PromptSafetyChecker.from_folder(folder)
    batch = checker.tokenizer(texts, padding=True, truncation=True, max_length=checker.max_length,
                              return_tensors="pt")
    with torch.no_grad():
        pooled = checker.model.bert(**batch).pooler_output.double()
    design = torch.cat([pooled, torch.ones(len(texts), 1, dtype=torch.float64)], 1)
    target = torch.tensor([4.0 if t in refused else -4.0 for t in texts], dtype=torch.float64)
    solution = torch.linalg.lstsq(design, target[:, None], driver="gelsd").solution[:, 0]
    with torch.no_grad():
        checker.model.classifier.weight.zero_()
        checker.model.classifier.weight[1] = solution[:-1].float()
        checker.model.classifier.bias.copy_(torch.tensor([0.0, float(solution[-1])]))
    checker.model.save_pretrained(folder)


def _flag_images(folder: Path, flag: list[np.ndarray], keep: list[np.ndarray]) -> Any:
    """Make the real image checker in `folder` flag each image of `flag` (one concept per image, its own embedding)
    and none of `keep`, and save it back. diffusers flags when round(cosine - threshold, 3) > 0."""
    from safety_fixtures import image_embedding

    from viscpm.safety import ImageSafetyChecker

    checker = ImageSafetyChecker.from_folder(folder)
    flagged = torch.nn.functional.normalize(torch.stack([image_embedding(checker, im) for im in flag]), dim=1)
    kept = torch.nn.functional.normalize(torch.stack([image_embedding(checker, im) for im in keep]), dim=1)
    closest = (flagged @ kept.T).max(dim=1).values  # per concept: the most similar image that must stay clean
    assert closest.max() < 0.997, f"the images to flag and to keep are too alike for a threshold: {closest}"
    with torch.no_grad():
        checker.model.special_care_embeds_weights.fill_(2.0)  # cosine never exceeds 2: never fires
        checker.model.concept_embeds_weights.fill_(2.0)
        for i, embedding in enumerate(flagged):
            checker.model.concept_embeds[i] = embedding
            checker.model.concept_embeds_weights[i] = (float(closest[i]) + 0.999) / 2
    checker.model.save_pretrained(folder)
    reloaded = ImageSafetyChecker.from_folder(folder)
    assert reloaded.check(flag + keep) == [True] * len(flag) + [False] * len(keep)
    return reloaded


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    """Tiny real component folders, set up so the job's outcome is known in advance; the expected results of the
    two rendered rows are computed here with the model and components in this process."""
    pytest.importorskip("transformers")
    from safety_fixtures import (
        build_image_checker_folder,
        build_prompt_checker_folder,
        build_reranker_folder,
    )

    from viscpm.paint import SamplingConfig, candidate_seed
    from viscpm.safety import ClipReranker, PromptSafetyChecker

    root = tmp_path_factory.mktemp("components")
    folders = {"prompt": build_prompt_checker_folder(root / "prompt-checker"),
               "image": build_image_checker_folder(root / "image-checker"),
               "rerank": build_reranker_folder(root / "reranker")}
    prompts = {r["key"]: r["prompt"] for r in COMPONENT_ROWS if r["prompt"] is not None}
    _refuse_only(folders["prompt"], list(prompts.values()), {prompts[k] for k in BLOCKED_KEYS})
    checker = PromptSafetyChecker.from_folder(folders["prompt"])
    scores = dict(zip(prompts, checker.scores(list(prompts.values()))))
    assert {k for k, s in scores.items() if s > checker.threshold} == set(BLOCKED_KEYS)

    model = _tiny_model()
    sampling = SamplingConfig(**PaintJobConfig(input="x", output="y", **FAST).sampling_kwargs())
    candidates = {key: [model.generate([prompts[key]], seeds=[candidate_seed(derive_seed(0, key, 0), c)],
                                       sampling=sampling, output="np")[0].image for c in range(CANDIDATES)]
                  for key in (FLAGGED_KEY, CLEAN_KEY)}
    image_checker = _flag_images(folders["image"], candidates[FLAGGED_KEY], candidates[CLEAN_KEY])
    # had the job drawn the original's 4 candidates, the 4th would be clean and FLAGGED_KEY's image kept
    extra = model.generate([prompts[FLAGGED_KEY]], seeds=[candidate_seed(derive_seed(0, FLAGGED_KEY, 0), CANDIDATES)],
                           sampling=sampling, output="np")[0].image
    assert image_checker.check([extra]) == [False]
    ranker = ClipReranker.from_folder(folders["rerank"])
    rerank = ranker.scores(prompts[CLEAN_KEY], [Image.fromarray(c) for c in candidates[CLEAN_KEY]])
    best = int(np.argmax(rerank))
    assert max(rerank) - sorted(rerank)[-2] > 1e-3, f"reranker scores too close to call: {rerank}"
    return folders, {"prompt_scores": scores, "clean_candidate": best, "clean_score": rerank[best],
                     "clean_image": candidates[CLEAN_KEY][best]}


def test_real_prompt_checker_image_checker_and_reranker_end_to_end(ray_session, components, tmp_path):
    folders, expected = components
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in COMPONENT_ROWS),
                                            encoding="utf-8")
    config = PaintJobConfig(input=str(tmp_path / "prompts.jsonl"), output=str(tmp_path / "out"), batch_size=4,
                            num_workers=1, rows_per_file=2, prompt_safety=str(folders["prompt"]),
                            image_safety=str(folders["image"]), rerank=CANDIDATES, reranker=str(folders["rerank"]),
                            **FAST)
    result = run_ok(config)
    keys = [f"{r['key']}-0" for r in COMPONENT_ROWS]
    statuses = {"ok": 2, "blocked": 2, "error": 1}
    assert result.processed == 5 and result.statuses == statuses and result.blocked_rows == 2
    summary = summary_of(tmp_path / "out")
    assert summary["blocked_rows"] == 2 and summary["reconciliation"]["statuses"] == statuses
    assert summary["reconciliation"]["ok"] and summary["reconciliation"]["output_rows"] == 5

    def check(samples: dict[str, dict]) -> None:
        assert sorted(samples) == sorted(keys)
        for key in BLOCKED_KEYS:  # refused: a json member and no image
            sample = samples[f"{key}-0"]
            assert set(sample) - {"__key__", "__url__", "__local_path__"} == {"json"}
            m = meta(sample)
            assert m["status"] == "blocked" and m["prompt_flagged"] is True and m["error_message"] is None
            assert m["prompt_score"] == pytest.approx(expected["prompt_scores"][key], abs=1e-3)
            assert m["prompt_score"] > 0.75 and m["nsfw"] is None and m["rerank_score"] is None
        for key in (FLAGGED_KEY, CLEAN_KEY):
            m = meta(samples[f"{key}-0"])
            assert m["status"] == "ok" and m["prompt_flagged"] is False and m["prompt_score"] < 0.75
            assert m["prompt_score"] == pytest.approx(expected["prompt_scores"][key], abs=1e-3)
            assert m["rerank_score"] is not None and m["candidate"] in range(CANDIDATES)
        flagged = samples[f"{FLAGGED_KEY}-0"]
        assert meta(flagged)["nsfw"] is True and not pixels(flagged["png"]).any()  # blacked out
        clean = samples[f"{CLEAN_KEY}-0"]
        m = meta(clean)
        assert m["nsfw"] is False and m["candidate"] == expected["clean_candidate"]
        assert m["rerank_score"] == pytest.approx(expected["clean_score"], abs=1e-3)
        assert m["seed"] == derive_seed(0, CLEAN_KEY, 0)  # the requested seed, not the kept candidate's
        assert_same_picture(pixels(clean["png"]), expected["clean_image"], "the kept candidate")
        error = meta(samples["null-0"])
        assert error["status"] == "error" and error["error_message"] == "input: ValueError: the prompt is null"
        assert set(samples["null-0"]) - {"__key__", "__url__", "__local_path__"} == {"json"}

    first = read_samples(tmp_path / "out")
    check(first)

    # --retry-errors: "blocked" is a final answer; only the error row goes through the pipeline again
    retry = run_ok(PaintJobConfig(**{**config.__dict__, "retry_errors": True}))
    assert (retry.run, retry.processed, retry.skipped, retry.blocked_rows) == (2, 1, 4, 2)
    again = read_samples(tmp_path / "out")
    check(again)
    assert {k: s.get("png") for k, s in again.items()} == {k: s.get("png") for k, s in first.items()}
    summary = summary_of(tmp_path / "out")
    assert summary["reconciliation"]["statuses"] == statuses and summary["reconciliation"]["ok"]
    assert summary["config"]["retry_errors"] is True


# ==== 4: parquet on S3, the model from an s3:// prefix ================================================================
def save_tiny_paint_folder(folder: Path) -> Path:
    """The tiny model as a converted model folder: model.safetensors (vae.* inside), bee.txt, viscpm_config.json."""
    from safetensors.torch import save_file

    from viscpm.tokenizer import synthetic_vocab

    model = _tiny_model()
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.original_state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "bee.txt").write_text("\n".join(synthetic_vocab()), encoding="utf-8")
    (folder / "viscpm_config.json").write_text(json.dumps(model.config.to_dict()), encoding="utf-8")
    return folder


def test_s3_parquet_prompts_and_model_to_parquet_on_s3(ray_session, s3, tmp_path):
    """Prompts (parquet: key, prompt, negative_prompt, seed), the model folder and the output all on S3, configured
    only by the AWS_* variables of this process."""
    import pyarrow as pa

    from pipelines.core.model_cache import DONE_MARKER
    from pipelines.paint.schema import OUTPUT_SCHEMA

    bucket = s3.bucket("paint-e2e")
    fs = s3.fs()
    model_dir = save_tiny_paint_folder(tmp_path / "tiny-paint")
    for path in model_dir.iterdir():
        fs.put_file(str(path), f"{bucket}/models/tiny-paint/{path.name}")
    rows = pa.table({"key": ["cube", "猫"], "prompt": ["a red cube", "画一只猫在月亮上"],
                     "negative_prompt": ["blurry", None], "seed": pa.array([42, None], pa.int64())})
    sink = io.BytesIO()
    pq.write_table(rows, sink)
    fs.pipe_file(f"{bucket}/prompts/list.parquet", sink.getvalue())
    model_uri = f"s3://{bucket}/models/tiny-paint"
    config = PaintJobConfig(input=f"s3://{bucket}/prompts/list.parquet", output=f"s3://{bucket}/renders/pq",
                            output_format="parquet", model=model_uri, model_cache_dir=str(tmp_path / "cache"),
                            images_per_prompt=2, negative_prompt="low quality", seed=9, batch_size=1,
                            num_workers=1, rows_per_file=3, **FAST)
    result = run_ok(config)
    assert result.processed == 4 and result.statuses == {"ok": 4}

    table = pq.read_table(f"{bucket}/renders/pq", filesystem=fs)  # `_checkpoint/`, `_*.json` are not data
    assert table.schema.names == OUTPUT_SCHEMA.names
    assert table.schema.equals(OUTPUT_SCHEMA), table.schema
    got = {r["key"]: r for r in table.to_pylist()}
    expected = {"cube-0": ("cube", 0, "a red cube", "blurry", 42), "cube-1": ("cube", 1, "a red cube", "blurry", 43),
                "猫-0": ("猫", 0, "画一只猫在月亮上", "low quality", derive_seed(9, "猫", 0)),
                "猫-1": ("猫", 1, "画一只猫在月亮上", "low quality", derive_seed(9, "猫", 1))}
    assert sorted(got) == sorted(expected)
    for key, (prompt_key, index, prompt, negative, seed) in expected.items():
        row = got[key]
        assert (row["prompt_key"], row["image_index"], row["prompt"], row["negative_prompt"], row["seed"]) == \
            (prompt_key, index, prompt, negative, seed)
        assert row["status"] == "ok" and row["error_message"] is None and row["model"] == model_uri
        image = Image.open(io.BytesIO(row["image"]))
        assert image.format == "PNG" and image.size == (64, 64) and row["size"] == "64x64"
        # the weights really are the uploaded tiny model's: the tiny model's picture for this prompt and seed
        assert_same_picture(np.asarray(image.convert("RGB")), expected_image(prompt, negative, seed), key)
    downloaded = [p.parent for p in (tmp_path / "cache").rglob(DONE_MARKER)]
    assert len(downloaded) == 1 and (downloaded[0] / "model.safetensors").is_file()
    summary = json.loads(fs.cat_file(f"{bucket}/renders/pq/_summary.json"))
    assert summary["succeeded"] and summary["reconciliation"]["ok"]
    assert summary["reconciliation"]["output_rows"] == 4 and "storage_options" not in json.dumps(summary["config"])


# ==== 5: jpg / webp images ============================================================================================
@pytest.mark.parametrize(("image_format", "pil_format"), [("jpg", "JPEG"), ("webp", "WEBP")])
def test_jpg_and_webp_images_in_webdataset(ray_session, tmp_path, image_format, pil_format):
    prompts = ["a red cube", "画一只猫"]
    write_txt(tmp_path / "p.txt", prompts)
    config = PaintJobConfig(input=str(tmp_path / "p.txt"), output=str(tmp_path / "out"), image_format=image_format,
                            batch_size=1, num_workers=1, seed=3, **FAST)
    result = run_ok(config)
    assert result.statuses == {"ok": 2}
    names = []
    for shard in sorted((tmp_path / "out").glob("part-*.tar")):
        with tarfile.open(shard) as tar:
            names += tar.getnames()
    assert sorted(names) == sorted(f"{k}-0.{suffix}" for k in ("1", "2") for suffix in (image_format, "json"))
    samples = read_samples(tmp_path / "out")
    for i, prompt in enumerate(prompts, start=1):
        sample = samples[f"{i}-0"]
        assert "png" not in sample and meta(sample)["image_format"] == image_format
        image = Image.open(io.BytesIO(sample[image_format]))
        assert image.format == pil_format and image.size == (64, 64)
        got = np.asarray(image.convert("RGB"))
        want = expected_image(prompt, None, derive_seed(3, str(i), 0))
        if image_format == "webp":
            assert_same_picture(got, want, f"{i}-0")  # lossless: the rendered pixels
        else:
            # lossy: compare with this picture through the same encoder (JPEG q95, Pillow's default 4:2:0 chroma)
            assert np.abs(got.astype(int) - pixels(encode_image(want, "jpg")).astype(int)).mean() < 1
