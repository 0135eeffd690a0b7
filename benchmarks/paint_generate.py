"""VisCPM-Paint speed: images/s per batch size for 50 DDPM and 20 DPM-Solver++ steps, plus the time of each part.

    python benchmarks/paint_generate.py                                    # tiny preset, CPU, 64x64, batch 1/4
    python benchmarks/paint_generate.py --preset viscpm-paint --device cuda --dtype bfloat16 --batch-sizes 1,4,8

`viscpm-paint` builds the real shapes (CPM-Bee 10B + SD 2.1-base UNet/VAE, 512x512) with random weights made
directly on the device (no host copy, no second copy); `--vocab bee.txt` gives it the real vocabulary. A batch is
`batch` distinct prompts (zh/en, short/long: different text lengths) rendered in one model batch, PNG encoding
included in images/s. `--compile` compiles the UNet. Every number printed is measured in this run; `--summary`
appends the headline rows to a Markdown table (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import argparse
import io
import time
from dataclasses import replace

import numpy as np
from PIL import Image

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from viscpm.checkpoint import torch_dtype
from viscpm.cpmbee import CPMBee
from viscpm.paint import PaintConfig, PaintModel, SamplingConfig, TransBlock, vae_dtype
from viscpm.tokenizer import CPMBeeTokenizer, synthetic_vocab

PROMPT = "A photo of a cat sitting on a wooden table, high quality."
PROMPTS = [PROMPT, "一只猫", "a red bicycle leaning on a brick wall in the evening sun, photorealistic, 4k", "星空",
           "山水画，远处有雪山，近处有小船和渔夫，水墨风格", "dog", "an astronaut riding a horse on the moon", "a bowl of fruit"]


def random_real_model(device: torch.device, dtype: torch.dtype, vocab: str | None = None) -> PaintModel:
    """Real VisCPM-Paint shapes, random weights made on the device in the target dtype."""
    tokenizer = CPMBeeTokenizer.from_file(vocab) if vocab else CPMBeeTokenizer(synthetic_vocab())
    # the real vocab has 86583 rows; the synthetic one is smaller, which only shrinks the embedding
    config = PaintConfig.from_name("viscpm-paint", vocab_size=tokenizer.vocab_size)
    previous = torch.get_default_dtype()
    try:
        with torch.device(device):
            torch.set_default_dtype(dtype)
            llm = CPMBee(config.llm)
            trans_block = TransBlock.from_config(config)
            unet = UNet2DConditionModel.from_config(config.unet)
            torch.set_default_dtype(vae_dtype(config, dtype))
            vae = AutoencoderKL.from_config(config.vae)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():  # CPM-Bee's own constructor leaves its weights empty
        for name, p in llm.named_parameters():
            p.normal_().mul_(0.1).add_(1.0) if name.endswith("norm.weight") else p.normal_()
    return PaintModel(llm, trans_block, unet, vae, tokenizer, config, name="random-viscpm-paint")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device: torch.device, fn):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


class CountingUNet:
    """Counts the UNet calls of a denoising run (one per step when a whole batch goes in one call)."""

    def __init__(self, fn) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def bench(model: PaintModel, batch: int, sampling: SamplingConfig, repeats: int) -> dict[str, float]:
    device = model.device
    seeds = list(range(batch))
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    render = lambda: [png(r.image) for r in model.generate(prompts, seeds=seeds, sampling=sampling, output="np",  # noqa: E731
                                                            batch_size=batch)]
    model.generate(prompts, seeds=seeds, sampling=replace(sampling, num_inference_steps=2), output="np",
                   batch_size=batch)  # warm-up (and compilation) at this batch's shapes
    counter = CountingUNet(model._unet_fn)
    model._unet_fn = counter
    try:
        _, total = timed(device, lambda: [render() for _ in range(repeats)])
    finally:
        model._unet_fn = counter.fn
    calls_per_step = counter.calls / (repeats * sampling.num_inference_steps)
    images = model.generate(prompts[:1], seeds=[0], sampling=replace(sampling, num_inference_steps=1), output="np")
    _, t_png = timed(device, lambda: png(images[0].image))
    # the parts, once: text encoding, one denoising run, VAE decode
    (enc, unc), t_text = timed(device, lambda: model.encode_texts([PROMPT, ""]))
    length = max(enc.length, unc.length)
    cond = enc.padded_states(length)[None].expand(batch, -1, -1)
    uncond = unc.padded_states(length)[None].expand(batch, -1, -1)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    latents, t_denoise = timed(device, lambda: model.denoise(cond, uncond, gens, sampling))
    _, t_decode = timed(device, lambda: model.decode_latents(latents))
    return {"images_s": batch * repeats / total, "text_ms": 1000 * t_text, "calls_per_step": calls_per_step,
            "step_ms": 1000 * t_denoise / sampling.num_inference_steps, "decode_ms": 1000 * t_decode,
            "png_ms": 1000 * t_png}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "viscpm-paint"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--batch-sizes", default=None, help="default: 1,4 (tiny) or 1,4,8 (viscpm-paint)")
    parser.add_argument("--size", type=int, default=None, help="image size (default: the model's, 64 tiny / 512 real)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--vocab", default=None, help="bee.txt for viscpm-paint (default: a synthetic vocabulary)")
    parser.add_argument("--steps", default="50,20", help="DDPM and DPM-Solver++ steps")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    parser.add_argument("--summary", default=None, help="append the headline rows to this Markdown file")
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.preset == "viscpm-paint" and device.type != "cuda":
        parser.error("the viscpm-paint preset (10B + SD 2.1) is meant for a GPU: pass --device cuda")
    dtype = torch_dtype(args.dtype, device)
    torch.manual_seed(0)
    if args.preset == "tiny":
        model = PaintModel.from_pretrained("tiny", device=device, dtype=dtype)
    else:
        model = random_real_model(device, dtype, args.vocab)
    if args.compile:
        model.compile_unet()
    batches = [int(b) for b in (args.batch_sizes or ("1,4" if args.preset == "tiny" else "1,4,8")).split(",")]
    size = args.size or model.config.default_size
    print(f"# {args.preset} on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"{dtype}, {size}x{size}, torch {torch.__version__}, {torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}")
    print("sampler        steps  batch  images/s  UNet calls/step  text ms  UNet step ms  VAE decode ms  PNG ms/image")
    ddpm, dpm = (int(x) for x in args.steps.split(","))
    targets = {"ddpm": 5, "dpmsolver++": 12}
    for sampling in (SamplingConfig(num_inference_steps=ddpm, height=size, width=size),
                     replace(SamplingConfig.fast(height=size, width=size), num_inference_steps=dpm)):
        for batch in batches:
            r = bench(model, batch, sampling, args.repeats)
            print(f"{sampling.scheduler:13s}  {sampling.num_inference_steps:5d}  {batch:5d}  {r['images_s']:8.3f}  "
                  f"{r['calls_per_step']:15.1f}  {r['text_ms']:7.1f}  {r['step_ms']:12.2f}  {r['decode_ms']:13.1f}  "
                  f"{r['png_ms']:12.1f}", flush=True)
            if args.summary and batch == max(batches):
                with open(args.summary, "a", encoding="utf-8") as f:
                    f.write(f"| Paint {size}x{size}, {sampling.scheduler} {sampling.num_inference_steps} steps, batch {batch} "
                            f"distinct prompts, PNG incl.{', compiled' if args.compile else ''} | {r['images_s']:.2f} images/s "
                            f"| >= {targets[sampling.scheduler]} images/s (full size, GPU) |\n")
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        print(f"peak GPU memory: {peak:.1f} GiB")
        if args.summary:
            with open(args.summary, "a", encoding="utf-8") as f:
                f.write(f"| Paint peak GPU memory | {peak:.1f} GiB | |\n")


if __name__ == "__main__":
    main()
