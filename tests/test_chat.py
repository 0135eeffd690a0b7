"""VisCPM-Chat on the tiny preset: the public API, user-text safety, vision-state reuse, loading from a folder
of original-format weights, and the conversion CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from viscpm import ChatModel, GenerationConfig
from viscpm.tokenizer import synthetic_vocab

pytestmark = pytest.mark.numeric  # rerun by .ci/run on the AVX2 and baseline CPU kernels

GEN = GenerationConfig.original(max_length=6)


@pytest.fixture(scope="module")
def chat() -> ChatModel:
    return ChatModel.from_pretrained("tiny")


def images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 256, (40 + 10 * i, 50, 3), dtype=np.uint8)) for i in range(n)]


def test_tiny_is_deterministic(chat: ChatModel) -> None:
    again = ChatModel.from_pretrained("tiny")
    assert chat.answer(images(2), ["hi", "hello"], generation=GEN) == again.answer(images(2), ["hi", "hello"], generation=GEN)


def test_batch_equals_alone_with_different_questions_and_contexts(chat: ChatModel) -> None:
    imgs = images(3)
    questions = ["What is it?", "这是什么？", "Describe 🍕 and 🎉 in detail."]
    contexts = ["", "User: hi\nAI: hello\n", "🎈"]
    batched = chat.generate(imgs, questions, contexts, generation=GEN)
    for i in range(3):
        alone = chat.generate(imgs[i : i + 1], questions[i : i + 1], contexts[i : i + 1], generation=GEN)[0]
        assert batched[i].token_ids == alone.token_ids and batched[i].text == alone.text


@pytest.mark.parametrize("question", ["a < b", "<ans>", "</s> end", "<unk>", "trailing <", "<<", "tab\there\x00\x07",
                                      "emoji 🚗🏔", "中文问题？", "x" * 20000])
def test_any_user_text_is_safe(chat: ChatModel, question: str) -> None:
    """The original crashes on `a < b` and turns `<ans>`/`</s>` into control tokens; here all are plain text."""
    result = chat.generate(images(1), [question], generation=GenerationConfig(strategy="greedy", max_new_tokens=3))[0]
    assert isinstance(result.text, str) and len(result.token_ids) <= 3
    if len(question) > 10000:
        assert result.prompt_truncated


def test_vision_states_can_be_reused(chat: ChatModel) -> None:
    imgs = images(2)
    states = chat.encode_images(imgs)
    direct = chat.generate(imgs, ["q1", "q2"], generation=GEN)
    reused = chat.generate(None, ["q1", "q2"], vision_states=states, generation=GEN)
    assert [r.token_ids for r in direct] == [r.token_ids for r in reused]


def test_mismatched_arguments_are_clear(chat: ChatModel) -> None:
    with pytest.raises(ValueError, match="one image per question"):
        chat.generate(images(1), ["a", "b"])
    with pytest.raises(ValueError, match="contexts"):
        chat.generate(images(2), ["a", "b"], contexts=["x"])
    assert chat.generate([], []) == []


def test_bfloat16_on_cpu_runs() -> None:
    low = ChatModel.from_pretrained("tiny", dtype="bfloat16")
    assert low.dtype == torch.bfloat16
    assert isinstance(low.caption(images(1), generation=GEN)[0], str)


def write_original_folder(chat: ChatModel, folder: Path) -> Path:
    folder.mkdir()
    torch.save(chat.original_state_dict(), folder / "viscpm_chat_balance_checkpoint.pt")
    (folder / "bee.txt").write_text("\n".join(synthetic_vocab()), encoding="utf-8")
    (folder / "viscpm_config.json").write_text(json.dumps(chat.config.to_dict()))
    return folder


def test_from_pretrained_original_checkpoint(chat: ChatModel, tmp_path: Path) -> None:
    folder = write_original_folder(chat, tmp_path / "original")
    loaded = ChatModel.from_pretrained(folder)
    assert loaded.answer(images(2), ["a", "b"], generation=GEN) == chat.answer(images(2), ["a", "b"], generation=GEN)


def test_convert_cli_to_safetensors_shards(chat: ChatModel, tmp_path: Path) -> None:
    src = write_original_folder(chat, tmp_path / "original")
    dst = tmp_path / "converted"
    proc = subprocess.run([sys.executable, "-m", "viscpm.convert", "chat", str(src), str(dst), "--shard-size", "100KB"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    shards = sorted(dst.glob("model-*.safetensors"))
    assert len(shards) > 1 and (dst / "model.safetensors.index.json").is_file() and (dst / "bee.txt").is_file()
    loaded = ChatModel.from_pretrained(dst)
    assert loaded.answer(images(2), ["a", "b"], generation=GEN) == chat.answer(images(2), ["a", "b"], generation=GEN)


def test_convert_rejects_a_mismatched_checkpoint(chat: ChatModel, tmp_path: Path) -> None:
    src = write_original_folder(chat, tmp_path / "original")
    state = torch.load(src / "viscpm_chat_balance_checkpoint.pt", weights_only=True)
    del state["mapping.0.weight"]
    torch.save(state, src / "viscpm_chat_balance_checkpoint.pt")
    proc = subprocess.run([sys.executable, "-m", "viscpm.convert", "chat", str(src), str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "mapping.0.weight" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_missing_files_are_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        ChatModel.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="bee.txt"):
        ChatModel.from_pretrained(tmp_path / "empty")


def test_caption_takes_one_image_or_a_list(chat: ChatModel) -> None:
    one = images(1)[0]
    assert chat.caption(one, generation=GEN) == chat.caption([one], generation=GEN)[0]
    assert isinstance(chat.caption(one, generation=GEN), str)
    with pytest.raises(TypeError, match="PIL images"):
        chat.caption("photo.jpg")


def test_convert_into_an_earlier_conversion_leaves_no_stale_shards(chat: ChatModel, tmp_path: Path) -> None:
    src = write_original_folder(chat, tmp_path / "original")
    dst = tmp_path / "converted"
    for size in ("100KB", "2GB"):  # many shards first, then one: the old shards must go
        proc = subprocess.run([sys.executable, "-m", "viscpm.convert", "chat", str(src), str(dst), "--shard-size", size],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    assert [p.name for p in sorted(dst.glob("*.safetensors"))] == ["model-00001-of-00001.safetensors"]
    assert "removed" in proc.stderr
    loaded = ChatModel.from_pretrained(dst)
    assert loaded.answer(images(1), ["a"], generation=GEN) == chat.answer(images(1), ["a"], generation=GEN)


def test_used_settings_are_null_where_the_strategy_ignores_them() -> None:
    greedy = GenerationConfig(strategy="greedy").used_settings()
    assert greedy["beam_size"] is None and greedy["length_penalty"] is None and greedy["top_p"] is None
    assert greedy["max_new_tokens"] == 64 and greedy["repetition_penalty"] == 1.1
    beam = GenerationConfig().used_settings()
    assert beam["beam_size"] == 3 and beam["length_penalty"] == 3.0 and beam["seed"] is None
    sample = GenerationConfig(strategy="sample", seed=5).used_settings()
    assert sample["seed"] == 5 and sample["beam_size"] is None
