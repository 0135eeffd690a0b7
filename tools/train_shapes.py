"""Train the `shapes` demo models from scratch on CPU and write the files that ship in viscpm/weights/shapes/.

    python tools/train_shapes.py                 # both models, ~17 min on an idle 2-core machine, seeded
    python tools/train_shapes.py --only chat     # or --only paint

VisCPM-Chat (BEiT-3 + queries + mapping + CPM-Bee) learns to caption one coloured shape, in the question's language,
with teacher forcing on the answer tokens. VisCPM-Paint learns the reverse: a diffusers AutoencoderKL is first
trained as an autoencoder on shape pictures, then CPM-Bee (text side) + trans_block + UNet with the epsilon-prediction
diffusion loss on the VAE's latents (the prompt dropped 10% of the time, for classifier-free guidance). Both use the
models' own forward code in train mode; what only training needs (batching the teacher-forced answers, the losses)
lives here. The weights are written in our safetensors layout (fp16) with viscpm_config.json and bee.txt, and loaded
back through `from_pretrained(folder)` - the path real checkpoints take - for a final check.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

import shapes_data as D  # noqa: E402
from viscpm.beit3 import VisionQueryEncoder  # noqa: E402
from viscpm.chat import ChatModel  # noqa: E402
from viscpm.config import BEiT3Config, ChatConfig, CPMBeeConfig, PaintConfig, VisionQueryConfig  # noqa: E402
from viscpm.cpmbee import CPMBee  # noqa: E402
from viscpm.image import preprocess_images  # noqa: E402
from viscpm.inputs import build_context_sample, build_paint_sample, chat_data, collate  # noqa: E402
from viscpm.paint import PaintModel, TransBlock  # noqa: E402
from viscpm.tokenizer import _LEADING_SPECIALS, CPMBeeTokenizer, escape_user_text  # noqa: E402

logger = logging.getLogger("train_shapes")
OUT = REPO / "viscpm" / "weights" / "shapes"
SEED = 20240615

# ---------------------------------------------------------------------------------------------------- vocabulary
_EN_WORDS = """a an the is are in on of and this that what which do does you see show shown shows here there image
picture photo describe detail details shape colour color object tell me caption can it its red green blue yellow
circle square triangle please""".split()
_ZH_WORDS = ["一个", "红色", "绿色", "蓝色", "黄色", "圆形", "正方形", "三角形", "图片", "什么", "这张", "描述"]
# a general inventory of common characters; a question's characters outside it become <unk> ext tokens
_ZH_CHARS = ("的一是不了人我在有他这为之大来以个中上们到说国和地也子时道出而要于就下得可你年生自会那后能对着事其里所去行过家"
             "十用发天如然作方成者多日都三小二无同么经法当起与好看学进种将还分此心前面又定见只主没公从知张长已问但开美片画"
             "图像述请告诉东西形状颜色哪幅照红绿蓝黄圆正角白黑色下左右边样吗呢一下")


def shapes_vocab() -> list[str]:
    """bee.txt of the shapes models: CPM-Bee's leading special entries (same ids), printable ASCII, the words of the
    task in English (bare, with a leading space, capitalised) and Chinese, and common Chinese characters."""
    out = list(_LEADING_SPECIALS)
    seen = set(out)

    def add(tok: str) -> None:
        if tok not in seen:
            seen.add(tok)
            out.append(tok)

    for code in range(0x21, 0x7F):
        add(chr(code))
    for w in _EN_WORDS:
        for v in (w, " " + w, w.capitalize(), " " + w.capitalize()):
            add(v)
    for w in _ZH_WORDS:
        add(w)
    for ch in _ZH_CHARS:
        add(ch)
    add("？")
    add("。")
    add("，")
    return out


# ---------------------------------------------------------------------------------------------------- configs
def chat_config(vocab_size: int) -> ChatConfig:
    llm = CPMBeeConfig(vocab_size=vocab_size, dim_model=64, num_heads=4, dim_head=16, dim_ff=128, num_layers=2,
                       position_bias_num_buckets=64, position_bias_num_segment_buckets=64,
                       position_bias_max_distance=256, dtype="float16")
    # 64px images in 8px patches; the query table only as long as the queries need
    beit3 = BEiT3Config(img_size=64, patch_size=8, embed_dim=64, num_heads=4, ffn_dim=128, num_layers=3,
                        max_source_positions=64 + 2, text_vocab_size=16)
    return ChatConfig(llm=llm, vision=VisionQueryConfig(beit3=beit3, query_num=64, llm_dim=64), image_size=64,
                      max_prompt_length=512)


def paint_config(vocab_size: int, scaling_factor: float = 1.0) -> PaintConfig:
    llm = CPMBeeConfig(vocab_size=vocab_size, dim_model=64, num_heads=4, dim_head=16, dim_ff=128, num_layers=2,
                       position_bias_num_buckets=64, position_bias_num_segment_buckets=64,
                       position_bias_max_distance=256, dtype="float16")
    # VAE: 64x64 pictures <-> 16x16x4 latents (4 channels per 4x4 pixels: enough room for colour and outline);
    # the UNet denoises the 16x16 latents, with cross-attention at both of its levels
    vae = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 3,
           "up_block_types": ["UpDecoderBlock2D"] * 3, "block_out_channels": [16, 32, 64],
           "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 8, "sample_size": 64,
           "scaling_factor": scaling_factor, "force_upcast": False}
    unet = {"sample_size": 16, "in_channels": 4, "out_channels": 4,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "block_out_channels": [32, 64], "layers_per_block": 1, "cross_attention_dim": 64,
            "attention_head_dim": 4, "use_linear_projection": True, "norm_num_groups": 16}
    return PaintConfig(llm=llm, unet=unet, vae=vae, max_prompt_length=64)


# ---------------------------------------------------------------------------------------------------- helpers
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))) * 0.95 + 0.05


def decoded(label_image, rng: random.Random):
    """Round-trip through PNG/JPEG bytes and Pillow, as a caption job sees the picture."""
    from PIL import Image

    return Image.open(io.BytesIO(D.encode(label_image, rng))).convert("RGB")


def save_folder(folder: Path, state: dict[str, torch.Tensor], config: dict, vocab: list[str]) -> int:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*"):
        old.unlink()
    half = {k: (v.detach().to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    save_file(half, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "viscpm_config.json").write_text(json.dumps(config, indent=1) + "\n")
    (folder / "bee.txt").write_text("".join(t + "\n" for t in vocab), encoding="utf-8")
    return sum(p.stat().st_size for p in folder.iterdir())


# ---------------------------------------------------------------------------------------------------- chat
def chat_batch(model: ChatModel, questions: list[str], answers: list[str]):
    """Teacher forcing: the inference prompt tree with the answer in its `<ans>` slot. The answer leaf is
    [bos, answer...] with context 0 (causal), in the same segment the decoder writes to; targets: answer + eos."""
    tok = model.tokenizer
    samples = []
    for q, a in zip(questions, answers):
        data = chat_data(q, "", query_num=model.config.vision.query_num)
        data["<ans>"] = escape_user_text(a)
        samples.append(build_context_sample(tok, data))
    inputs, metas = collate(samples)
    targets = torch.full(inputs.input_ids.shape, -100, dtype=torch.long)
    for r, s in enumerate(samples):
        answer = np.flatnonzero(~s.context)  # bos + answer tokens
        ids = s.input_ids[answer]
        targets[r, answer] = torch.as_tensor(np.append(ids[1:], tok.eos_id), dtype=torch.long)
    return inputs, [m.image_bound for m in metas], targets


def sincos_positions(grid: int, dim: int) -> torch.Tensor:
    """(grid*grid, dim) 2-D sin-cos position embeddings (MAE's recipe), row-major like the patch tokens."""
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    freqs = 1.0 / (100 ** (torch.arange(dim // 4) / (dim // 4)))
    parts = []
    for axis in (ys.flatten(), xs.flatten()):
        parts += [torch.sin(axis[:, None] * freqs), torch.cos(axis[:, None] * freqs)]
    return torch.cat(parts, dim=1)


class PatchProbe(torch.nn.Module):
    """Training-only auxiliary head on BEiT-3's patch tokens (read by a forward hook on an inner layer): each patch
    predicts how much of it the shape covers and, where it holds part of the outline, which shape it is. Local
    evidence like this is what a small ViT trained from scratch is slow to find from the caption loss alone."""

    def __init__(self, vision: VisionQueryEncoder, layer: int = -2) -> None:
        super().__init__()
        self.patch = vision.config.beit3.patch_size
        self.head = torch.nn.Linear(vision.config.vision_dim, len(D.SHAPES) + 1)
        self.tokens: torch.Tensor | None = None
        vision.beit3.layers[layer].register_forward_hook(lambda _m, _i, out: setattr(self, "tokens", out))

    def loss(self, pixels: torch.Tensor, shapes: torch.Tensor) -> torch.Tensor:
        # foreground: some channel dark (every palette colour has one, the light background none); pixels in [-1, 1]
        fg = (pixels.min(dim=1).values < 0.1).float()
        cover = fg.unfold(1, self.patch, self.patch).unfold(2, self.patch, self.patch).mean((-1, -2)).flatten(1)
        out = self.head(self.tokens[:, 1:1 + cover.shape[1]])
        outline = (cover > 0.05) & (cover < 0.95)
        shape_loss = F.cross_entropy(out[..., :-1][outline], shapes[:, None].expand_as(cover)[outline])
        return shape_loss + 10 * F.mse_loss(out[..., -1], cover)


def chat_loss(model: ChatModel, pixels: torch.Tensor, questions: list[str], answers: list[str]) -> torch.Tensor:
    inputs, bounds, targets = chat_batch(model, questions, answers)
    vision = model.vision(pixels)
    hidden = model._splice_vision(inputs, bounds, vision)
    logits, _ = model.llm(inputs, hidden_states=hidden)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


def make_chat_images(n: int, rng: random.Random, size: int) -> tuple[torch.Tensor, list[D.Label]]:
    labels, images = [], []
    for _ in range(n):
        label, image = D.sample(rng)
        labels.append(label)
        images.append(decoded(image, rng))
    return preprocess_images(images, size=size), labels


def train_chat(tok: CPMBeeTokenizer, steps: int, batch: int, num_images: int, lr: float, seed: int) -> ChatModel:
    seed_everything(seed)
    config = chat_config(tok.vocab_size)
    llm = CPMBee(config.llm).init_random_(seed)
    with torch.no_grad():
        llm.position_bias.mul_(0.1)
    vision = VisionQueryEncoder(config.vision)
    beit3 = config.vision.beit3
    with torch.no_grad():
        grid = beit3.img_size // beit3.patch_size
        vision.beit3.pos_embed_image.zero_()
        first = 2 + 1  # fairseq offset 2, then the cls token
        vision.beit3.pos_embed_image[first:first + grid * grid] = sincos_positions(grid, beit3.embed_dim)
        vision.beit3.pos_embed_query.normal_(0, 1.0)
        vision.query.normal_(0, 1.0)
    probe = PatchProbe(vision)
    model = ChatModel(llm, vision, tok, config, name="shapes")
    rng = random.Random(seed)
    started = time.monotonic()
    pixels, labels = make_chat_images(num_images, rng, config.image_size)
    logger.info("chat: %d training images in %.0f s", num_images, time.monotonic() - started)
    params = list(model.llm.parameters()) + list(model.vision.parameters()) + list(probe.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, max(1, steps // 20)))
    model.llm.train()
    model.vision.train()
    for step in range(steps):
        index = [rng.randrange(num_images) for _ in range(batch)]
        langs = [rng.choice(("en", "zh")) for _ in index]
        questions = [rng.choice(D.TRAIN_QUESTIONS[lang]) for lang in langs]
        answers = [labels[i].caption(lang) for i, lang in zip(index, langs)]
        shapes = torch.tensor([D.SHAPES.index(labels[i].shape) for i in index])
        caption_loss = chat_loss(model, pixels[index], questions, answers)
        loss = caption_loss + probe.loss(pixels[index], shapes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            logger.info("chat step %d/%d caption loss %.4f, all %.4f (%.0f s)", step, steps, caption_loss.item(),
                        loss.item(), time.monotonic() - started)
    model.llm.eval()
    model.vision.eval()
    return model


def eval_chat(model: ChatModel, n: int, seed: int, batch: int = 16) -> dict[str, float]:
    from viscpm.generation import GenerationConfig

    rng = random.Random(seed)
    items = [(D.sample(rng), rng.choice(("en", "zh"))) for _ in range(n)]
    right = {"en": [0, 0], "zh": [0, 0]}
    for start in range(0, n, batch):
        chunk = items[start:start + batch]
        images = [decoded(im, rng) for (_, im), _ in chunk]
        questions = [rng.choice(D.TRAIN_QUESTIONS[lang] + D.HELD_OUT_QUESTIONS[lang]) for _, lang in chunk]
        texts = model.answer(images, questions, generation=GenerationConfig(max_new_tokens=16))
        for ((label, _), lang), text in zip(chunk, texts):
            got = D.parse_caption(text)
            right[lang][0] += got == (lang, label.colour, label.shape)
            right[lang][1] += 1
    return {lang: r / max(1, t) for lang, (r, t) in right.items()}


# ---------------------------------------------------------------------------------------------------- paint
def paint_images(n: int, rng: random.Random) -> tuple[torch.Tensor, list[D.Label]]:
    """n 64x64 pictures in [-1, 1] (N, 3, 64, 64) and their labels."""
    labels, arrays = [], []
    for _ in range(n):
        label, image = D.sample(rng, size=(64, 64))
        labels.append(label)
        arrays.append(np.asarray(image))
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, labels


def train_vae(model: PaintModel, x: torch.Tensor, steps: int, batch: int, lr: float, rng: random.Random) -> None:
    vae = model.vae
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, max(1, steps // 20)))
    started = time.monotonic()
    for step in range(steps):
        index = torch.tensor([rng.randrange(len(x)) for _ in range(batch)])
        images = x[index]
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        # the shape is a small part of the picture: weigh its pixels up, or its colour is learnt last
        weight = 1 + 3 * (images.min(dim=1, keepdim=True).values < 0.1).float()
        error = recon - images
        loss = (weight * (error.abs() + error.square())).mean() + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            logger.info("vae step %d/%d loss %.4f kl %.2f (%.0f s)", step, steps, loss.item(), kl.item(),
                        time.monotonic() - started)
    vae.eval()


@torch.no_grad()
def eval_vae(model: PaintModel, n: int, seed: int) -> dict[str, float]:
    """How often the pixel check still reads colour and shape after an encode/decode round trip."""
    x, labels = paint_images(n, random.Random(seed))
    recon = model.vae.decode(model.vae.encode(x).latent_dist.mode()).sample
    images = ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    got = [D.classify_pixels(im) for im in images]
    return {"colour": sum(g[0] == l.colour for g, l in zip(got, labels)) / n,
            "shape": sum(g[1] == l.shape for g, l in zip(got, labels)) / n}


def encode_prompts(model: PaintModel, texts: list[str]) -> torch.Tensor:
    """CPM-Bee + trans_block over every text, right-padded with one padding position past the longest, as the
    model's encode_texts lays them out (with gradients)."""
    samples = [build_paint_sample(model.tokenizer, t, max_length=model.config.max_prompt_length) for t in texts]
    inputs, _ = collate(samples, pad_to=max(len(s) for s in samples) + 1)
    _, hidden = model.llm(inputs, return_logits=False)
    return model.trans_block(hidden)


def train_diffusion(model: PaintModel, x: torch.Tensor, labels: list[D.Label], steps: int, batch: int, lr: float,
                    rng: random.Random) -> None:
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(model.config.scheduler)
    with torch.no_grad():
        moments = torch.cat([model.vae.encode(x[i:i + 256]).latent_dist.mean for i in range(0, len(x), 256)])
    scale = model.vae.config.scaling_factor
    texts = [""] + [label.caption(lang) for label in D.LABELS for lang in ("en", "zh")]
    text_index = {t: i for i, t in enumerate(texts)}
    params = [*model.llm.parameters(), *model.trans_block.parameters(), *model.unet.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, max(1, steps // 20)))
    for m in (model.llm, model.trans_block, model.unet):
        m.train()
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    started = time.monotonic()
    for step in range(steps):
        index = [rng.randrange(len(x)) for _ in range(batch)]
        # the latents' own noise (the VAE posterior), then the diffusion noise
        mean = moments[index]
        latents = mean * scale
        prompts = ["" if rng.random() < 0.1 else labels[i].caption(rng.choice(("en", "zh"))) for i in index]
        states = encode_prompts(model, texts)[[text_index[p] for p in prompts]]
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)
        noisy = scheduler.add_noise(latents, noise, t)
        pred = model.unet(noisy, t, encoder_hidden_states=states, return_dict=False)[0]
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            logger.info("diffusion step %d/%d loss %.4f (%.0f s)", step, steps, loss.item(),
                        time.monotonic() - started)
    for m in (model.llm, model.trans_block, model.unet):
        m.eval()


def train_paint(tok: CPMBeeTokenizer, vae_steps: int, steps: int, num_images: int, seed: int) -> PaintModel:
    seed_everything(seed)
    config = paint_config(tok.vocab_size)
    from diffusers import AutoencoderKL, UNet2DConditionModel

    llm = CPMBee(config.llm).init_random_(seed)
    with torch.no_grad():
        llm.position_bias.mul_(0.1)
    trans_block = TransBlock(config.llm.dim_model, config.cross_attention_dim, config.trans_block_eps)
    unet = UNet2DConditionModel.from_config(config.unet)
    vae = AutoencoderKL.from_config(config.vae)
    model = PaintModel(llm, trans_block, unet, vae, tok, config, name="shapes")
    rng = random.Random(seed)
    x, labels = paint_images(num_images, rng)
    train_vae(model, x, vae_steps, 16, 1e-3, rng)
    logger.info("vae reconstructions of fresh pictures: %s", eval_vae(model, 48, seed + 7))
    with torch.no_grad():
        std = float(torch.cat([vae.encode(x[i:i + 256]).latent_dist.mean for i in range(0, len(x), 256)]).std())
    # SD's convention: latents * scaling_factor have unit variance
    from dataclasses import replace

    vae_cfg = dict(config.vae, scaling_factor=round(1.0 / std, 5))
    model.config = replace(config, vae=vae_cfg)
    vae.register_to_config(scaling_factor=vae_cfg["scaling_factor"])
    logger.info("vae latent std %.4f -> scaling_factor %.5f", std, vae_cfg["scaling_factor"])
    train_diffusion(model, x, labels, steps, 32, 2e-3, rng)
    return model


def eval_paint(model: PaintModel, n_per_label: int, seed: int, steps: int = 20, guidance: float = 7.5) -> dict:
    from viscpm import SamplingConfig

    prompts = [label.caption(lang) for label in D.LABELS for lang in ("en", "zh")] * n_per_label
    truth = [(label.colour, label.shape) for label in D.LABELS for _ in ("en", "zh")] * n_per_label
    results = model.generate(prompts, seeds=[seed + i for i in range(len(prompts))],
                             sampling=SamplingConfig.fast(num_inference_steps=steps, guidance_scale=guidance),
                             batch_size=16)
    got = [D.classify_pixels(r.image) for r in results]
    colour = sum(g[0] == t[0] for g, t in zip(got, truth)) / len(got)
    shape = sum(g[1] == t[1] for g, t in zip(got, truth)) / len(got)
    return {"colour": colour, "shape": shape}


# ---------------------------------------------------------------------------------------------------- main
def run_both(args: argparse.Namespace, argv: list[str]) -> int:
    """Chat and Paint in two processes of one thread each: both cores busy, each process deterministic on its own
    (one thread: no reduction-order changes), and no OpenMP threads spinning against each other on a busy box."""
    import subprocess

    started = time.monotonic()
    children = [subprocess.Popen([sys.executable, __file__, *argv, "--only", kind, "--threads", "1"])
                for kind in ("chat", "paint")]
    codes = [child.wait() for child in children]
    logger.info("both models trained in %.0f s (wall clock, two processes)", time.monotonic() - started)
    return max(codes)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--only", choices=("chat", "paint"), default=None,
                        help="train one model (default: both, in two single-threaded processes)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (results depend on it)")
    parser.add_argument("--chat-steps", type=int, default=2000)
    parser.add_argument("--chat-images", type=int, default=6000)
    parser.add_argument("--vae-steps", type=int, default=400)
    parser.add_argument("--paint-steps", type=int, default=2400)
    parser.add_argument("--paint-images", type=int, default=3000)
    parser.add_argument("--eval", type=int, default=96, help="fresh samples to check each model on after training")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {args.only or 'main'}: %(message)s",
                        datefmt="%H:%M:%S")
    if args.only is None:
        return run_both(args, argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    vocab = shapes_vocab()
    tok = CPMBeeTokenizer(vocab)
    report: dict = {"seed": args.seed, "threads": args.threads, "torch": torch.__version__}
    started, cpu_started = time.monotonic(), time.process_time()
    if args.only == "chat":
        model = train_chat(tok, args.chat_steps, 32, args.chat_images, 3e-3, args.seed)
        report["steps"] = args.chat_steps
    else:
        model = train_paint(tok, args.vae_steps, args.paint_steps, args.paint_images, args.seed)
        report["steps"] = {"vae": args.vae_steps, "diffusion": args.paint_steps}
    report["train_s"] = round(time.monotonic() - started, 1)
    report["train_cpu_s"] = round(time.process_time() - cpu_started, 1)
    state = model.original_state_dict()
    report["params"] = sum(t.numel() for t in state.values())
    folder = args.out / args.only
    report["bytes"] = save_folder(folder, state, model.config.to_dict(), vocab)
    # the check goes through from_pretrained(folder): the path real checkpoints take, fp16 files included
    if args.only == "chat":
        report["accuracy"] = eval_chat(ChatModel.from_pretrained(folder), args.eval, args.seed + 1)
    else:
        report["accuracy"] = eval_paint(PaintModel.from_pretrained(folder), max(1, args.eval // 24), args.seed + 1)
    (folder / "training.json").write_text(json.dumps(report, indent=1) + "\n")
    logger.info("%s", json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
