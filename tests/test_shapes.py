"""The bundled `shapes` models do the task end to end: fresh shape pictures (never the training set) captioned through
the caption job on the session's local Ray, shape prompts rendered through the paint job and graded by a simple pixel
check, the same in bf16 where the CPU has it, and a caption that does not depend on its batch."""

from __future__ import annotations

import io
import json
import random
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipelines import CaptionJobConfig, PaintJobConfig, run_caption_job, run_paint_job

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import shapes_data as D  # noqa: E402

pytestmark = pytest.mark.numeric  # rerun by .ci/run on the AVX2 and baseline CPU kernels

TEST_SEED = 987_654  # the training script seeds with tools/train_shapes.py SEED; these pictures are new
JOB = {"actor_start_timeout_s": 120, "no_progress_timeout_s": 120, "progress_every_s": 5.0}


def questions(n: int, rng: random.Random) -> list[tuple[str, str]]:
    """(language, question): the task's two questions and other phrasings, the held-out ones included."""
    out = []
    for i in range(n):
        lang = ("en", "zh")[i % 2]
        pool = [D.QUESTION[lang]] * 2 + D.TRAIN_QUESTIONS[lang] + D.HELD_OUT_QUESTIONS[lang] * 2
        out.append((lang, rng.choice(pool)))
    return out


def caption_accuracy(labels: list[D.Label], langs: list[str], texts: list[str]) -> float:
    right = [D.parse_caption(t) == (lang, label.colour, label.shape) for label, lang, t in zip(labels, langs, texts)]
    return sum(right) / len(right)


def test_caption_job_names_colour_and_shape_in_the_question_language(ray_session, tmp_path):
    rng = random.Random(TEST_SEED)
    pictures = [D.sample_file(rng) for _ in range(64)]
    asked = questions(len(pictures), rng)
    pq.write_table(pa.table({"id": [f"s{i:03d}" for i in range(len(pictures))],
                             "image": pa.array([b for _, b in pictures], pa.binary()),
                             "question": [q for _, q in asked]}), tmp_path / "in.parquet")
    result = run_caption_job(CaptionJobConfig(
        input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out"), model="shapes", question_column="question",
        max_new_tokens=16, batch_size=16, decode_batch_size=32, num_gpus_per_worker=0, **JOB))
    assert result.succeeded and result.ok == len(pictures)
    rows = {r["key"]: r for r in pq.read_table(str(tmp_path / "out")).to_pylist()}
    texts = [rows[f"s{i:03d}"]["caption"] for i in range(len(pictures))]
    accuracy = caption_accuracy([label for label, _ in pictures], [lang for lang, _ in asked], texts)
    assert accuracy >= 0.95, list(zip([str(label) for label, _ in pictures], texts))


def render_and_grade(tmp_path: Path, images_per_prompt: int) -> tuple[float, float]:
    prompts = [{"key": f"{label.colour}-{label.shape}-{lang}", "prompt": label.caption(lang)}
               for label in D.LABELS for lang in ("en", "zh")]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in prompts),
                                            encoding="utf-8")
    result = run_paint_job(PaintJobConfig(
        input=str(tmp_path / "prompts.jsonl"), output=str(tmp_path / "renders"), output_format="parquet",
        model="shapes", images_per_prompt=images_per_prompt, steps=20, scheduler="dpmsolver", seed=TEST_SEED,
        batch_size=16, num_gpus_per_worker=0, **JOB))
    assert result.succeeded and result.ok == len(prompts) * images_per_prompt
    colour = shape = 0
    rows = pq.read_table(str(tmp_path / "renders")).to_pylist()
    for row in rows:
        want_colour, want_shape, _ = row["key"].split("-", 2)
        image = Image.open(io.BytesIO(row["image"]))
        assert image.size == (64, 64)
        got = D.classify_pixels(image)
        colour += got[0] == want_colour
        shape += got[1] == want_shape
    return colour / len(rows), shape / len(rows)


def test_paint_job_draws_the_prompted_colour_and_shape(ray_session, tmp_path):
    colour, shape = render_and_grade(tmp_path, images_per_prompt=2)
    assert colour >= 0.9 and shape >= 0.8, (colour, shape)


def bf16_supported() -> bool:
    return bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())


def test_captions_do_not_depend_on_the_batch():
    from viscpm import ChatModel, GenerationConfig

    model = ChatModel.from_pretrained("shapes")
    rng = random.Random(TEST_SEED + 1)
    pictures = [D.sample(rng) for _ in range(16)]
    asked = questions(16, rng)
    images, qs = [im for _, im in pictures], [q for _, q in asked]
    generation = GenerationConfig(max_new_tokens=16)
    batched = model.answer(images, qs, generation=generation)
    alone = [model.answer([im], [q], generation=generation)[0] for im, q in zip(images, qs)]
    assert batched == alone


@pytest.mark.skipif(not bf16_supported(), reason="this CPU has no native bf16")
def test_bf16_captions_and_paintings():
    from viscpm import ChatModel, GenerationConfig, PaintModel, SamplingConfig

    rng = random.Random(TEST_SEED + 2)
    chat = ChatModel.from_pretrained("shapes", dtype="bfloat16")
    pictures = [D.sample(rng) for _ in range(48)]
    asked = questions(len(pictures), rng)
    texts = chat.answer([im for _, im in pictures], [q for _, q in asked],
                        generation=GenerationConfig(max_new_tokens=16))
    accuracy = caption_accuracy([label for label, _ in pictures], [lang for lang, _ in asked], texts)
    assert accuracy >= 0.95, texts

    paint = PaintModel.from_pretrained("shapes", dtype="bfloat16")
    prompts = [label.caption(lang) for label in D.LABELS for lang in ("en", "zh")]
    results = paint.generate(prompts, seeds=[TEST_SEED + i for i in range(len(prompts))],
                             sampling=SamplingConfig.fast(num_inference_steps=20), batch_size=24)
    graded = [D.classify_pixels(r.image) for r in results]
    truth = [(label.colour, label.shape) for label in D.LABELS for _ in ("en", "zh")]
    colour = sum(g[0] == t[0] for g, t in zip(graded, truth)) / len(truth)
    shape = sum(g[1] == t[1] for g, t in zip(graded, truth)) / len(truth)
    assert colour >= 0.9 and shape >= 0.8, (colour, shape)
