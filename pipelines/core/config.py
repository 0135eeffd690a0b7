"""What every job config shares: one dataclass field per option with its documentation (`_f`), the fields both jobs
have (declared once, in `JobConfig`), loading from YAML with type checks, the command-line flags and the README's
option tables generated from the fields (so they cannot drift apart), and the job fingerprint.

Precedence: defaults < `--config job.yaml` < flags. This module imports neither Ray nor torch.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

OUTPUT_FORMATS = ("parquet", "webdataset")
GROUPS = ("input", "output", "model", "resources")  # the order of flags and README rows


def _f(default: Any, help: str, *, choices: Sequence[str] | None = None, group: str = "input",
       fingerprint: bool = False, secret: bool = False) -> Any:
    """A dataclass field with its documentation (`{job}` in it: the job's name). `fingerprint`: the value changes
    what the output contains, so resuming into an output made with a different value is refused. `secret`: never
    written to `_job.json` / `_summary.json`."""
    meta = {"help": help, "choices": choices, "group": group, "fingerprint": fingerprint, "secret": secret}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class JobConfig:
    """The options every job has; a job's config subclasses it (and may redeclare a field to change its default).
    Field names are the flags (`rows_per_file` -> `--rows-per-file`)."""

    job: ClassVar[str] = "job"  # the job's name in help texts and messages
    at_least_one: ClassVar[tuple[str, ...]] = ("batch_size", "num_workers", "rows_per_file")  # counts
    # --batch-size defaults per device: CPU-sized, and GPU-sized from the memory a batch needs (see the README)
    cpu_batch_size: ClassVar[int] = 8
    gpu_batch_size: ClassVar[int] = 8

    # ---- input ------------------------------------------------------------------------------------------------
    input: str = _f("", "Local path or s3:// URI of a file, a folder or a prefix; or WebDataset-style "
                    "specs: brace ranges/lists, globs, several joined with ::.", group="input", fingerprint=True)
    storage_options: dict[str, Any] = _f({}, "JSON object of s3fs options (endpoint_url, key, secret, "
                                         "client_kwargs, ...); overrides what the standard AWS_* environment "
                                         "variables give. Never written to the output.", group="input", secret=True)

    # ---- output -----------------------------------------------------------------------------------------------
    output: str = _f("", "Local path or s3:// URI of the output folder/prefix.", group="output")
    output_format: str = _f("parquet", "Output format.", choices=OUTPUT_FORMATS, group="output", fingerprint=True)
    rows_per_file: int = _f(1000, "Rows per output file (also the unit of resume: a killed job loses at most the "
                            "files in flight).", group="output")
    retry_errors: bool = _f(False, "Process again only the ids whose latest status is `error` (plus any id still "
                            "missing); every id stays in the output exactly once.", group="output")
    overwrite: bool = _f(False, "Delete this job's files (part-*, _checkpoint/, _job.json, _summary.json, "
                         ".huggingface.yaml, _report.html) from --output first, even if they belong to a different "
                         "job.", group="output")
    incremental: bool = _f(False, "Scheduled enrichment of a growing input: one output file per input file "
                           "(`<dir>/<name>.parquet|.tar`, rows sorted by key), a manifest of the input files done; "
                           "each run processes only new and changed input files (see the README).", group="output")
    prune: bool = _f(False, "With --incremental: delete the output and manifest entry of input files that were "
                     "removed from the input (default: keep them and report them).", group="output")
    lease_ttl_s: float = _f(300.0, "Lease on --output (`_lock`, one run per output at a time): a holder that "
                            "stopped renewing it for this long is taken over (at once when it ran on this host and "
                            "its process is gone).", group="output")

    # ---- model ------------------------------------------------------------------------------------------------
    model: str = _f("tiny", "`tiny` (random weights), a local model folder, or an s3:// prefix (downloaded once per "
                    "node into --model-cache-dir under a file lock).", group="model", fingerprint=True)
    model_cache_dir: str | None = _f(None, "Where s3:// models are downloaded on each node (default: "
                                     "$VISCPM_CACHE_DIR or ~/.cache/viscpm-batch/models).", group="model")
    compile: bool = _f(False, "torch.compile the model's hot path (Chat: the decode step, Paint: the UNet) into "
                       "CUDA graphs: the same outputs, faster on a GPU after a warm-up of minutes per new batch "
                       "shape.", group="model")

    # ---- resources --------------------------------------------------------------------------------------------
    batch_size: int | None = _f(None, "Rows per model call (default: by the actors' device, see the job).",
                                group="resources")
    num_workers: int = _f(1, "{job} actors (model replicas).", group="resources")
    num_gpus_per_worker: float | None = _f(None, "GPUs per {job} actor (default: 1 where the cluster has GPUs, "
                                           "else 0 and the model runs on CPU).", group="resources")
    cpus_per_worker: float | None = _f(None, "CPUs reserved per {job} actor (default: 0 for GPU actors, so they "
                                       "never starve the read/decode tasks; for CPU actors up to 1, always leaving "
                                       "2 CPUs of the cluster for reading and decoding).", group="resources")
    torch_threads: int | None = _f(None, "CPU {job} actors: torch threads each (default: Ray's, one per CPU the "
                                   "actor reserves - measured faster on 2 cores than letting the model compete "
                                   "with decoding).", group="resources")
    actor_start_timeout_s: float | None = _f(None, "Fail (exit 1, with a message) if the {job} actors are not up "
                                             "after this long. Default: 1800 s when the cluster has the resources "
                                             "they ask for (model download + load), 600 s when it must wait for "
                                             "nodes to join (an autoscaling cluster).", group="resources")
    no_progress_timeout_s: float = _f(1800.0, "Fail if the pipeline makes no progress for this long.",
                                      group="resources")
    progress_every_s: float = _f(30.0, "Seconds between progress log lines.", group="resources")

    def public_dict(self) -> dict[str, Any]:
        """Every field except secrets (for `_summary.json` and logs)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.metadata.get("secret")}  # type: ignore[arg-type]

    @classmethod
    def help_text(cls, name: str) -> str:
        f = next(f for f in fields(cls) if f.name == name)
        text = f.metadata["help"].replace("{job}", cls.job)
        return text[:1].upper() + text[1:]

    @classmethod
    def options(cls) -> list[Any]:
        """The fields in the order of flags and README rows: by group, then as declared."""
        return sorted(fields(cls), key=lambda f: GROUPS.index(f.metadata["group"]))

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

    def model_sources(self) -> list[tuple[str, str | None, str]]:
        """(flag, value, folder kind) of every model folder the actors will load (checked on the driver first)."""
        raise NotImplementedError

    def validate(self) -> Any:
        """Check values that do not need any I/O; raise ValueError naming every problem found. Returns self."""
        problems = self.common_problems() + self.job_problems()
        if problems:
            raise ValueError(f"invalid {self.job} job config:\n  - " + "\n  - ".join(problems))
        return self

    def model_batch_size(self, gpus_per_worker: float) -> int:
        """--batch-size, or the job's default for its actors' device."""
        if self.batch_size is not None:
            return self.batch_size
        return self.gpu_batch_size if gpus_per_worker > 0 else self.cpu_batch_size

    def job_problems(self) -> list[str]:
        """The job's own checks (a subclass adds them)."""
        return []

    def common_problems(self) -> list[str]:
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
        for name in self.at_least_one:
            if getattr(self, name) is not None and getattr(self, name) < 1:
                problems.append(f"--{flag(name)} must be >= 1, got {getattr(self, name)}")
        if self.prune and not self.incremental:  # type: ignore[attr-defined]
            problems.append("--prune applies to --incremental runs only")
        if self.incremental and self.overwrite:  # type: ignore[attr-defined]
            problems.append("--incremental with --overwrite: to start an incremental output over, use a new --output")
        if self.lease_ttl_s <= 0:  # type: ignore[attr-defined]
            problems.append(f"--lease-ttl-s must be > 0, got {self.lease_ttl_s}")  # type: ignore[attr-defined]
        for name in ("num_gpus_per_worker", "cpus_per_worker"):
            value = getattr(self, name, None)
            if value is not None and value < 0:
                problems.append(f"--{flag(name)} must be >= 0, got {value}")
        return problems

    def fingerprint_fields(self) -> dict[str, Any]:
        """The fields marked `fingerprint=True` (each job adds its effective model settings)."""
        fp = {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("fingerprint")}  # type: ignore[arg-type]
        return canonical_fingerprint(fp)


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


