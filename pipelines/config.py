"""The caption job's configuration: one dataclass, a description per field, loadable from YAML, overridable by
command-line flags (precedence: defaults < `--config job.yaml` < flags).

The CLI flags and the README's reference table are generated from the fields below, so they cannot drift apart.
This module imports neither Ray nor torch.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

INPUT_FORMATS = ("parquet", "webdataset", "images")
OUTPUT_FORMATS = ("parquet", "webdataset")
PRESETS = ("default", "original")
STRATEGIES = ("beam", "greedy", "sample")
# Pillow's own default (Image.MAX_IMAGE_PIXELS); repeated here so this module does not import PIL.
PILLOW_MAX_IMAGE_PIXELS = 89_478_485
# Kept in sync with viscpm.DEFAULT_QUESTION by a test; not imported, to keep this module free of torch.
DEFAULT_QUESTION = "Describe this image in detail."


def _f(default: Any, help: str, *, choices: Sequence[str] | None = None, group: str = "job",
       fingerprint: bool = False, secret: bool = False) -> Any:
    """A dataclass field with its documentation. `fingerprint`: the value changes what the output contains, so
    resuming into an output made with a different value is refused. `secret`: never written to `_job.json` /
    `_summary.json`."""
    meta = {"help": help, "choices": choices, "group": group, "fingerprint": fingerprint, "secret": secret}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


class JobConfigMixin:
    """Loading and public view shared by the job configs (caption, paint): dataclasses whose fields use `_f`."""

    def public_dict(self) -> dict[str, Any]:
        """Every field except secrets (for `_summary.json` and logs)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.metadata.get("secret")}  # type: ignore[arg-type]

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "config") -> Any:
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        normalised = {str(k).replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(normalised) - names)
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown}; valid keys: {sorted(names)}")
        types = {f.name: str(f.type) for f in fields(cls)}  # type: ignore[arg-type]
        problems = [p for k, v in normalised.items() if (p := type_problem(k, v, types[k]))]
        if problems:
            raise ValueError(f"{source}: " + "; ".join(problems))
        return cls(**normalised)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Any:
        return cls.from_mapping(load_yaml(path), source=str(path))

    def __post_init__(self) -> None:
        if isinstance(getattr(self, "storage_options", None), str):
            self.storage_options = parse_json_object(self.storage_options, "storage_options")

    def common_problems(self, at_least_one: Sequence[str]) -> list[str]:
        """Checks every job config needs: --input/--output given, choices, counts >= 1, resources >= 0."""
        problems: list[str] = []
        if not self.input:  # type: ignore[attr-defined]
            problems.append("--input is required")
        if not self.output:  # type: ignore[attr-defined]
            problems.append("--output is required")
        for f in fields(self):  # type: ignore[arg-type]
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                problems.append(f"--{flag(f.name)} must be one of {list(choices)}, got {value!r}")
        for name in at_least_one:
            if getattr(self, name) < 1:
                problems.append(f"--{flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("num_gpus_per_worker", "cpus_per_worker"):
            value = getattr(self, name, None)
            if value is not None and value < 0:
                problems.append(f"--{flag(name)} must be >= 0, got {value}")
        return problems

    def fingerprint_fields(self) -> dict[str, Any]:
        """The fields marked `fingerprint=True` (each job adds its effective model settings)."""
        fp = {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("fingerprint")}  # type: ignore[arg-type]
        return canonical_fingerprint(fp)

    @staticmethod
    def raise_problems(problems: list[str], job: str) -> None:
        if problems:
            raise ValueError(f"invalid {job} job config:\n  - " + "\n  - ".join(problems))


@dataclass
class CaptionJobConfig(JobConfigMixin):
    """Everything `jobs/caption.py` needs. Field names are the flags (`image_column` -> `--image-column`)."""

    # ---- input ------------------------------------------------------------------------------------------------
    input: str = _f("", "Local path or s3:// URI of a file, a folder or a prefix.", group="input", fingerprint=True)
    input_format: str = _f("parquet", "parquet: rows with an image column; webdataset: .tar shards; images: a "
                           "folder/prefix of image files (id = relative path).", choices=INPUT_FORMATS,
                           group="input", fingerprint=True)
    image_column: str = _f("image", "parquet: column holding image bytes, or strings that are paths/URIs to read "
                           "(relative paths are resolved against the input folder).", group="input", fingerprint=True)
    id_column: str = _f("id", "parquet: column holding the unique row id (any type; stored as a string in `key`).",
                        group="input", fingerprint=True)
    image_key: str | None = _f(None, "webdataset: member suffix holding the image (default: the first of jpg, jpeg, "
                               "png, webp present in the sample).", group="input", fingerprint=True)
    question_column: str | None = _f(None, "Column (parquet) or member suffix (webdataset) holding a per-row "
                                     "question; rows where it is empty use --question.", group="input",
                                     fingerprint=True)
    keep_columns: list[str] = _f([], "Input columns (parquet) or member suffixes (webdataset, as bytes) copied to "
                                 "the output unchanged.", group="input", fingerprint=True)
    storage_options: dict[str, Any] = _f({}, "JSON object of s3fs options (endpoint_url, key, secret, "
                                         "client_kwargs, ...); overrides what the standard AWS_* environment "
                                         "variables give. Never written to the output.", group="input", secret=True)

    # ---- output -----------------------------------------------------------------------------------------------
    output: str = _f("", "Local path or s3:// URI of the output folder/prefix.", group="output")
    output_format: str = _f("parquet", "parquet: one row per id (see the schema in the README); webdataset: tar "
                            "shards with `<key>.txt` (caption) and `<key>.json` (the full row).",
                            choices=OUTPUT_FORMATS, group="output", fingerprint=True)
    rows_per_file: int = _f(1000, "Rows per output file (also the unit of resume: a killed job loses at most the "
                            "files in flight).", group="output")
    retry_errors: bool = _f(False, "Process again only the ids whose latest status is `error` (plus any id still "
                            "missing); every id stays in the output exactly once.", group="output")
    overwrite: bool = _f(False, "Delete this job's files (part-*, _checkpoint/, _job.json, _summary.json) from "
                         "--output first, even if they belong to a different job.", group="output")

    # ---- model ------------------------------------------------------------------------------------------------
    model: str = _f("tiny", "`tiny` (random weights: captions are random text), a local model folder, or an "
                    "s3:// prefix (downloaded once per node into --model-cache-dir under a file lock).",
                    group="model", fingerprint=True)
    model_cache_dir: str | None = _f(None, "Where s3:// models are downloaded on each node (default: "
                                     "$VISCPM_CACHE_DIR or ~/.cache/viscpm-batch/models).", group="model")
    question: str = _f(DEFAULT_QUESTION, "The question asked about every image (or the fallback for "
                       "--question-column).", group="model", fingerprint=True)
    preset: str = _f("default", "Generation preset: `default` (beam 3, 64 new tokens, VisCPM's penalties) or "
                     "`original` (VisCPM-Chat's chat() settings: beam 3, max_length 512).", choices=PRESETS,
                     group="model", fingerprint=True)
    strategy: str | None = _f(None, "Decoding strategy (default: the preset's).", choices=STRATEGIES,
                              group="model", fingerprint=True)
    max_new_tokens: int | None = _f(None, "Longest answer in tokens (default: the preset's).", group="model",
                                    fingerprint=True)
    beam_size: int | None = _f(None, "Beams for `beam` decoding (default: the preset's).", group="model",
                               fingerprint=True)
    max_image_side: int = _f(448, "Decoded images are downscaled (JPEG draft mode, then a thumbnail) so their "
                             "longer side is at most this; 0 keeps full size. The model itself resizes to 224.",
                             group="model", fingerprint=True)
    max_image_pixels: int = _f(PILLOW_MAX_IMAGE_PIXELS, "Decompression-bomb limit: images with more pixels are "
                               "error rows (Pillow's default).", group="model")

    # ---- resources --------------------------------------------------------------------------------------------
    batch_size: int = _f(8, "Images per model call.", group="resources")
    num_workers: int = _f(1, "Caption actors (model replicas).", group="resources")
    num_gpus_per_worker: float | None = _f(None, "GPUs per caption actor (default: 1 where the cluster has GPUs, "
                                           "else 0 and the model runs on CPU).", group="resources")
    cpus_per_worker: float | None = _f(None, "CPUs reserved per caption actor (default: 0 for GPU actors, so they "
                                       "never starve the read/decode tasks; for CPU actors up to 1, always leaving "
                                       "2 CPUs of the cluster for reading and decoding).", group="resources")
    torch_threads: int | None = _f(None, "CPU caption actors: torch threads each (default: Ray's, one per CPU the "
                                   "actor reserves - measured faster on 2 cores than letting the model compete "
                                   "with decoding).", group="resources")
    decode_batch_size: int = _f(64, "Rows per block between stages: one decode task batch and one caption actor "
                                "call (which runs the model in --batch-size chunks). Bigger amortises Ray's per-call "
                                "overhead; smaller spreads few rows over more actors.", group="resources")
    actor_start_timeout_s: float | None = _f(None, "Fail (exit 1, with a message) if the caption actors are not up "
                                             "after this long. Default: 1800 s when the cluster has the resources "
                                             "they ask for (model download + load), 600 s when it must wait for "
                                             "nodes to join (an autoscaling cluster).", group="resources")
    no_progress_timeout_s: float = _f(1800.0, "Fail if the pipeline makes no progress for this long.",
                                      group="resources")
    progress_every_s: float = _f(30.0, "Seconds between progress log lines.", group="resources")

    # ------------------------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.keep_columns, str):
            self.keep_columns = [c for c in self.keep_columns.split(",") if c]

    def validate(self) -> "CaptionJobConfig":
        """Check values that do not need any I/O; raise ValueError naming every problem found."""
        problems = self.common_problems(("batch_size", "num_workers", "rows_per_file", "decode_batch_size",
                                         "max_image_pixels"))
        if self.max_image_side < 0:
            problems.append(f"--max-image-side must be >= 0, got {self.max_image_side}")
        if self.image_key is not None and self.input_format != "webdataset":
            problems.append("--image-key applies to --input-format webdataset only")
        if self.input_format == "images" and (self.keep_columns or self.question_column):
            problems.append("--input-format images has no columns: --keep-columns/--question-column do not apply")
        from .schema import reserved_column_problems  # local: schema imports pyarrow

        problems += reserved_column_problems(self.keep_columns)
        try:
            self.generation_kwargs()
        except ValueError as exc:
            problems.append(f"generation settings: {exc}")
        self.raise_problems(problems, "caption")
        return self

    def model_sources(self) -> list[tuple[str, str | None, str]]:
        """(flag, value, folder kind) of every model folder the actors will load (checked on the driver first)."""
        return [("--model", self.model, "chat")]

    def generation_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `viscpm.GenerationConfig`: the preset, then the explicit flags."""
        from viscpm import GenerationConfig  # local: keeps this module light; viscpm validates the values

        base = GenerationConfig.original() if self.preset == "original" else GenerationConfig()
        overrides = {k: v for k, v in (("strategy", self.strategy), ("max_new_tokens", self.max_new_tokens),
                                       ("beam_size", self.beam_size)) if v is not None}
        merged = {**asdict(base), **overrides}
        GenerationConfig(**merged)  # raises ValueError on bad values
        return merged

    def fingerprint(self) -> dict[str, Any]:
        """The settings that decide what the output contains: resuming is allowed only when they are equal."""
        fp = self.fingerprint_fields()
        fp["generation"] = self.generation_kwargs()
        for name in ("strategy", "max_new_tokens", "beam_size", "preset"):
            fp.pop(name)  # folded into `generation`: the effective values are what matters
        fp["keep_columns"] = list(self.keep_columns)
        return fp


def canonical_fingerprint(fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """Paths compared by what they name, not by how they were typed (relative/absolute, trailing slash)."""
    from .storage import canonical_uri  # local: fsspec is not needed to build a config

    fp = dict(fingerprint)
    if isinstance(fp.get("input"), str) and fp["input"]:
        fp["input"] = canonical_uri(fp["input"])
    return fp


def type_problem(name: str, value: Any, annotation: str) -> str | None:
    """Why `value` does not fit a config field annotated `annotation` (a string: this module uses postponed
    annotations); None when it fits. YAML gives typed values, so `batch_size: eight` is caught here, as argparse
    catches `--batch-size eight`."""
    if value is None:
        return None if "None" in annotation else f"{name} (--{flag(name)}) needs a value, got null"
    alternatives = [a.strip() for a in annotation.split("|") if a.strip() != "None"]
    checks: dict[str, tuple[Callable[[Any], bool], str]] = {
        "bool": (lambda v: isinstance(v, bool), "true or false"),
        "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
        "float": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
        "str": (lambda v: isinstance(v, str), "a string"),
        "list[str]": (lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
                      "a list of strings (or one comma-separated string)"),
        "dict[str, Any]": (lambda v: isinstance(v, (str, Mapping)), "a mapping (or a JSON object string)"),
    }
    if any(a not in checks or checks[a][0](value) for a in alternatives):
        return None
    expected = " or ".join(checks[a][1] for a in alternatives)
    return f"{name} (--{flag(name)}) must be {expected}, got {value!r} ({type(value).__name__})"


def flag(name: str) -> str:
    return name.replace("_", "-")


def parse_json_object(text: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} must be a JSON object: {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    text = Path(path).read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(exc, "problem", None) or str(exc)
        context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context and context_mark is not None:  # where the construct that broke began (e.g. an open bracket)
            what += f", {context} started at line {context_mark.line + 1}"
        raise ValueError(f"{path}:{where}: not valid YAML ({what})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a job config must be a mapping of option: value, got {type(data).__name__}")
    return data


# ---- CLI ---------------------------------------------------------------------------------------------------------
def _arg_type(f) -> tuple[Any, dict[str, Any]]:
    annotation = str(f.type)
    if annotation.startswith("bool"):
        return None, {"action": argparse.BooleanOptionalAction}
    if annotation.startswith("list"):
        return None, {"type": lambda s: [c for c in s.split(",") if c], "metavar": "A,B,..."}
    if annotation.startswith("dict"):
        return None, {"type": lambda s: parse_json_object(s, "--storage-options"), "metavar": "JSON"}
    for prefix, typ in (("int", int), ("float", float)):
        if annotation.startswith(prefix):
            return typ, {}
    return str, {}


def add_config_arguments(parser: argparse.ArgumentParser, cls: type | None = None) -> None:
    """One flag per config field of `cls` (default: CaptionJobConfig; any dataclass whose fields come from `_f`).
    Defaults are left as None so that only flags actually given override the YAML."""
    cls = cls or CaptionJobConfig
    groups: dict[str, Any] = {}
    for f in fields(cls):
        group_name = f.metadata["group"]
        group = groups.get(group_name) or groups.setdefault(group_name, parser.add_argument_group(group_name))
        typ, extra = _arg_type(f)
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        kwargs: dict[str, Any] = {"dest": f.name, "default": None,
                                  "help": f"{f.metadata['help']} (default: {default!r})"}
        if typ is not None:
            kwargs["type"] = typ
        if f.metadata.get("choices"):
            kwargs["choices"] = list(f.metadata["choices"])
        kwargs.update(extra)
        group.add_argument(f"--{flag(f.name)}", **kwargs)


def config_from_args(args: argparse.Namespace, yaml_path: str | Path | None = None, cls: type | None = None) -> Any:
    """defaults < YAML file < flags given on the command line. `cls`: the config class (default CaptionJobConfig;
    it needs a `from_mapping` classmethod, e.g. via `JobConfigMixin`)."""
    cls = cls or CaptionJobConfig
    data: dict[str, Any] = load_yaml(yaml_path) if yaml_path else {}
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    for f in fields(cls):
        value = getattr(args, f.name, None)
        if value is not None:
            data[f.name] = value
    return cls.from_mapping(data, source=str(yaml_path or "flags"))


def reference_markdown(cls: type | None = None) -> str:
    """The README's option table, generated from the fields of `cls` (default: CaptionJobConfig)."""
    cls = cls or CaptionJobConfig
    lines = ["| flag / YAML key | default | description |", "|---|---|---|"]
    for f in fields(cls):
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        shown = "" if default in ("", None) else f"`{json.dumps(default, ensure_ascii=False)}`"
        choices = f.metadata.get("choices")
        text = f.metadata["help"] + (f" One of: {', '.join(choices)}." if choices else "")
        lines.append(f"| `--{flag(f.name)}` / `{f.name}` | {shown} | {text.replace('|', '/')} |")
    return "\n".join(lines)
