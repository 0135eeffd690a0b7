"""VisCPM-Chat: image(s) + question -> answer, batched.

BEiT-3 runs the image patches together with 64 learned query tokens; an MLP maps the query outputs to CPM-Bee's
width; they replace the 64 `<unk>` slots of the prompt's `image` segment; CPM-Bee decodes the answer (the
original's beam search by default). Every row of a batch has its own image, question and context, and gets the
answer it would get alone.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .beit3 import VisionQueryEncoder, load_vision_encoder
from .checkpoint import (
    LoadReport,
    find_checkpoint,
    load_cpmbee,
    open_model_folder,
    original_state_dict,
    read_state_dict,
    torch_dtype,
)
from .config import DEFAULT_QUESTION, ChatConfig, GenerationConfig
from .cpmbee import CPMBee
from .folders import ORIGINAL_CHAT_CHECKPOINTS, bundled_model_folder
from .generation import Generated, RowSpec, SpecialIds, generate
from .image import preprocess_images
from .inputs import BeeInputs, BeeSample, RowMeta, build_chat_sample, collate
from .keymaps import CPMBEE_KEY_MAP, VISION_KEY_MAP
from .tokenizer import CPMBeeTokenizer, unescape_text

logger = logging.getLogger(__name__)


@dataclass
class ChatResult:
    text: str  # the answer, user-facing (the tokenizer's `<<` escape undone)
    token_ids: list[int]
    finished: bool  # the answer ended with </s> (False: cut at max_new_tokens)
    score: float
    prompt_truncated: bool  # the prompt was longer than max_prompt_length and was cut
    image_flagged: bool | None = None  # the image safety checker's verdict; None when no checker is loaded


@dataclass
class ChatBatch:
    """A batch prepared on the host by :meth:`ChatModel.prepare` (CPU tensors) for :meth:`ChatModel.generate_batch`."""

    samples: list[BeeSample]
    inputs: BeeInputs | None  # None for an empty batch
    metas: list[RowMeta]
    pixels: torch.Tensor | None  # (B, 3, S, S) normalised float32; None: vision states come from the caller
    images: list[Image.Image] | None  # what the image safety checker looks at

    @classmethod
    def of(cls, samples: list[BeeSample], pixels: torch.Tensor | None, images: list[Image.Image] | None,
           pin: bool = False) -> "ChatBatch":
        inputs, metas = collate(samples) if samples else (None, [])
        if pin and pixels is not None:  # page-locked: the copy of the (large) pixels to the GPU is asynchronous
            pixels = pixels.pin_memory()
        return cls(samples, inputs, metas, pixels, images)

    def __len__(self) -> int:
        return len(self.samples)

    def select(self, rows: Sequence[int]) -> "ChatBatch":
        """These rows only (collated again: padding and ext columns follow the rows kept)."""
        return ChatBatch.of([self.samples[i] for i in rows], None if self.pixels is None else self.pixels[list(rows)],
                            None if self.images is None else [self.images[i] for i in rows])


class ChatModel:
    """VisCPM-Chat. Build with :meth:`from_pretrained`; ask with :meth:`answer` / :meth:`caption`."""

    def __init__(self, llm: CPMBee, vision: VisionQueryEncoder, tokenizer: CPMBeeTokenizer, config: ChatConfig,
                 name: str = "viscpm-chat", load_reports: dict[str, LoadReport] | None = None) -> None:
        if tokenizer.vocab_size != config.llm.vocab_size:
            raise ValueError(f"vocab has {tokenizer.vocab_size} tokens, the model {config.llm.vocab_size}")
        self.llm, self.vision, self.tokenizer, self.config, self.name = llm.eval(), vision.eval(), tokenizer, config, name
        self.special = SpecialIds(bos=tokenizer.bos_id, eos=tokenizer.eos_id, unk=tokenizer.unk_id,
                                  vocab_size=tokenizer.vocab_size)
        # optional NSFW checker for input images (viscpm.safety.ImageSafetyChecker or anything with .check(images))
        self.image_checker = None
        self.load_reports = load_reports or {}  # what loading did with each part of the checkpoint (llm, vision)

    @property
    def device(self) -> torch.device:
        return self.llm.embedding.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.embedding.dtype

    # ---- construction -----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, path_or_preset: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
        checkpoint: str | None = None, image_checker: str | Path | None = None, compile: bool = False,
    ) -> "ChatModel":
        """`tiny` (deterministic random weights, synthetic vocab, no files) or a folder holding `bee.txt` and
        either an original checkpoint (`viscpm_chat_*_checkpoint.pt`, ...) or our converted safetensors
        (`viscpm_config.json` + `model.safetensors[.index.json]`). `checkpoint` picks a file in the folder.
        `image_checker`: a local folder with diffusers' StableDiffusionSafetyChecker (+ CLIP image processor);
        off by default, its verdict per image is returned in ChatResult.image_flagged. `compile=True` compiles the
        decode step with torch.compile (one CUDA graph per batch shape on a GPU; same answers, slower first batch)."""
        device = torch.device(device)
        model = cls._load(path_or_preset, device, torch_dtype(dtype, device), checkpoint)
        if compile:
            model.llm.compile_decode()
        if image_checker is not None:
            from .safety import ImageSafetyChecker

            model.image_checker = ImageSafetyChecker.from_folder(image_checker, device=device)
        return model

    @classmethod
    def _load(cls, path_or_preset: str | Path, device: torch.device, dtype: torch.dtype, checkpoint: str | None) -> "ChatModel":
        if str(path_or_preset) == "tiny":
            return cls.tiny(device=device, dtype=dtype)
        bundled = bundled_model_folder(path_or_preset, "chat")  # `shapes`: shipped with the package
        folder, tokenizer, config_dict = open_model_folder(bundled or path_or_preset, "chat", checkpoint)
        config = ChatConfig.from_saved(config_dict)
        weights = find_checkpoint(folder, checkpoint, ORIGINAL_CHAT_CHECKPOINTS)
        logger.info("loading VisCPM-Chat from %s", weights)
        state = read_state_dict(weights)
        name = str(path_or_preset) if bundled else folder.name
        return cls.from_state_dict(state, config, tokenizer, device=device, dtype=dtype, name=name)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], config: ChatConfig, tokenizer: CPMBeeTokenizer,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        name: str = "viscpm-chat") -> "ChatModel":
        """Strict: every key must belong to the LLM (`llm.*`) or the vision side; anything else raises."""
        reports: dict[str, LoadReport] = {}
        llm, reports["llm"] = load_cpmbee(state, config.llm, device=device, dtype=dtype)
        vision, reports["vision"] = load_vision_encoder(config.vision, state, device=device, dtype=dtype)
        return cls(llm, vision, tokenizer, config, name=name, load_reports=reports)

    @classmethod
    def tiny(cls, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> "ChatModel":
        tokenizer = CPMBeeTokenizer.synthetic()
        config = ChatConfig.from_name("tiny", vocab_size=tokenizer.vocab_size)
        llm = CPMBee(config.llm).init_random_(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vision = VisionQueryEncoder(config.vision)
            vision.reset_parameters()
        return cls(llm.to(device=device, dtype=dtype), vision.to(device=device, dtype=dtype), tokenizer, config, name="tiny")

    def original_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under the original VisCPM-Chat checkpoint names (deliberately dropped keys left out)."""
        return {**original_state_dict(self.llm, CPMBEE_KEY_MAP), **original_state_dict(self.vision, VISION_KEY_MAP)}

    # ---- inference --------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Vision hidden states (B, query_num, d) - reusable for follow-up questions about the same images."""
        pixels = preprocess_images(list(images), size=self.config.image_size)
        return self.vision(pixels.to(device=self.device, dtype=self.dtype))

    def prepare(self, images: Sequence[Image.Image] | None, questions: Sequence[str],
                contexts: Sequence[str] | None = None, *, trusted: bool = False) -> "ChatBatch":
        """The host half of :meth:`generate`: pixels resized and normalised, prompts tokenised and collated, on
        the CPU (pinned when the model is on a GPU). Build the next batch while the device runs this one, then
        hand it to :meth:`generate_batch`. `images` None: the caller passes vision states to generate_batch."""
        n = len(questions)
        contexts = [""] * n if contexts is None else list(contexts)
        if len(contexts) != n:
            raise ValueError(f"{len(contexts)} contexts for {n} questions")
        if images is not None and len(images) != n:
            raise ValueError(f"need one image per question: {len(images)} images, {n} questions")
        samples = [
            build_chat_sample(self.tokenizer, q, c, query_num=self.config.vision.query_num, trusted=trusted,
                              max_length=self.config.max_prompt_length)
            for q, c in zip(questions, contexts)
        ]
        pixels = None if images is None else preprocess_images(list(images), size=self.config.image_size)
        return ChatBatch.of(samples, pixels, None if images is None else list(images), pin=self.device.type == "cuda")

    @torch.no_grad()
    def generate_batch(self, batch: "ChatBatch", generation: GenerationConfig | None = None, *,
                       vision_states: torch.Tensor | None = None, seeds: Sequence[int] | None = None,
                       skip_flagged: bool = False) -> list[ChatResult]:
        """The device half of :meth:`generate` on a batch from :meth:`prepare`."""
        n = len(batch)
        if vision_states is None:
            if batch.pixels is None:
                raise ValueError(f"need one image per question: 0 images, {n} questions")
            vision_states = self.vision(batch.pixels.to(device=self.device, dtype=self.dtype, non_blocking=True))
        elif vision_states.shape[0] != n:
            raise ValueError(f"{vision_states.shape[0]} vision states for {n} questions")
        if n == 0:
            return []
        flags: list[bool | None] = [None] * n
        if self.image_checker is not None and batch.images is not None:
            flags = [bool(f) for f in self.image_checker.check(batch.images)]
        if skip_flagged and any(flags):
            keep = [i for i, f in enumerate(flags) if not f]
            kept = self.generate_batch(batch.select(keep), generation, vision_states=vision_states[keep],
                                       seeds=None if seeds is None else [seeds[i] for i in keep]) if keep else []
            results = [ChatResult("", [], False, float("nan"), False, image_flagged=True) for _ in range(n)]
            for i, result in zip(keep, kept):
                result.image_flagged = False
                results[i] = result
            return results
        generation = generation or GenerationConfig()
        metas = batch.metas
        inputs = batch.inputs.to(self.device)
        hidden = self._splice_vision(inputs, [m.image_bound for m in metas], vision_states.to(self.device, self.dtype))
        rows = [RowSpec(answer_segment=m.predict_segment, ext_columns=frozenset(m.rev_ext_table),
                        seed=None if seeds is None else seeds[i]) for i, m in enumerate(metas)]
        outs: list[Generated] = generate(self.llm, inputs, rows, generation, self.special, hidden_states=hidden)
        return [
            ChatResult(text=unescape_text(self.tokenizer.decode(o.token_ids, m.rev_ext_table)), token_ids=o.token_ids,
                       finished=o.finished, score=o.score, prompt_truncated=m.truncated, image_flagged=flag)
            for o, m, flag in zip(outs, metas, flags)
        ]

    @torch.no_grad()
    def generate(
        self,
        images: Sequence[Image.Image] | None,
        questions: Sequence[str],
        contexts: Sequence[str] | None = None,
        generation: GenerationConfig | None = None,
        vision_states: torch.Tensor | None = None,
        seeds: Sequence[int] | None = None,
        trusted: bool = False,
        skip_flagged: bool = False,
    ) -> list[ChatResult]:
        """One answer per (image, question, context) row. Pass `vision_states` from :meth:`encode_images`
        instead of `images` to ask more about images already seen. Questions and contexts are user text and
        are escaped; `trusted=True` passes them raw, so `<...>` is CPM-Bee special-token syntax. With an image
        checker loaded, each result carries its image's flag; `skip_flagged=True` leaves flagged rows unanswered
        (empty text, no tokens) instead of answering them as the original does. Same as
        ``generate_batch(prepare(...))``."""
        if vision_states is None and (images is None or len(images) != len(questions)):
            raise ValueError(f"need one image per question: {0 if images is None else len(images)} images, "
                             f"{len(questions)} questions")
        batch = self.prepare(images if vision_states is None else None, questions, contexts, trusted=trusted)
        if vision_states is not None and images is not None:
            batch.images = list(images)  # for the image checker only: the vision states stand for the pixels
        return self.generate_batch(batch, generation, vision_states=vision_states, seeds=seeds,
                                   skip_flagged=skip_flagged)

    def answer(self, images: Sequence[Image.Image], questions: Sequence[str], contexts: Sequence[str] | None = None,
               generation: GenerationConfig | None = None) -> list[str]:
        return [r.text for r in self.generate(images, questions, contexts, generation)]

    def caption(self, images: Image.Image | Sequence[Image.Image], question: str = DEFAULT_QUESTION,
                generation: GenerationConfig | None = None) -> str | list[str]:
        """One caption per image; one image (not in a list) gives one string."""
        if isinstance(images, Image.Image):
            return self.answer([images], [question], None, generation)[0]
        if isinstance(images, (str, bytes, Path)):
            raise TypeError(f"caption() takes PIL images, got {type(images).__name__}: open the file with "
                            "PIL.Image.open first")
        return self.answer(images, [question] * len(images), None, generation)

    def _splice_vision(self, inputs: BeeInputs, bounds: list, vision_states: torch.Tensor) -> torch.Tensor:
        """Token embeddings with each row's image slots replaced by its vision states."""
        hidden = self.llm.embed(inputs.input_ids, inputs.input_id_subs)
        q = vision_states.shape[1]
        starts = []
        for bound in bounds:
            if len(bound) != 1 or int(bound[0][1] - bound[0][0]) != q:
                raise ValueError(f"each prompt needs exactly one image slot of {q} tokens, got {bound.tolist()}")
            starts.append(int(bound[0][0]))
        index = (torch.tensor(starts, device=hidden.device)[:, None] + torch.arange(q, device=hidden.device))
        return hidden.scatter(1, index[..., None].expand(-1, -1, hidden.shape[-1]), vision_states.to(hidden.dtype))
