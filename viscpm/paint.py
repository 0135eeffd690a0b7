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
  exactly its own pair's length, and the UNet runs images of equal pair length together.
* Every image has its own CPU ``torch.Generator``: initial latents first, then one latents-shaped draw per
  DDPM step with t > 0, as the original's single generator at batch 1. An image depends only on (prompt,
  negative prompt, seed, sampling settings), never on the rest of the batch, nor on the device.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import random
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from PIL import Image
from torch import nn

from .checkpoint import (
    bundled_model_folder,
    find_checkpoint,
    open_model_folder,
    CPMBEE_KEY_MAP,
    CheckpointError,
    KeyMap,
    LoadReport,
    cpmbee_original_keys,
    load_cpmbee,
    load_into,
    read_state_dict,
    reverse_key_map,
)
from .config import CPMBeeConfig
from .cpmbee import CPMBee, torch_dtype
from .inputs import BeeInputs, build_paint_pair, build_paint_sample, collate
from .tokenizer import CPMBeeTokenizer

if TYPE_CHECKING:
    from .safety import ClipReranker, ImageSafetyChecker, PromptSafetyChecker

logger = logging.getLogger(__name__)

VAE_FOLDER = "vae"
VAE_FILE = "vae.safetensors"
ORIGINAL_PAINT_CHECKPOINTS = ("pytorch_model.v1.bin",)
CHECKPOINT_PREFIXES = ("llm.", "trans_block.", "unet.", "vae.")

# Stable Diffusion 2.1-base (stabilityai/stable-diffusion-2-1-base: unet/, vae/, scheduler/ configs); the
# original builds its UNet from this config and trains it, and takes VAE and scheduler unchanged.
SD21_BASE_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20],
    "use_linear_projection": True,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "center_input_sample": False,
    "dual_cross_attention": False,
}
SD21_BASE_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD21_BASE_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
}

SCHEDULERS = ("ddpm", "dpmsolver++")
# "original": what VisCPM shipped with (diffusers 0.15.0, whose DDPM ignored steps_offset: 50 steps ->
# 980, 960, ..., 0); "diffusers-current": today's diffusers with the SD config (steps_offset 1: 981, ..., 1).
TIMESTEP_SPACINGS = ("original", "diffusers-current")
OUTPUTS = ("pil", "np")


def _plain(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers config as a JSON-able dict without its private keys (`_class_name`, `_use_default_values`)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(cfg).items() if not k.startswith("_")}