def add_config_arguments(parser: argparse.ArgumentParser, cls: type[JobConfig]) -> None:
    """One flag per config field of `cls`. Defaults are left as None so that only flags actually given override
    the YAML."""
    groups: dict[str, Any] = {}
    for f in cls.options():
        group_name = f.metadata["group"]
        group = groups.get(group_name) or groups.setdefault(group_name, parser.add_argument_group(group_name))
        typ, extra = _arg_type(f)
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        kwargs: dict[str, Any] = {"dest": f.name, "default": None,
                                  "help": f"{cls.help_text(f.name)} (default: {default!r})"}
        if typ is not None:
            kwargs["type"] = typ
        if f.metadata.get("choices"):
            kwargs["choices"] = list(f.metadata["choices"])
        kwargs.update(extra)
        group.add_argument(f"--{flag(f.name)}", **kwargs)


def config_from_args(args: argparse.Namespace, yaml_path: str | Path | None, cls: type[JobConfig]) -> Any:
    """defaults < YAML file < flags given on the command line."""
    data: dict[str, Any] = load_yaml(yaml_path) if yaml_path else {}
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    for f in fields(cls):
        value = getattr(args, f.name, None)
        if value is not None:
            data[f.name] = value
    return cls.from_mapping(data, source=str(yaml_path or "flags"))


def reference_markdown(cls: type[JobConfig]) -> str:
    """The README's option table, generated from the fields of `cls`."""
    lines = ["| flag / YAML key | default | description |", "|---|---|---|"]
    for f in cls.options():
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        shown = "" if default in ("", None) else f"`{json.dumps(default, ensure_ascii=False)}`"
        choices = f.metadata.get("choices")
        text = cls.help_text(f.name) + (f" One of: {', '.join(choices)}." if choices else "")
        lines.append(f"| `--{flag(f.name)}` / `{f.name}` | {shown} | {text.replace('|', '/')} |")
    return "\n".join(lines)
