"""VisCPM-Chat generation speed: captions/s and generated tokens/s per batch size, plus the decode-step time.

    python benchmarks/chat_generate.py                                   # tiny preset, CPU, batch 1/8/32
    python benchmarks/chat_generate.py --preset cpm-bee-10b --device cuda --dtype bfloat16 --batch-sizes 1,64

`cpm-bee-10b` builds the real shapes (CPM-Bee 10B + BEiT-3 large) with random weights directly on the device.
Every number printed is measured in this run.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from viscpm import ChatModel, GenerationConfig
from viscpm.beit3 import VisionQueryEncoder
from viscpm.chat import ChatConfig
from viscpm.checkpoint import torch_dtype
from viscpm.cpmbee import CPMBee
from viscpm.tokenizer import CPMBeeTokenizer, synthetic_vocab


def random_real_model(device: torch.device, dtype: torch.dtype) -> ChatModel:
    """Real VisCPM-Chat shapes, random weights made on the device (no host copy of 10B parameters)."""
    tokenizer = CPMBeeTokenizer(synthetic_vocab())
    config = ChatConfig.from_name("viscpm-chat", vocab_size=tokenizer.vocab_size)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            llm, vision = CPMBee(config.llm), VisionQueryEncoder(config.vision)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for name, p in llm.named_parameters():
            p.normal_().add_(1.0) if name.endswith("norm.weight") else p.normal_()
        vision.reset_parameters()
    # the real vocab has 86583 rows; the synthetic one is smaller, which only shrinks the output projection
    return ChatModel(llm, vision, tokenizer, config, name="random-cpm-bee-10b")


def images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)) for _ in range(n)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_generate(chat: ChatModel, batch: int, generation: GenerationConfig, repeats: int) -> tuple[float, float]:
    imgs, questions = images(batch), ["Describe this image in detail."] * batch
    chat.generate(imgs[:1], questions[:1], generation=generation)  # warm-up
    sync(chat.device)
    start, tokens = time.perf_counter(), 0
    for _ in range(repeats):
        tokens += sum(len(r.token_ids) for r in chat.generate(imgs, questions, generation=generation))
    sync(chat.device)
    elapsed = time.perf_counter() - start
    return batch * repeats / elapsed, tokens / elapsed


def bench_decode_step(chat: ChatModel, batch: int, steps: int = 32) -> float:
    """Seconds per decode step for `batch` rows with a ~100-token prompt in the cache."""
    from viscpm.inputs import build_chat_sample, collate

    inputs, _ = collate([build_chat_sample(chat.tokenizer, "Describe this image in detail.")] * batch)
    inputs = inputs.to(chat.device)
    llm = chat.llm
    llm.setup_kv_cache(batch, inputs.seq_len + steps + 8)
    llm.prefill(inputs)
    ids = torch.full((batch,), chat.tokenizer.bos_id, device=chat.device)
    zeros = torch.zeros(batch, dtype=torch.long, device=chat.device)
    segment = torch.full((batch,), 8, device=chat.device)
    for i in range(4):  # warm-up
        llm.decode_step(ids, zeros, zeros + i, segment, slot=inputs.seq_len + i)
    sync(chat.device)
    start = time.perf_counter()
    for i in range(4, steps):
        llm.decode_step(ids, zeros, zeros + i, segment, slot=inputs.seq_len + i)
    sync(chat.device)
    llm.clear_kv_cache()
    return (time.perf_counter() - start) / (steps - 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "cpm-bee-10b"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--max-length", type=int, default=16, help="original-style max_length (answers up to +2 tokens)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = torch_dtype(args.dtype, device)
    torch.manual_seed(0)
    chat = ChatModel.from_pretrained("tiny", device=device, dtype=dtype) if args.preset == "tiny" else random_real_model(device, dtype)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    print(f"# {args.preset} on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"{dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}")
    print("strategy  batch  captions/s  tokens/s  decode-step ms")
    for strategy, generation in (("beam3", GenerationConfig.original(args.max_length)),
                                 ("greedy", GenerationConfig(strategy="greedy", max_new_tokens=args.max_length + 2))):
        for batch in batches:
            captions, tokens = bench_generate(chat, batch, generation, args.repeats)
            beams = generation.beam_size if generation.strategy == "beam" else 1
            step_ms = 1000 * bench_decode_step(chat, batch * beams)
            print(f"{strategy:8s}  {batch:5d}  {captions:10.2f}  {tokens:8.1f}  {step_ms:14.2f}")


if __name__ == "__main__":
    main()
