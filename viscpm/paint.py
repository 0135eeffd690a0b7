"""VisCPM-Paint: text -> image, batched.

CPM-Bee encodes ``{'caption': prompt, 'objects': ''}``; a trans_block (bias-free Linear to the UNet's
cross-attention width, then LayerNorm) maps its hidden states - every position, padding included, as the
original - into a Stable Diffusion 2.1-base UNet, which denoises with classifier-free guidance; the VAE decodes.
The UNet, VAE and schedulers are diffusers components; the text side and the denoising loop are ours.

Batching rules (why the code looks the way it does):

* The original pads a prompt's cond and uncond inputs to their common length and feeds ALL positions to the
  UNet without an attention mask, so the number of padding states changes the image. A padding position sees
  nothing in CPM-Bee's attention, so its hidden state is the same vector for every text; we encode each
  distinct text once (with one padding position) and rebuild any padded length from it. Each image gets
  exactly its own pair's length: a model batch is one UNet call per step whatever the lengths, the text states
  padded to the longest pair and an attention mask hiding, for each image, the positions past its own pair
  (no mask when all pairs have the same length, e.g. one image per call, which keeps those bytes unchanged).
* Every image has its own CPU ``torch.Generator``: initial latents first, then one latents-shaped draw per
  DDPM step with t > 0, as the original's single generator at batch 1. An image depends only on (prompt,
  negative prompt, seed, sampling settings), never on the rest of the batch, nor on the device.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from PIL import Image
from torch import nn

from .checkpoint import (
    CheckpointError,
    LoadReport,
    check_parts,
    find_checkpoint,
    load_cpmbee,
    load_into,
    open_model_folder,
    original_state_dict,
    read_state_dict,
    read_vae,
    torch_dtype,
    vae_dtype,
)
from .config import PaintConfig, SamplingConfig
from .cpmbee import CPMBee
from .folders import ORIGINAL_PAINT_CHECKPOINTS, VAE_FILE, VAE_FOLDER, bundled_model_folder
from .image import to_uint8
from .inputs import BeeInputs, build_paint_pair, build_paint_sample, collate
from .paint_request import OUTPUTS, check_paint_request
from .keymaps import CPMBEE_KEY_MAP, PAINT_PREFIXES, TRANS_BLOCK_KEY_MAP, UNET_KEY_MAP, vae_key_map
from .tokenizer import CPMBeeTokenizer

if TYPE_CHECKING:
    from .safety import ClipReranker, ImageSafetyChecker, PromptSafetyChecker

logger = logging.getLogger(__name__)

def make_scheduler(scheduler_config: Mapping[str, Any], sampling: SamplingConfig):
    """A fresh diffusers scheduler (they are stateful: one per denoising run)."""
    cls = DDPMScheduler if sampling.scheduler == "ddpm" else DPMSolverMultistepScheduler
    accepted = set(inspect.signature(cls.__init__).parameters)
    cfg = {k: v for k, v in scheduler_config.items() if k in accepted}  # SD's PNDM keys would only warn
    if sampling.timestep_spacing == "original":
        cfg["steps_offset"] = 0  # diffusers 0.15.0 ignored it for DDPM; linspace spacing (DPM) never uses it
    if sampling.scheduler == "dpmsolver++":
        cfg["algorithm_type"] = "dpmsolver++"
    return cls.from_config(cfg)


def candidate_seed(seed: int, candidate: int) -> int:
    """Seed of the reranker's candidate `candidate` for an image seeded `seed`; candidate 0 is the seed itself,
    so an image without the reranker is the first candidate with it."""
    if candidate == 0:
        return seed
    return int(np.random.SeedSequence([seed, candidate]).generate_state(1, np.uint64)[0] >> np.uint64(1))


# ------------------------------------------------------------------------------------------- trans_block
class TransBlock(nn.Module):
    """CPM-Bee width -> UNet cross-attention width: bias-free Linear, then LayerNorm. (The original's
    CPMBeeTransBlock; its dropout is 0 at inference and its dim_ff argument unused.)"""

    def __init__(self, dim_in: int, dim_out: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=False)
        self.norm = nn.LayerNorm(dim_out, eps=eps)

    @classmethod
    def from_config(cls, config: PaintConfig) -> TransBlock:
        return cls(config.llm.dim_model, config.cross_attention_dim, config.trans_block_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


# ------------------------------------------------------------------------------------------------ results
@dataclass
class EncodedText:
    """CPM-Bee output for one text: its n tokens, then one padding position (the same for every text)."""

    hidden: torch.Tensor  # (n + 1, d) LLM hidden states after the final norm
    states: torch.Tensor  # (n + 1, C) trans_block(hidden): what the UNet's cross-attention reads
    truncated: bool

    @property
    def length(self) -> int:
        return self.hidden.shape[0] - 1

    @staticmethod
    def _pad(x: torch.Tensor, length: int) -> torch.Tensor:
        n = x.shape[0] - 1
        if length < n:
            raise ValueError(f"cannot pad a text of {n} tokens to {length}")
        return torch.cat((x[:n], x[n:].expand(length - n, -1)))

    def padded_hidden(self, length: int) -> torch.Tensor:
        """(length, d): what the original's CPM-Bee forward returns for this text right-padded to `length`."""
        return self._pad(self.hidden, length)

    def padded_states(self, length: int) -> torch.Tensor:
        return self._pad(self.states, length)