# ---------------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class PaintConfig:
    """Everything that shapes a Paint model. The diffusers configs are plain dicts (their constructor kwargs)."""

    llm: CPMBeeConfig = field(default_factory=lambda: CPMBeeConfig.from_name("cpm-bee-10b"))
    unet: dict[str, Any] = field(default_factory=lambda: dict(SD21_BASE_UNET))
    vae: dict[str, Any] = field(default_factory=lambda: dict(SD21_BASE_VAE))
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SD21_BASE_SCHEDULER))
    trans_block_eps: float = 1e-6
    # Prompts longer than this (in tokens, incl. the structure tokens) are cut and flagged. The original has no
    # limit; a cap keeps one pathological prompt from exhausting memory in a batch job.
    max_prompt_length: int | None = 512

    def __post_init__(self) -> None:
        object.__setattr__(self, "unet", _plain(self.unet))
        object.__setattr__(self, "vae", _plain(self.vae))
        object.__setattr__(self, "scheduler", _plain(self.scheduler))
        if not isinstance(self.unet.get("cross_attention_dim"), int):
            raise ValueError("unet.cross_attention_dim must be one int (the trans_block's output width)")
        if self.unet.get("in_channels", 4) != self.vae.get("latent_channels", 4):
            raise ValueError(f"UNet in_channels {self.unet.get('in_channels')} != VAE latent_channels "
                             f"{self.vae.get('latent_channels')}")
        if self.max_prompt_length is not None and self.max_prompt_length < 16:
            raise ValueError(f"max_prompt_length must be >= 16 or None, got {self.max_prompt_length}")

    @property
    def cross_attention_dim(self) -> int:
        return int(self.unet["cross_attention_dim"])

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.get("block_out_channels", [64])) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.get("latent_channels", 4))

    @property
    def default_size(self) -> int:
        """Native image size: UNet sample_size * VAE factor (512 for SD 2.1-base), as the original's default."""
        return int(self.unet.get("sample_size", 64)) * self.vae_scale_factor

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "paint", "llm": self.llm.to_dict(), "unet": dict(self.unet), "vae": dict(self.vae),
                "scheduler": dict(self.scheduler), "trans_block_eps": self.trans_block_eps,
                "max_prompt_length": self.max_prompt_length}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PaintConfig":
        if data.get("kind", "paint") != "paint":
            raise ValueError(f"not a paint config (kind={data.get('kind')!r})")
        unknown = set(data) - {"kind", "llm", "unet", "vae", "scheduler", "trans_block_eps", "max_prompt_length"}
        if unknown:
            raise ValueError(f"unknown Paint config keys: {sorted(unknown)}")
        return cls(
            llm=CPMBeeConfig.from_dict(data["llm"]) if "llm" in data else CPMBeeConfig.from_name("cpm-bee-10b"),
            unet=data.get("unet", SD21_BASE_UNET),
            vae=data.get("vae", SD21_BASE_VAE),
            scheduler=data.get("scheduler", SD21_BASE_SCHEDULER),
            trans_block_eps=data.get("trans_block_eps", 1e-6),
            max_prompt_length=data.get("max_prompt_length", 512),
        )

    @classmethod
    def from_name(cls, name: str, vocab_size: int | None = None) -> "PaintConfig":
        """`viscpm-paint` (CPM-Bee 10B + SD 2.1-base) or `tiny` (small random model; pass the vocab size)."""
        if name == "viscpm-paint":
            return cls()
        if name == "tiny":
            if vocab_size is None:
                raise ValueError("the tiny preset needs vocab_size (e.g. CPMBeeTokenizer.synthetic().vocab_size)")
            return tiny_paint_config(vocab_size)
        raise ValueError(f"unknown Paint preset {name!r}; known: ['tiny', 'viscpm-paint']")


def tiny_paint_config(vocab_size: int) -> PaintConfig:
    """The structure of the real model at test size (the shapes of the reference fixtures): 64x64 images."""
    llm = CPMBeeConfig.from_name("tiny", vocab_size=vocab_size)
    unet = {
        "sample_size": 32, "in_channels": 4, "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [32, 64], "layers_per_block": 1, "cross_attention_dim": 32,
        "attention_head_dim": 8, "use_linear_projection": True,
    }
    vae = {
        "in_channels": 3, "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
        "block_out_channels": [32, 64], "layers_per_block": 1, "latent_channels": 4, "sample_size": 64,
    }
    return PaintConfig(llm=llm, unet=unet, vae=vae)


@dataclass(frozen=True)
class SamplingConfig:
    """How to denoise. Part of an image's identity: the same (prompt, negative prompt, seed, SamplingConfig)
    gives the same image."""

    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    height: int | None = None  # None: the model's native size (512 for SD 2.1-base)
    width: int | None = None
    scheduler: str = "ddpm"  # "ddpm" (the original) | "dpmsolver++" (DPMSolverMultistepScheduler, fewer steps)
    timestep_spacing: str = "original"  # see TIMESTEP_SPACINGS

    def __post_init__(self) -> None:
        steps = self.num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_inference_steps must be an int >= 1, got {steps!r}")
        g = self.guidance_scale
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {g!r}")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % 8):
                raise ValueError(f"{name} must be a positive multiple of 8 (or None for the model's size), got {v!r}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {self.timestep_spacing!r}")

    @classmethod
    def fast(cls, **overrides: Any) -> "SamplingConfig":
        """20 DPM-Solver++ steps: about the quality of 50 DDPM steps at 40% of the UNet calls."""
        return cls(**{"num_inference_steps": 20, "scheduler": "dpmsolver++", **overrides})


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


