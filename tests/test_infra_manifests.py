"""The Kubernetes manifests in infra/: KubeRay kinds validated against the CRD schemas in ../shared/kuberay-crds/
(jsonschema; unknown fields refused where the CRD leaves objects open), built-in kinds against the Kubernetes
schema (kubernetes-validate), every job command line parsed by the job's own flag parser, and the Dockerfile's
torch pin checked against the version `make install` uses."""

from __future__ import annotations

import functools
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CRDS = REPO.parent / "shared" / "kuberay-crds"
K8S_VERSION = "1.33.0"


@functools.lru_cache(maxsize=None)
def crd_schema(kind: str) -> dict:
    if not CRDS.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRDS} (see its README)")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are ~1 MB each: libyaml parses them in 1 s
    for path in CRDS.glob(f"ray.io_{kind.lower()}s.yaml"):
        crd = yaml.load(path.read_text(), Loader=loader)
        if crd["spec"]["names"]["kind"] == kind:
            version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
            return strict(version["schema"]["openAPIV3Schema"])
    raise AssertionError(f"no CRD for {kind}")


def strict(schema: dict) -> dict:
    """OpenAPI -> JSON Schema for validation: objects with `properties` refuse unknown fields (a typo in a manifest
    is then an error, as the API server's strict field validation makes it); `x-kubernetes-*` keys are left as
    annotations, `int-or-string` fields accept both."""
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) if isinstance(v, dict) else [strict(x) for x in v] if isinstance(v, list) else v
           for k, v in schema.items() if k != "properties"}
    if "properties" in schema:
        out["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


def documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted((REPO / "infra").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and "kind" in doc:
                docs.append((path.name, doc))
    return docs


def validate_ray(doc: dict) -> None:
    import jsonschema

    schema = crd_schema(doc["kind"])
    body = {k: v for k, v in doc.items() if k not in ("apiVersion", "kind", "metadata")}
    # the validator class alone: `jsonschema.validate` would first check the (large) schema itself, for seconds
    jsonschema.Draft7Validator(schema).validate({"apiVersion": doc["apiVersion"], "kind": doc["kind"], **body})
    assert doc["apiVersion"] == "ray.io/v1"


def entrypoints(doc: dict) -> list[str]:
    spec = doc["spec"]
    if doc["kind"] == "RayCronJob":
        spec = spec["jobTemplate"]
    return [spec["entrypoint"]]


def test_kuberay_manifests_match_the_crds_and_the_job_flags():
    import jsonschema

    sys_path = str(REPO / "jobs")
    import sys

    sys.path.insert(0, sys_path)
    from jobcli import parse_args

    from pipelines import CaptionJobConfig

    ray_docs = [(name, d) for name, d in documents() if d["apiVersion"].startswith("ray.io/")]
    for name, cm in documents():
        if cm["kind"] == "ConfigMap":
            ray_docs += [(name, yaml.safe_load(v)) for v in cm["data"].values()]
    kinds = sorted({d["kind"] for _, d in ray_docs})
    assert kinds == ["RayCronJob", "RayJob"], kinds
    for name, doc in ray_docs:
        validate_ray(doc)
        for entry in entrypoints(doc):
            argv = shlex.split(entry)
            assert argv[:2] == ["python", "/app/jobs/caption.py"], entry
            parse_args(argv[2:], CaptionJobConfig, None)  # every flag exists (argparse exits on a typo)
    cron = next(d for _, d in ray_docs if d["kind"] == "RayCronJob")
    assert "--incremental" in cron["spec"]["jobTemplate"]["entrypoint"]
    assert re.fullmatch(r"[\d*/,-]+( [\d*/,-]+){4}", cron["spec"]["schedule"])
    bad = {**cron, "spec": {**cron["spec"], "concurrencyPolicy": "Forbid"}}  # RayCronJob has none
    with pytest.raises(jsonschema.ValidationError):
        validate_ray(bad)


def test_builtin_kinds_match_the_kubernetes_schema():
    import kubernetes_validate

    builtin = [(name, d) for name, d in documents() if not d["apiVersion"].startswith("ray.io/")]
    assert {d["kind"] for _, d in builtin} >= {"CronJob", "ConfigMap", "ServiceAccount", "Role", "RoleBinding"}
    for name, doc in builtin:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    cron = next(d for _, d in builtin if d["kind"] == "CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({**cron, "spec": {**cron["spec"], "concurrency": "Forbid"}},  # a typo
                                     K8S_VERSION, strict=True)


def test_dockerfile_installs_the_pinned_torch_and_the_project():
    dockerfile = (REPO / "infra" / "Dockerfile").read_text()
    makefile = (REPO / "Makefile").read_text()
    pinned = re.search(r"torch==([\d.]+)", makefile).group(1)
    assert f"torch=={pinned}" in dockerfile
    assert "pip install --no-cache-dir ." in dockerfile and "COPY --chown=ray:users jobs ./jobs" in dockerfile
    assert "download.pytorch.org/whl/cu124" not in dockerfile  # no torch 2.13 wheels there
