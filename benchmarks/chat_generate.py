"""VisCPM-Chat generation speed: captions/s and generated tokens/s per batch size, plus the decode-step time.

    PYTHONPATH=. python benchmarks/chat_generate.py                       # tiny preset, CPU, batch 1/8/32
    PYTHONPATH=. python benchmarks/chat_generate.py --config ../shared/reference/chat_config.json \\
        --weights ../shared/reference/chat_model.safetensors --vocab ../shared/reference/bee.txt
    PYTHONPATH=. python benchmarks/chat_generate.py --config cpm-bee-10b --vocab bee.txt --device cuda \\
        --dtype bfloat16 --batch-sizes 1,64 --compile

`--config`: `tiny`, `cpm-bee-10b` (CPM-Bee 10B + BEiT-3 large) or a chat config file (ours, or the reference
fixtures' `chat_config.json`); without `--weights` the weights are random, made directly on the device (no host
copy of 10B parameters). `--vocab bee.txt` gives the real 86,583-token vocabulary (otherwise a synthetic one).
Prompts are `--prompt-tokens` long (image slots included) and answers up to `--new-tokens`: the target's shapes
are 250 and 50. Every number printed is measured in this run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from viscpm import ChatModel, GenerationConfig
from viscpm.beit3 import VisionQueryEncoder
from viscpm.chat import ChatConfig
from viscpm.checkpoint import read_state_dict, torch_dtype
from viscpm.config import CPMBeeConfig, VisionQueryConfig
from viscpm.cpmbee import CPMBee
from viscpm.inputs import build_chat_sample
from viscpm.tokenizer import CPMBeeTokenizer, synthetic_vocab


def chat_config(name: str, vocab_size: int) -> ChatConfig:
    if name in ("tiny", "cpm-bee-10b"):
        return ChatConfig.from_name("tiny" if name == "tiny" else "viscpm-chat", vocab_size=vocab_size)
    data = json.loads(Path(name).read_text(encoding="utf-8"))
    if "config_kwargs" in data.get("llm", {}):  # the reference fixtures' layout (original config keys)
        return ChatConfig(llm=CPMBeeConfig.from_dict(data["llm"]["config_kwargs"]),
                          vision=VisionQueryConfig.from_chat_config(data))
    return ChatConfig.from_dict(data)


def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> ChatModel:
    tokenizer = CPMBeeTokenizer.from_file(args.vocab) if args.vocab else CPMBeeTokenizer(synthetic_vocab())
    if args.config == "tiny" and not args.vocab:
        chat = ChatModel.from_pretrained("tiny", device=device, dtype=dtype)
    else:
        config = chat_config(args.config, tokenizer.vocab_size)
        if args.weights:
            chat = ChatModel.from_state_dict(read_state_dict(args.weights), config, tokenizer, device=device, dtype=dtype)
        else:
            chat = random_model(config, tokenizer, device, dtype)
    return chat


def compile_options(args: argparse.Namespace) -> dict:
    """inductor with CUDA graphs by default; `--compile-backend aot_eager` traces the same graph fast (DRY runs)."""
    return {} if args.compile_backend == "inductor" else {"backend": args.compile_backend, "mode": None}


def random_model(config: ChatConfig, tokenizer: CPMBeeTokenizer, device: torch.device, dtype: torch.dtype) -> ChatModel:
    """Random weights made on the device (no host copy of 10B parameters)."""
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
    return ChatModel(llm, vision, tokenizer, config, name="random")


def question_of_length(chat: ChatModel, tokens: int) -> str:
    """A question whose prompt (image slots included) is about `tokens` tokens long."""
    words = "describe the picture in detail please and name every object colour and place you can see".split()
    question = "Describe this image."
    query = chat.config.vision.query_num
    i = 0
    while len(build_chat_sample(chat.tokenizer, question + " ", query_num=query)) < tokens:
        question += " " + words[i % len(words)]
        i += 1
    return question


def images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)) for _ in range(n)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_generate(chat: ChatModel, batch: int, question: str, generation: GenerationConfig, repeats: int,
                   clock=time.perf_counter) -> tuple[float, float]:
    imgs, questions = images(batch), [question] * batch
    warm = batch if getattr(chat.llm, "compiled", False) else 1  # compiled: needs these shapes; eager: warm-up only
    chat.generate(imgs[:warm], questions[:warm], generation=generation)
    sync(chat.device)
    start, tokens = clock(), 0
    for _ in range(repeats):
        tokens += sum(len(r.token_ids) for r in chat.generate(imgs, questions, generation=generation))
    sync(chat.device)
    elapsed = clock() - start
    return batch * repeats / elapsed, tokens / elapsed


def bench_decode_step(chat: ChatModel, prompts: int, group: int, question: str, new_tokens: int = 50,
                      steps: int = 24) -> float:
    """Seconds per static decode step for `prompts` x `group` rows over a prompt of the benchmark's length."""
    from viscpm.inputs import collate

    inputs, _ = collate([build_chat_sample(chat.tokenizer, question)] * prompts)
    inputs = inputs.to(chat.device)
    llm = chat.llm
    rows = prompts * group
    # the captions' cache shape (a compiled step then reuses the captions' graph)
    llm.start_decoding(inputs, torch.full((prompts,), 8, device=chat.device), group, max(new_tokens, steps))
    ids = torch.full((rows,), chat.tokenizer.bos_id, device=chat.device)
    zeros = torch.zeros(rows, dtype=torch.long, device=chat.device)
    step = torch.zeros(1, dtype=torch.long, device=chat.device)
    for _ in range(4):  # warm-up
        llm.decode_next(ids, zeros, step)
        step += 1
    sync(chat.device)
    start = time.perf_counter()
    for _ in range(4, steps):
        llm.decode_next(ids, zeros, step)
        step += 1
    sync(chat.device)
    llm.end_decoding()
    return (time.perf_counter() - start) / (steps - 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", "--preset", dest="config", default="tiny",
                        help="tiny, cpm-bee-10b, or a chat config file")
    parser.add_argument("--weights", default=None, help="weights for --config (default: random)")
    parser.add_argument("--vocab", default=None, help="bee.txt: the real vocabulary (default: a synthetic one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--strategies", default="beam3,greedy")
    parser.add_argument("--prompt-tokens", type=int, default=250)
    parser.add_argument("--new-tokens", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--clock", default="wall", choices=["wall", "process"],
                        help="process: CPU time of this process (steadier than wall time on a shared CPU machine)")
    parser.add_argument("--no-step", action="store_true", help="skip the decode-step timing")
    parser.add_argument("--step-batches", default=None,
                        help="first time the decode step alone (greedy rows) at these batch sizes, eager and, with "
                             "--compile, compiled")
    parser.add_argument("--summary", default=None, help="append the headline rows to this Markdown file")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch_dtype(args.dtype, device)
    torch.manual_seed(0)
    chat = build_model(args, device, dtype)
    question = question_of_length(chat, args.prompt_tokens)
    prompt_len = len(build_chat_sample(chat.tokenizer, question, query_num=chat.config.vision.query_num))
    batches = [int(b) for b in args.batch_sizes.split(",")]
    print(f"# {args.config} on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"{dtype}, vocab {chat.tokenizer.vocab_size}, prompt {prompt_len} tokens, up to {args.new_tokens} new, "
          f"compile={args.compile}, {args.clock} clock, torch {torch.__version__}, {torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}")
    def summary(row: str) -> None:
        if args.summary:
            with open(args.summary, "a", encoding="utf-8") as f:
                f.write(row + "\n")

    if args.step_batches:
        for compiled in ((False, True) if args.compile else (False,)):
            if compiled:
                chat.llm.compile_decode(**compile_options(args))
            for batch in (int(b) for b in args.step_batches.split(",")):
                ms = 1000 * bench_decode_step(chat, batch, 1, question, args.new_tokens)
                mode = "compiled" if compiled else "eager"
                print(f"decode step, batch {batch}, {mode}: {ms:.2f} ms", flush=True)
                target = "<= 7.5 ms (10B, H100)" if batch == 1 else ""
                summary(f"| Chat decode step, batch {batch}, {mode} ({args.config}, prompt {prompt_len}) | {ms:.2f} ms | {target} |")
    elif args.compile:
        chat.llm.compile_decode(**compile_options(args))
    print("strategy  batch  captions/s  tokens/s  decode-step ms")
    presets = {"beam3": GenerationConfig.original(args.new_tokens - 2),
               "greedy": GenerationConfig(strategy="greedy", max_new_tokens=args.new_tokens)}
    targets = {"beam3": ">= 40 images/s (10B, H100)", "greedy": ">= 60 images/s (10B, H100)"}
    for strategy in args.strategies.split(","):
        generation = presets[strategy]
        best = (0.0, 0)
        for batch in batches:
            clock = time.process_time if args.clock == "process" else time.perf_counter
            captions, tokens = bench_generate(chat, batch, question, generation, args.repeats, clock)
            beams = generation.beam_size if generation.strategy == "beam" else 1
            step_ms = float("nan") if args.no_step else 1000 * bench_decode_step(chat, batch, beams, question, args.new_tokens)
            print(f"{strategy:8s}  {batch:5d}  {captions:10.2f}  {tokens:8.1f}  {step_ms:14.2f}", flush=True)
            best = max(best, (captions, batch))
        summary(f"| Chat captions, {strategy}, best batch {best[1]} ({args.config}, prompt {prompt_len} + {args.new_tokens} new"
                f"{', compiled' if args.compile else ''}) | {best[0]:.2f} images/s | {targets[strategy]} |")
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        print(f"peak GPU memory: {peak:.1f} GiB")
        summary(f"| Chat peak GPU memory | {peak:.1f} GiB | |")


if __name__ == "__main__":
    main()