# key maps from the original checkpoint (`trans_block.*`, `unet.*`) and a VAE state dict (ours or `vae.*`)
TRANS_BLOCK_KEY_MAP = KeyMap("trans_block.", ((r"w_out_res\.weight", "proj.weight"), (r"layernorm\.(weight|bias)", r"norm.\1")))
UNET_KEY_MAP = KeyMap("unet.", ((r"(.+)", r"\1"),))


def vae_key_map(prefix: str = "") -> KeyMap:
    """diffusers names; the VAE attention of older diffusers (<= 0.15, as on the hub) is renamed."""
    return KeyMap(prefix, (
        (r"(.*attentions\.\d+\.)query\.(weight|bias)", r"\1to_q.\2"),
        (r"(.*attentions\.\d+\.)key\.(weight|bias)", r"\1to_k.\2"),
        (r"(.*attentions\.\d+\.)value\.(weight|bias)", r"\1to_v.\2"),
        (r"(.*attentions\.\d+\.)proj_attn\.(weight|bias)", r"\1to_out.0.\2"),
        (r"(.+)", r"\1"),
    ))


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
    prompt_flagged: bool = False  # the prompt checker refused the prompt: no image was made
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


def _default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def to_uint8(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Float images in [0, 1] -> uint8 with round-half-even, as the original's numpy_to_pil."""
    if isinstance(images, torch.Tensor):
        images = images.detach().float().cpu().numpy()
    return (np.asarray(images, dtype=np.float32) * 255).round().astype(np.uint8)


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
    ) -> "PaintModel":
        """`tiny` (deterministic random weights, synthetic vocab, no files), `shapes` (a small model trained on
        synthetic shapes, shipped in the package) or a folder holding `bee.txt`, the
        weights - the original `pytorch_model.v1.bin` (any single `.pt`/`.bin`), or our converted
        `model.safetensors[.index.json]` + `viscpm_config.json` - and the VAE: `vae.*` keys in the weights, a
        diffusers folder `vae/` (config.json + diffusion_pytorch_model.safetensors/.bin) or `vae.safetensors`
        (config from viscpm_config.json, default SD 2.1-base). `diffusion_dtype` sets UNet/VAE/trans_block
        apart from CPM-Bee (the original ran the UNet in fp32). The optional components are folders, see
        `viscpm.safety`; `rerank_candidates`: images the reranker draws per requested image (default: the
        original's 4)."""
        device = torch.device(device)
        dtype = torch_dtype(dtype) if dtype is not None else _default_dtype(device)
        if str(path_or_preset) == "tiny":
            model = cls.tiny(device=device, dtype=dtype, diffusion_dtype=diffusion_dtype)
        else:
            bundled = bundled_model_folder(path_or_preset, "paint")
            folder, tokenizer, config_dict = open_model_folder(bundled or path_or_preset)
            config = PaintConfig.from_dict(config_dict) if config_dict else PaintConfig()
            weights = find_paint_checkpoint(folder, checkpoint)
            logger.info("loading VisCPM-Paint from %s", weights)
            state = read_state_dict(weights)
            vae_state = None
            if not any(k.startswith("vae.") for k in state):
                vae_state, vae_config = read_vae(folder)
                if vae_config is not None:
                    config = replace(config, vae=vae_config)
            model = cls.from_state_dict(state, config, tokenizer, device=device, dtype=dtype, vae_state=vae_state,
                                        diffusion_dtype=diffusion_dtype,
                                        name=str(path_or_preset) if bundled else folder.name)
        from . import safety

        if prompt_checker is not None:
            model.prompt_checker = safety.PromptSafetyChecker.from_folder(prompt_checker, device=device)
        if image_checker is not None:
            model.image_checker = safety.ImageSafetyChecker.from_folder(image_checker, device=device)
        if reranker is not None:
            kwargs = {} if rerank_candidates is None else {"num_candidates": rerank_candidates}
            model.reranker = safety.ClipReranker.from_folder(reranker, device=device, **kwargs)
        return model

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
        ddtype = torch_dtype(diffusion_dtype) if diffusion_dtype is not None else dtype
        check_paint_keys(state, need_vae=vae_state is None)
        if vae_state is not None and any(k.startswith("vae.") for k in state):
            raise CheckpointError("VAE weights given twice: vae.* keys in the checkpoint and a separate VAE")
        reports: dict[str, LoadReport] = {}
        llm, reports["llm"] = load_cpmbee(state, config.llm, device=device, dtype=dtype)
        trans_block, reports["trans_block"] = load_into(
            lambda: TransBlock(config.llm.dim_model, config.cross_attention_dim, config.trans_block_eps),
            state, TRANS_BLOCK_KEY_MAP, "trans_block", device, ddtype)
        # diffusers models are cast with nn.Module.to: ModelMixin.to warns on every dtype cast
        unet, reports["unet"] = load_into(lambda: UNet2DConditionModel.from_config(config.unet), state,
                                          UNET_KEY_MAP, "UNet", device)
        vae_source, prefix = (state, "vae.") if vae_state is None else (vae_state, "")
        vae, reports["vae"] = load_into(lambda: AutoencoderKL.from_config(config.vae), vae_source,
                                        vae_key_map(prefix), "VAE", device)
        unet, vae = _cast(unet, device, ddtype), _cast(vae, device, vae_dtype(config, ddtype))
        return cls(llm, trans_block, unet, vae, tokenizer, config, name=name, load_reports=reports)

    @classmethod
    def tiny(cls, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32, seed: int = 0,
             diffusion_dtype: torch.dtype | str | None = None) -> "PaintModel":
        """Deterministic random tiny model (the reference fixtures' sizes, synthetic vocab): for tests/demos."""
        dtype = torch_dtype(dtype)
        ddtype = torch_dtype(diffusion_dtype) if diffusion_dtype is not None else dtype
        tokenizer = CPMBeeTokenizer.synthetic()
        config = tiny_paint_config(tokenizer.vocab_size)
        llm = CPMBee(config.llm).init_random_(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            trans_block = TransBlock(config.llm.dim_model, config.cross_attention_dim, config.trans_block_eps)
            unet = UNet2DConditionModel.from_config(config.unet)
            vae = AutoencoderKL.from_config(config.vae)
        return cls(llm.to(device=device, dtype=dtype), trans_block.to(device=device, dtype=ddtype),
                   _cast(unet, device, ddtype), _cast(vae, device, vae_dtype(config, ddtype)),
                   tokenizer, config, name="tiny")

    def original_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights in the original Paint checkpoint layout (`llm.*`, `trans_block.*`, `unet.*`) plus `vae.*`."""
        reverse = reverse_key_map(CPMBEE_KEY_MAP, cpmbee_original_keys(self.config.llm))
        out = {reverse[k]: v for k, v in self.llm.state_dict().items()}
        tb = self.trans_block.state_dict()
        out.update({"trans_block.w_out_res.weight": tb["proj.weight"], "trans_block.layernorm.weight": tb["norm.weight"],
                    "trans_block.layernorm.bias": tb["norm.bias"]})
        out.update({"unet." + k: v for k, v in self.unet.state_dict().items()})
        out.update({"vae." + k: v for k, v in self.vae.state_dict().items()})
        return out

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

        `batch_size` 1 (the default) encodes every text on its own: padded batches of different shapes round
        differently in the matmuls, which moved a few uint8 pixels by 1 depending on the other prompts of a call.
        Encoding is cheap next to the UNet, and this keeps an image a function of its own inputs only."""
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
    ) -> torch.Tensor:
        """Classifier-free-guided denoising of n images; `cond_states`/`uncond_states` are (n, P, C)
        trans_block outputs (padded as the original). Returns the final latents (n, C, h, w), float32.
        `callback(step, timestep, latents)` sees the latents after each step."""
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
        gens = list(generators)
        for i, t in enumerate(scheduler.timesteps):
            # 4. predict the noise for both branches
            model_input = scheduler.scale_model_input(torch.cat((latents, latents)), t)
            noise = self.unet(model_input.to(self.dtype), t, encoder_hidden_states=encoder_states,
                              return_dict=False)[0].float()
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
        seeds (returned in the results). `batch_size`: images per UNet call (the UNet sees twice as many rows).
        `output`: "pil" or "np" (uint8 (H, W, 3)). Prompts are user text (escaped) unless `trusted`.
        """
        sampling = sampling or SamplingConfig()
        prompts, negatives, image_seeds = self._check_request(prompts, negative_prompts, seeds, images_per_prompt,
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

        # 3. text: every distinct prompt / negative prompt through CPM-Bee once
        texts = sorted({j.prompt for j in jobs} | {j.negative for j in jobs})
        encoded = dict(zip(texts, self.encode_texts(texts, trusted=trusted)))
        for i, r in enumerate(results):
            if r.prompt_index not in refused:
                r.prompt_truncated = encoded[prompts[r.prompt_index]].truncated

        # 4. UNet: images of equal pair length together, in chunks of batch_size
        pixels: dict[tuple[int, int], np.ndarray] = {}
        groups: dict[int, list[_Job]] = defaultdict(list)
        for job in jobs:
            groups[max(encoded[job.prompt].length, encoded[job.negative].length)].append(job)
        for length, group in sorted(groups.items()):
            for start in range(0, len(group), batch_size):
                chunk = group[start : start + batch_size]
                cond = torch.stack([encoded[j.prompt].padded_states(length) for j in chunk])
                uncond = torch.stack([encoded[j.negative].padded_states(length) for j in chunk])
                gens = [torch.Generator("cpu").manual_seed(j.seed) for j in chunk]
                logger.debug("denoising %d image(s), text length %d", len(chunk), length)
                latents = self.denoise(cond, uncond, gens, sampling)
                images = to_uint8(self.decode_latents(latents))
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

    @staticmethod
    def _check_request(prompts, negative_prompts, seeds, images_per_prompt, output, batch_size
                       ) -> tuple[list[str], list[str], list[int]]:
        if isinstance(prompts, str):
            raise ValueError("prompts must be a sequence of str, not one str (wrap it in a list)")
        prompts = list(prompts)
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise ValueError(f"prompt {i} must be str, got {type(p).__name__}")
        n = len(prompts)
        if negative_prompts is None or isinstance(negative_prompts, str):
            negatives = [negative_prompts or ""] * n
        else:
            negatives = ["" if x is None else x for x in negative_prompts]
            if len(negatives) != n:
                raise ValueError(f"{len(negatives)} negative prompts for {n} prompts")
            for i, x in enumerate(negatives):
                if not isinstance(x, str):
                    raise ValueError(f"negative prompt {i} must be str or None, got {type(x).__name__}")
        if isinstance(images_per_prompt, bool) or not isinstance(images_per_prompt, int) or images_per_prompt < 1:
            raise ValueError(f"images_per_prompt must be an int >= 1, got {images_per_prompt!r}")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        total = n * images_per_prompt
        if seeds is None:
            rng = random.SystemRandom()
            image_seeds = [rng.randrange(2**63) for _ in range(total)]
        else:
            seeds = list(seeds)
            for s in seeds:
                if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= int(s) < 2**63:
                    raise ValueError(f"seeds must be ints in [0, 2**63), got {s!r}")
            if len(seeds) == total:
                image_seeds = [int(s) for s in seeds]
            elif len(seeds) == n:
                image_seeds = [int(s) + j for s in seeds for j in range(images_per_prompt)]
            else:
                raise ValueError(f"need one seed per image ({total}) or per prompt ({n}), got {len(seeds)}")
        return prompts, negatives, image_seeds


# ------------------------------------------------------------------------------------------- checkpoints
def _cast(module: nn.Module, device: str | torch.device, dtype: torch.dtype) -> Any:
    return nn.Module.to(module, device=device, dtype=dtype)


def vae_dtype(config: PaintConfig, dtype: torch.dtype) -> torch.dtype:
    # SD's VAE overflows in fp16 at large sizes; diffusers marks it force_upcast. bf16 is fine.
    if dtype == torch.float16 and config.vae.get("force_upcast", True):
        return torch.float32
    return dtype


def check_paint_keys(state: Mapping[str, torch.Tensor], need_vae: bool = False) -> None:
    """Keys outside the Paint layout are an error (the original's loader silently ignored them)."""
    unknown = [k for k in state if not k.startswith(CHECKPOINT_PREFIXES)]
    if unknown:
        LoadReport(unexpected=unknown).raise_if_bad("VisCPM-Paint")
    if need_vae and not any(k.startswith("vae.") for k in state):
        raise CheckpointError("no VAE weights: the checkpoint has no vae.* keys and no separate VAE was given "
                              f"(put a diffusers '{VAE_FOLDER}/' folder or '{VAE_FILE}' next to it)")


def validate_paint_checkpoint(state: Mapping[str, torch.Tensor], config: PaintConfig,
                              vae_state: Mapping[str, torch.Tensor] | None = None) -> dict[str, LoadReport]:
    """Check every key and shape on the meta device (no memory); the VAE only if `state` has `vae.*` keys or
    `vae_state` is given (the original checkpoint has none). Raises CheckpointError; returns the reports."""
    check_paint_keys(state)
    reports: dict[str, LoadReport] = {}
    _, reports["llm"] = load_cpmbee(state, config.llm, device="meta")
    _, reports["trans_block"] = load_into(
        lambda: TransBlock(config.llm.dim_model, config.cross_attention_dim, config.trans_block_eps),
        state, TRANS_BLOCK_KEY_MAP, "trans_block", "meta")
    _, reports["unet"] = load_into(lambda: UNet2DConditionModel.from_config(config.unet), state, UNET_KEY_MAP, "UNet", "meta")
    if vae_state is not None or any(k.startswith("vae.") for k in state):
        source, prefix = (state, "vae.") if vae_state is None else (vae_state, "")
        _, reports["vae"] = load_into(lambda: AutoencoderKL.from_config(config.vae), source, vae_key_map(prefix), "VAE", "meta")
    return reports


def find_paint_checkpoint(folder: Path, name: str | None = None) -> Path:
    """The Paint weights in `folder` (see checkpoint.find_checkpoint); vae.safetensors is never the checkpoint."""
    return find_checkpoint(folder, name, ORIGINAL_PAINT_CHECKPOINTS, exclude=(VAE_FILE,))


def read_vae(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(VAE state dict, its config or None) from `vae/` (diffusers layout) or `vae.safetensors` in `folder`."""
    sub = folder / VAE_FOLDER
    if sub.is_dir():
        config = json.loads((sub / "config.json").read_text()) if (sub / "config.json").is_file() else None
        for weights in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
            if (sub / weights).is_file():
                return read_state_dict(sub / weights), config
        raise FileNotFoundError(f"{sub} has no diffusion_pytorch_model.safetensors/.bin")
    if (folder / VAE_FILE).is_file():
        return read_state_dict(folder / VAE_FILE), None
    raise CheckpointError(f"no VAE in {folder}: expected a diffusers '{VAE_FOLDER}/' folder, '{VAE_FILE}', "
                          "or vae.* keys in the checkpoint")


__all__ = [
    "EncodedText",
    "PaintConfig",
    "PaintModel",
    "PaintResult",
    "SamplingConfig",
    "TransBlock",
    "candidate_seed",
    "find_paint_checkpoint",
    "make_scheduler",
    "read_vae",
    "tiny_paint_config",
    "to_uint8",
    "validate_paint_checkpoint",
]
