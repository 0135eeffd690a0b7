"""VisCPM-Paint speed: images/s per batch size for 50 DDPM and 20 DPM-Solver++ steps, plus the time of each part.

    python benchmarks/paint_generate.py                                    # tiny preset, CPU, 64x64, batch 1/4
    python benchmarks/paint_generate.py --preset viscpm-paint --device cuda --dtype bfloat16 --batch-sizes 1,4,8

`viscpm-paint` builds the real shapes (CPM-Bee 10B + SD 2.1-base UNet/VAE, 512x512) with random weights made
directly on the device (no host copy, no second copy). A batch is `batch` images of one prompt with different
seeds (one UNet group; the text is encoded once). Every number printed is measured in this run.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from viscpm.checkpoint import torch_dtype
from viscpm.cpmbee import CPMBee
from viscpm.paint import PaintConfig, PaintModel, SamplingConfig, TransBlock, vae_dtype
from viscpm.tokenizer import CPMBeeTokenizer, synthetic_vocab

PROMPT = "A photo of a cat sitting on a wooden table, high quality."


def random_real_model(device: torch.device, dtype: torch.dtype) -> PaintModel:
    """Real VisCPM-Paint shapes, random weights made on the device in the target dtype."""
    tokenizer = CPMBeeTokenizer(synthetic_vocab())
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


def bench(model: PaintModel, batch: int, sampling: SamplingConfig, repeats: int) -> dict[str, float]:
    device = model.device
    seeds = list(range(batch))
    model.generate([PROMPT], seeds=[0], sampling=replace(sampling, num_inference_steps=2), output="np")  # warm-up
    _, total = timed(device, lambda: [model.generate([PROMPT], seeds=seeds, sampling=sampling, images_per_prompt=batch,
                                                     output="np") for _ in range(repeats)])
    # the parts, once: text encoding, one denoising run, VAE decode
    (enc, unc), t_text = timed(device, lambda: model.encode_texts([PROMPT, ""]))
    length = max(enc.length, unc.length)
    cond = enc.padded_states(length)[None].expand(batch, -1, -1)
    uncond = unc.padded_states(length)[None].expand(batch, -1, -1)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    latents, t_denoise = timed(device, lambda: model.denoise(cond, uncond, gens, sampling))
    _, t_decode = timed(device, lambda: model.decode_latents(latents))
    return {"images_s": batch * repeats / total, "text_ms": 1000 * t_text,
            "step_ms": 1000 * t_denoise / sampling.num_inference_steps, "decode_ms": 1000 * t_decode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "viscpm-paint"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--batch-sizes", default=None, help="default: 1,4 (tiny) or 1,4,8 (viscpm-paint)")
    parser.add_argument("--size", type=int, default=None, help="image size (default: the model's, 64 tiny / 512 real)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.preset == "viscpm-paint" and device.type != "cuda":
        parser.error("the viscpm-paint preset (10B + SD 2.1) is meant for a GPU: pass --device cuda")
    dtype = torch_dtype(args.dtype, device)
    torch.manual_seed(0)
    if args.preset == "tiny":
        model = PaintModel.from_pretrained("tiny", device=device, dtype=dtype)
    else:
        model = random_real_model(device, dtype)
    batches = [int(b) for b in (args.batch_sizes or ("1,4" if args.preset == "tiny" else "1,4,8")).split(",")]
    size = args.size or model.config.default_size
    print(f"# {args.preset} on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"{dtype}, {size}x{size}, torch {torch.__version__}, {torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}")
    print("sampler        steps  batch  images/s  text ms  UNet step ms  VAE decode ms")
    for sampling in (SamplingConfig(num_inference_steps=50, height=size, width=size),
                     SamplingConfig.fast(height=size, width=size)):
        for batch in batches:
            r = bench(model, batch, sampling, args.repeats)
            print(f"{sampling.scheduler:13s}  {sampling.num_inference_steps:5d}  {batch:5d}  {r['images_s']:8.3f}  "
                  f"{r['text_ms']:7.1f}  {r['step_ms']:12.2f}  {r['decode_ms']:13.1f}")


if __name__ == "__main__":
    main()