@dataclass
class PaintResult:
    """One requested image. Results come prompt-major: image j of prompt i at index i * images_per_prompt + j."""

    image: Image.Image | np.ndarray | None  # PIL RGB or (H, W, 3) uint8; None when the prompt was refused
    prompt_index: int
    seed: int
    prompt_flagged: bool | None = None  # the prompt checker refused the prompt: no image was made (None: no checker)
    prompt_score: float | None = None  # the prompt checker's probability of "unsafe" (None: no checker)
    nsfw: bool | None = None  # the image checker flagged it (then the image is black); None: not checked
    rerank_score: float | None = None  # the reranker's score of the kept candidate (None: no reranker)
    candidate: int | None = None  # index of the kept candidate (seed: candidate_seed(seed, candidate))
    prompt_truncated: bool = False


@dataclass
class _Job:
    """One image to denoise (a reranker candidate counts as one)."""

    result: int
    candidate: int
    seed: int
    prompt: str
    negative: str


# ---------------------------------------------------------------------------------------------------- model
class PaintModel:
    """VisCPM-Paint. Build with :meth:`from_pretrained`; draw with :meth:`generate`.

    Optional components (off unless given): `prompt_checker` (refuses unsafe prompts), `image_checker` (blacks
    out and flags NSFW images), `reranker` (draws N candidates per image, keeps the best). See `viscpm.safety`.
    """

    def __init__(
        self,
        llm: CPMBee,
        trans_block: TransBlock,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        tokenizer: CPMBeeTokenizer,
        config: PaintConfig,
        *,
        name: str = "viscpm-paint",
        prompt_checker: PromptSafetyChecker | None = None,
        image_checker: ImageSafetyChecker | None = None,
        reranker: ClipReranker | None = None,
        load_reports: dict[str, LoadReport] | None = None,
    ) -> None:
        if tokenizer.vocab_size != config.llm.vocab_size:
            raise ValueError(f"vocab has {tokenizer.vocab_size} tokens, the model {config.llm.vocab_size}")
        self.llm, self.trans_block, self.unet, self.vae = llm.eval(), trans_block.eval(), unet.eval(), vae.eval()
        self.tokenizer, self.config, self.name = tokenizer, config, name
        self.prompt_checker, self.image_checker, self.reranker = prompt_checker, image_checker, reranker
        self.load_reports = load_reports or {}
        self._unet_fn: Callable[..., Any] = self.unet  # the UNet as called by denoise: compiled by compile_unet
        # encoded negative prompts (the empty one above all), shared by every call; bounded
        self._negative_cache: dict[tuple[str, bool], EncodedText] = {}

    def compile_unet(self, **options: Any) -> None:
        """torch.compile the UNet as denoise calls it (defaults: CUDA graphs per shape, no graph break);
        weights and state dicts stay those of `self.unet`."""
        self._unet_fn = torch.compile(self.unet, **{"mode": "reduce-overhead", "fullgraph": True, "dynamic": False, **options})

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    # ---- construction -----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path_or_preset: str | Path,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        *,
        checkpoint: str | None = None,
        diffusion_dtype: str | torch.dtype | None = None,
        prompt_checker: str | Path | None = None,
        image_checker: str | Path | None = None,
        reranker: str | Path | None = None,
        rerank_candidates: int | None = None,
        compile: bool = False,
    ) -> "PaintModel":
        """`tiny` (deterministic random weights, synthetic vocab, no files) or a folder holding `bee.txt`, the
        weights - the original `pytorch_model.v1.bin` (any single `.pt`/`.bin`), or our converted
        `model.safetensors[.index.json]` + `viscpm_config.json` - and the VAE: `vae.*` keys in the weights, a
        diffusers folder `vae/` (config.json + diffusion_pytorch_model.safetensors/.bin) or `vae.safetensors`
        (config from viscpm_config.json, default SD 2.1-base). `diffusion_dtype` sets UNet/VAE/trans_block
        apart from CPM-Bee (the original ran the UNet in fp32). The optional components are folders, see
        `viscpm.safety`; `rerank_candidates`: images the reranker draws per requested image (default: the
        original's 4). `compile=True` compiles the UNet with torch.compile (same images, slower first batch)."""
        device = torch.device(device)
        model = cls._load(path_or_preset, device, torch_dtype(dtype, device), diffusion_dtype, checkpoint)
        from . import safety

        if prompt_checker is not None:
            model.prompt_checker = safety.PromptSafetyChecker.from_folder(prompt_checker, device=device)
        if image_checker is not None:
            model.image_checker = safety.ImageSafetyChecker.from_folder(image_checker, device=device)
        if reranker is not None:
            kwargs = {} if rerank_candidates is None else {"num_candidates": rerank_candidates}
            model.reranker = safety.ClipReranker.from_folder(reranker, device=device, **kwargs)
        if compile:
            model.compile_unet()
        return model

    @classmethod
    def _load(cls, path_or_preset: str | Path, device: torch.device, dtype: torch.dtype,
              diffusion_dtype: str | torch.dtype | None, checkpoint: str | None) -> "PaintModel":
        if str(path_or_preset) == "tiny":
            return cls.tiny(device=device, dtype=dtype, diffusion_dtype=diffusion_dtype)
        bundled = bundled_model_folder(path_or_preset, "paint")  # `shapes`: shipped with the package
        folder, tokenizer, config_dict = open_model_folder(bundled or path_or_preset, "paint", checkpoint)
        config = PaintConfig.from_dict(config_dict) if config_dict else PaintConfig()
        weights = find_paint_checkpoint(folder, checkpoint)
        logger.info("loading VisCPM-Paint from %s", weights)
        state = read_state_dict(weights)
        vae_state = None
        if not any(k.startswith("vae.") for k in state):
            vae_state, vae_config = read_vae(folder)
            if vae_config is not None:
                config = replace(config, vae=vae_config)
        return cls.from_state_dict(state, config, tokenizer, device=device, dtype=dtype, vae_state=vae_state,
                                   diffusion_dtype=diffusion_dtype, name=str(path_or_preset) if bundled else folder.name)

    @classmethod
    def from_state_dict(
        cls,
        state: Mapping[str, torch.Tensor],
        config: PaintConfig,
        tokenizer: CPMBeeTokenizer,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
        *,
        vae_state: Mapping[str, torch.Tensor] | None = None,
        diffusion_dtype: torch.dtype | str | None = None,
        name: str = "viscpm-paint",
    ) -> "PaintModel":
        """Strict: `state` holds `llm.*`, `trans_block.*`, `unet.*` (the original layout) and optionally
        `vae.*`; otherwise the VAE comes from `vae_state` (diffusers key names). Anything else raises
        CheckpointError naming the keys."""
        dtype = torch_dtype(dtype)
        ddtype = dtype if diffusion_dtype is None else torch_dtype(diffusion_dtype)
        check_parts(state, PAINT_PREFIXES, "VisCPM-Paint")
        has_vae = any(k.startswith("vae.") for k in state)
        if vae_state is None and not has_vae:
            raise CheckpointError("no VAE weights: the checkpoint has no vae.* keys and no separate VAE was given "
                                  f"(put a diffusers '{VAE_FOLDER}/' folder or '{VAE_FILE}' next to it)")
        if vae_state is not None and has_vae:
            raise CheckpointError("VAE weights given twice: vae.* keys in the checkpoint and a separate VAE")
        (llm, trans_block, unet, vae), reports = _load_parts(state, config, device, dtype, ddtype, vae_state)
        unet, vae = _cast(unet, device, ddtype), _cast(vae, device, vae_dtype(config, ddtype))
        return cls(llm, trans_block, unet, vae, tokenizer, config, name=name, load_reports=reports)

    @classmethod
    def tiny(cls, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32, seed: int = 0,
             diffusion_dtype: torch.dtype | str | None = None) -> "PaintModel":
        """Deterministic random tiny model (the reference fixtures' sizes, synthetic vocab): for tests/demos."""
        dtype = torch_dtype(dtype)
        ddtype = dtype if diffusion_dtype is None else torch_dtype(diffusion_dtype)
        tokenizer = CPMBeeTokenizer.synthetic()
        config = PaintConfig.from_name("tiny", vocab_size=tokenizer.vocab_size)
        llm = CPMBee(config.llm).init_random_(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            trans_block = TransBlock.from_config(config)
            unet = UNet2DConditionModel.from_config(config.unet)
            vae = AutoencoderKL.from_config(config.vae)
        return cls(llm.to(device=device, dtype=dtype), trans_block.to(device=device, dtype=ddtype),
                   _cast(unet, device, ddtype), _cast(vae, device, vae_dtype(config, ddtype)),
                   tokenizer, config, name="tiny")

    def original_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights in the original Paint checkpoint layout (`llm.*`, `trans_block.*`, `unet.*`) plus `vae.*`."""
        parts = ((self.llm, CPMBEE_KEY_MAP), (self.trans_block, TRANS_BLOCK_KEY_MAP), (self.unet, UNET_KEY_MAP),
                 (self.vae, vae_key_map("vae.")))
        return {key: tensor for module, key_map in parts for key, tensor in original_state_dict(module, key_map).items()}

    # ---- text side --------------------------------------------------------------------------------------
    def build_inputs(self, prompt: str, negative_prompt: str | None = None, *, trusted: bool = False) -> tuple[BeeInputs, BeeInputs]:
        """(cond, uncond) structured inputs, each right-padded to the pair's common length: exactly what the
        original's `build_input` feeds CPM-Bee (for inspection; :meth:`generate` encodes distinct texts once)."""
        cond, uncond = build_paint_pair(self.tokenizer, prompt, negative_prompt, trusted=trusted,
                                        max_length=self.config.max_prompt_length)
        length = max(len(cond), len(uncond))
        return collate([cond], pad_to=length)[0], collate([uncond], pad_to=length)[0]

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], *, trusted: bool = False, batch_size: int = 1) -> list[EncodedText]:
        """CPM-Bee + trans_block for each text (longest first). Texts are user text (escaped) unless `trusted`.
        Each result holds its tokens plus one padding position; see :class:`EncodedText`.

        `batch_size` texts per forward (similar lengths together: longest first). Padded batches of different
        shapes round differently in the matmuls, which can move a few uint8 pixels by 1 depending on the other
        texts of the batch; `batch_size=1` (the default) makes every text's numbers its own."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        samples = [build_paint_sample(self.tokenizer, t, trusted=trusted, max_length=self.config.max_prompt_length)
                   for t in texts]
        order = sorted(range(len(samples)), key=lambda i: -len(samples[i]))
        out: list[EncodedText | None] = [None] * len(samples)
        tb_dtype = self.trans_block.proj.weight.dtype
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            chunk = [samples[i] for i in rows]
            # one extra position so every row carries the padding state as well
            inputs, metas = collate(chunk, pad_to=max(len(s) for s in chunk) + 1)
            _, hidden = self.llm(inputs.to(self.device), return_logits=False)
            states = self.trans_block(hidden.to(tb_dtype))  # the original casts to the UNet dtype first
            for r, i in enumerate(rows):
                n = metas[r].length + 1
                out[i] = EncodedText(hidden[r, :n].clone(), states[r, :n].clone(), metas[r].truncated)
        return out  # type: ignore[return-value]

    def encode_pair(self, prompt: str, negative_prompt: str | None = None, *, trusted: bool = False
                    ) -> tuple[EncodedText, EncodedText, int]:
        """(cond, uncond, padded length): the pair of texts of one prompt as the original pads them."""
        cond, uncond = self.encode_texts([prompt, "" if negative_prompt is None else negative_prompt], trusted=trusted)
        return cond, uncond, max(cond.length, uncond.length)

    # ---- image side ---------------------------------------------------------------------------------------
    def _check_size(self, sampling: SamplingConfig) -> tuple[int, int]:
        height = sampling.height or self.config.default_size
        width = sampling.width or self.config.default_size
        f = self.config.vae_scale_factor
        for name, v in (("height", height), ("width", width)):
            if v % f:
                raise ValueError(f"{name} {v} is not a multiple of the VAE's scale factor {f}")
        n_train = int(self.config.scheduler.get("num_train_timesteps", 1000))
        if sampling.num_inference_steps > n_train:
            raise ValueError(f"num_inference_steps {sampling.num_inference_steps} > the scheduler's {n_train} training steps")
        return height, width

    def initial_latents(self, generators: Sequence[torch.Generator], height: int, width: int) -> torch.Tensor:
        """(n, C, h, w) float32 on the model's device: one draw per image from its own (CPU) generator."""
        f = self.config.vae_scale_factor
        shape = (1, self.config.latent_channels, height // f, width // f)
        # float32 on the CPU whatever the model's device/dtype: the same seed gives the same noise everywhere
        return torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators]).to(self.device)

    @torch.inference_mode()
    def denoise(
        self,
        cond_states: torch.Tensor,
        uncond_states: torch.Tensor,
        generators: Sequence[torch.Generator],
        sampling: SamplingConfig,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Classifier-free-guided denoising of n images; `cond_states`/`uncond_states` are (n, P, C)
        trans_block outputs (padded as the original). Returns the final latents (n, C, h, w), float32.
        `callback(step, timestep, latents)` sees the latents after each step. `text_mask` (n, P) bool: the
        positions each image's cross-attention reads (None: all), for pairs padded further than the original."""
        n = cond_states.shape[0]
        if uncond_states.shape != cond_states.shape or len(generators) != n:
            raise ValueError(f"cond {tuple(cond_states.shape)}, uncond {tuple(uncond_states.shape)} and "
                             f"{len(generators)} generators do not describe the same images")
        height, width = self._check_size(sampling)
        # 1. timesteps of a fresh scheduler
        scheduler = make_scheduler(self.config.scheduler, sampling)
        scheduler.set_timesteps(sampling.num_inference_steps, device=self.device)
        # 2. initial noise, per image from its own generator; latents stay float32 through the loop
        latents = self.initial_latents(generators, height, width) * scheduler.init_noise_sigma
        # 3. one UNet batch [uncond_1..n, cond_1..n], as the original
        encoder_states = torch.cat((uncond_states, cond_states)).to(device=self.device, dtype=self.dtype)
        mask = None if text_mask is None else torch.cat((text_mask, text_mask)).to(device=self.device, dtype=self.dtype)
        gens = list(generators)
        for i, t in enumerate(scheduler.timesteps):
            # 4. predict the noise for both branches
            model_input = scheduler.scale_model_input(torch.cat((latents, latents)), t)
            noise = self._unet_fn(model_input.to(self.dtype), t, encoder_hidden_states=encoder_states,
                                  encoder_attention_mask=mask, return_dict=False)[0].float()
            # 5. guidance
            noise_uncond, noise_cond = noise.chunk(2)
            guided = noise_uncond + sampling.guidance_scale * (noise_cond - noise_uncond)
            # 6. step; DDPM draws its variance noise from each image's generator in turn (t > 0)
            latents = scheduler.step(guided, t, latents, generator=gens, return_dict=False)[0]
            if callback is not None:
                callback(i, int(t), latents)
        return latents

    @torch.inference_mode()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(n, H, W, 3) float32 on the CPU in [0, 1]."""
        z = latents.to(device=self.device, dtype=self.vae.dtype) * (1 / self.vae.config.scaling_factor)
        image = self.vae.decode(z, return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu()

    @torch.inference_mode()
    def decode_to_uint8(self, latents: torch.Tensor) -> np.ndarray:
        """(n, H, W, 3) uint8: `to_uint8(decode_latents(latents))` computed on the model's device (the same float32
        ops, round-half-even), so a quarter of the bytes crosses to the host and the host does no pixel work."""
        z = latents.to(device=self.device, dtype=self.vae.dtype) * (1 / self.vae.config.scaling_factor)
        image = self.vae.decode(z, return_dict=False)[0]
        image = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float()
        return (image * 255).round().to(torch.uint8).cpu().numpy()

    # ---- the batched entry point ----------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[str],
        negative_prompts: Sequence[str | None] | str | None = None,
        seeds: Sequence[int] | None = None,
        sampling: SamplingConfig | None = None,
        *,
        images_per_prompt: int = 1,
        output: str = "pil",
        batch_size: int = 8,
        trusted: bool = False,
    ) -> list[PaintResult]:
        """Images for many prompts in one call.

        `negative_prompts`: one per prompt, one for all, or None (empty). `seeds`: one per image
        (len(prompts) * images_per_prompt), or one per prompt (image j then uses seed + j); None draws random
        seeds (returned in the results). `batch_size`: images per UNet call (the UNet sees twice as many rows) and
        prompts per CPM-Bee forward; with 1, an image's bytes depend on its own inputs only (not on the batch).
        `output`: "pil" or "np" (uint8 (H, W, 3)). Prompts are user text (escaped) unless `trusted`.
        """
        sampling = sampling or SamplingConfig()
        prompts, negatives, image_seeds = check_paint_request(prompts, negative_prompts, seeds, images_per_prompt,
                                                              output, batch_size)
        height, width = self._check_size(sampling)
        results = [PaintResult(image=None, prompt_index=i // images_per_prompt, seed=s) for i, s in enumerate(image_seeds)]
        if not results:
            return []

        # 1. prompt safety: refused prompts get no image
        refused: set[int] = set()
        if self.prompt_checker is not None:
            distinct = sorted(set(prompts))
            scores = dict(zip(distinct, self.prompt_checker.scores(distinct)))
            for r in results:
                r.prompt_score = scores[prompts[r.prompt_index]]
                r.prompt_flagged = r.prompt_score > self.prompt_checker.threshold
                if r.prompt_flagged:
                    refused.add(r.prompt_index)
            if refused:
                logger.info("prompt checker refused %d of %d prompts", len(refused), len(set(prompts)))

        # 2. jobs: one per image, or num_candidates per image with the reranker
        k = self.reranker.num_candidates if self.reranker is not None else 1
        jobs = [_Job(i, c, candidate_seed(r.seed, c), prompts[r.prompt_index], negatives[r.prompt_index])
                for i, r in enumerate(results) if r.prompt_index not in refused for c in range(k)]
        if not jobs:
            return results

        # 3. text: every distinct prompt / negative prompt through CPM-Bee once, the prompts batch_size at a time
        encoded = self._encode_for(jobs, trusted, batch_size)
        for i, r in enumerate(results):
            if r.prompt_index not in refused:
                r.prompt_truncated = encoded[prompts[r.prompt_index]].truncated

        # 4. UNet: a model batch is one call per step whatever its pair lengths (similar lengths batched together)
        pixels: dict[tuple[int, int], np.ndarray] = {}
        pair_length = {id(j): max(encoded[j.prompt].length, encoded[j.negative].length) for j in jobs}
        ordered = sorted(jobs, key=lambda j: pair_length[id(j)])  # stable: request order within a length
        for start in range(0, len(ordered), batch_size):
            chunk = ordered[start : start + batch_size]
            lengths = [pair_length[id(j)] for j in chunk]
            length = max(lengths)
            cond = torch.stack([encoded[j.prompt].padded_states(length) for j in chunk])
            uncond = torch.stack([encoded[j.negative].padded_states(length) for j in chunk])
            mask = None
            if min(lengths) < length:  # each image reads exactly its own pair's positions
                mask = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
            gens = [torch.Generator("cpu").manual_seed(j.seed) for j in chunk]
            logger.debug("denoising %d image(s), text lengths %s", len(chunk), lengths)
            latents = self.denoise(cond, uncond, gens, sampling, text_mask=mask)
            images = self.decode_to_uint8(latents)
            for j, image in zip(chunk, images):
                pixels[(j.result, j.candidate)] = image

        # 5. image safety: flagged images are black
        flags: dict[tuple[int, int], bool] = {}
        if self.image_checker is not None:
            keys = list(pixels)
            for key, flagged in zip(keys, self.image_checker.check([Image.fromarray(pixels[key]) for key in keys])):
                flags[key] = flagged
                if flagged:
                    pixels[key] = np.zeros_like(pixels[key])

        # 6. best of k; a flagged candidate is kept only when all are flagged
        for i, r in enumerate(results):
            if r.prompt_index in refused:
                continue
            chosen = 0
            if self.reranker is not None:
                clean = [c for c in range(k) if not flags.get((i, c), False)] or list(range(k))
                scores = self.reranker.scores(prompts[r.prompt_index], [Image.fromarray(pixels[(i, c)]) for c in clean])
                best = int(np.argmax(scores))
                chosen, r.rerank_score = clean[best], float(scores[best])
                r.candidate = chosen
            array = pixels[(i, chosen)]
            r.nsfw = flags.get((i, chosen)) if self.image_checker is not None else None
            r.image = Image.fromarray(array) if output == "pil" else array
        logger.info("painted %d image(s) at %dx%d, %d %s steps", len(jobs), width, height,
                    sampling.num_inference_steps, sampling.scheduler)
        return results

    _NEGATIVE_CACHE_SIZE = 16

    def _encode_for(self, jobs: Sequence[_Job], trusted: bool, batch_size: int) -> dict[str, EncodedText]:
        """Every distinct text of the jobs through CPM-Bee once: the prompts `batch_size` at a time (one 10B forward
        per chunk, not per text), the negative prompts each on its own and cached across calls, so the cached
        numbers never depend on the batch they were first seen in."""
        negatives = {j.negative for j in jobs}
        cached = {t: self._negative_cache[(t, trusted)] for t in negatives if (t, trusted) in self._negative_cache}
        new_negatives = sorted(negatives - set(cached))
        prompts = sorted({j.prompt for j in jobs} - negatives)
        encoded = dict(zip(new_negatives, self.encode_texts(new_negatives, trusted=trusted))) if new_negatives else {}
        if prompts:
            encoded.update(zip(prompts, self.encode_texts(prompts, trusted=trusted, batch_size=batch_size)))
        for t in new_negatives:
            if len(self._negative_cache) >= self._NEGATIVE_CACHE_SIZE:
                self._negative_cache.pop(next(iter(self._negative_cache)))
            self._negative_cache[(t, trusted)] = encoded[t]
        return {**encoded, **cached}


# ------------------------------------------------------------------------------------------- checkpoints
def _cast(module: nn.Module, device: str | torch.device, dtype: torch.dtype) -> Any:
    return nn.Module.to(module, device=device, dtype=dtype)


def validate_paint_checkpoint(state: Mapping[str, torch.Tensor], config: PaintConfig,
                              vae_state: Mapping[str, torch.Tensor] | None = None) -> dict[str, LoadReport]:
    """Check every key and shape on the meta device (no memory); the VAE only if `state` has `vae.*` keys or
    `vae_state` is given (the original checkpoint has none). Raises CheckpointError; returns the reports."""
    check_parts(state, PAINT_PREFIXES, "VisCPM-Paint")
    with_vae = vae_state is not None or any(k.startswith("vae.") for k in state)
    return _load_parts(state, config, "meta", None, None, vae_state, with_vae)[1]


def _load_parts(state: Mapping[str, torch.Tensor], config: PaintConfig, device: str | torch.device,
                dtype: torch.dtype | None, ddtype: torch.dtype | None,
                vae_state: Mapping[str, torch.Tensor] | None, with_vae: bool = True) -> tuple[tuple, dict[str, LoadReport]]:
    """((llm, trans_block, unet, vae or None), reports): each part through its key map. The VAE comes from `vae.*`
    keys of `state`, or from `vae_state` (diffusers names). The UNet and VAE are left in the checkpoint's dtype:
    diffusers models are cast with nn.Module.to (see `_cast`), as ModelMixin.to warns on every dtype cast."""
    reports: dict[str, LoadReport] = {}
    llm, reports["llm"] = load_cpmbee(state, config.llm, device=device, dtype=dtype)
    trans_block, reports["trans_block"] = load_into(lambda: TransBlock.from_config(config), state,
                                                    TRANS_BLOCK_KEY_MAP, "trans_block", device, ddtype)
    unet, reports["unet"] = load_into(lambda: UNet2DConditionModel.from_config(config.unet), state, UNET_KEY_MAP,
                                      "UNet", device)
    vae = None
    if with_vae:
        source, prefix = (state, "vae.") if vae_state is None else (vae_state, "")
        vae, reports["vae"] = load_into(lambda: AutoencoderKL.from_config(config.vae), source, vae_key_map(prefix),
                                        "VAE", device)
    return (llm, trans_block, unet, vae), reports


def find_paint_checkpoint(folder: Path, name: str | None = None) -> Path:
    """The Paint weights in `folder` (see checkpoint.find_checkpoint); vae.safetensors is never the checkpoint."""
    return find_checkpoint(folder, name, ORIGINAL_PAINT_CHECKPOINTS, exclude=(VAE_FILE,))


__all__ = ["EncodedText", "PaintConfig", "PaintModel", "PaintResult", "SamplingConfig", "TransBlock", "candidate_seed",
           "find_paint_checkpoint", "make_scheduler", "read_vae", "to_uint8", "validate_paint_checkpoint"]
