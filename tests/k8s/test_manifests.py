"""k8s/: every manifest validated offline (no cluster runs here): the Kubernetes objects against Kubernetes'
own schemas (kubernetes-validate, strict), the KServe InferenceService against the schema vendored from the
kserve wheel (k8s/schemas/) with its Kubernetes parts against Kubernetes' schemas; and the wiring between
them (selectors, ports, probes, the HPA's metric being one the service exports)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate not installed (extra 'scale')"
)

K8S = Path(__file__).resolve().parents[2] / "k8s"
KUBERNETES = "1.33"  # the oldest release these manifests are checked against (fields used exist since 1.29)
ENGINE_BUILD_S = 1800  # REFINEDET_ENGINE_LOCK_TIMEOUT_S: how long a pod may wait for a build
SCALAR = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object}


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def by_kind() -> dict[str, dict]:
    found = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in documents(path.name):
            found[doc["kind"]] = doc
    return found


@pytest.mark.parametrize("name", ["deployment.yaml", "service.yaml", "pdb.yaml", "hpa.yaml"])
@pytest.mark.parametrize("version", [KUBERNETES, "1.37"])
def test_kubernetes_objects_validate_strictly(name, version):
    for doc in documents(name):
        kubernetes_validate.validate(doc, version, strict=True)


def test_a_wrong_field_is_caught():
    """The validator really rejects a typo (so the test above can fail)."""
    doc = documents("deployment.yaml")[0]
    doc["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_deployment_gpu_probes_cache_and_wiring():
    kinds = by_kind()
    deployment, service, pdb, hpa = (
        kinds[k] for k in ("Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler")
    )
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    [container] = pod["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    probes = {k: container[k] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert [p["httpGet"]["path"] for p in probes.values()] == ["/healthz", "/healthz", "/readyz"]
    startup = probes["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= ENGINE_BUILD_S  # first engine build
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert mounts[env["REFINEDET_CACHE_DIR"]] == "engine-cache"
    assert any(v["name"] == "engine-cache" and "hostPath" in v for v in pod["spec"]["volumes"])
    port = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert (
        int(env["REFINEDET_PORT"])
        == port["http"]
        == int(pod["metadata"]["annotations"]["prometheus.io/port"])
    )
    assert pod["spec"]["terminationGracePeriodSeconds"] > float(env["REFINEDET_GRACEFUL_TIMEOUT_S"])
    for selector in (
        service["spec"]["selector"],
        pdb["spec"]["selector"]["matchLabels"],
        deployment["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] >= 2 > pdb["spec"]["minAvailable"]  # a drain never blocks for good


def test_hpa_metric_is_exported_by_the_service():
    from service.metrics import Metrics

    exported = {m.name for m in Metrics().registry.collect()}
    [metric] = by_kind()["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] in exported


# --- KServe ---------------------------------------------------------------------------------------------


def kserve_schema() -> dict:
    [path] = sorted((K8S / "schemas").glob("kserve-*-inferenceservice.json"))
    return json.loads(path.read_text())


def kubernetes_validator(type_name: str):
    """A validator for Kubernetes type ``V1Container`` / ``K8sIoApiAutoscalingV2...`` (strict schemas)."""
    import jsonschema
    from referencing import Registry, Resource

    root = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    defs = json.loads((sorted(root.glob("v1.37*-local-strict"))[-1] / "_definitions.json").read_text())
    if type_name.startswith("K8sIoApi"):  # K8sIoApiAutoscalingV2HorizontalPodAutoscalerBehavior
        rest = type_name.removeprefix("K8sIoApi")
        matches = [
            k
            for k in defs["$defs"]
            if k.startswith("io.k8s.api.") and k.replace(".", "").lower() == f"iok8sapi{rest}".lower()
        ]
    else:  # V1Container, V1ObjectMeta
        _, _, short = type_name.partition("1")
        matches = [
            k for k in defs["$defs"] if k.endswith(f".v1.{short}") and (".core." in k or ".meta." in k)
        ]
    assert len(matches) == 1, (type_name, matches)
    from referencing.jsonschema import DRAFT202012

    resource = Resource.from_contents(defs, default_specification=DRAFT202012)
    registry = Registry().with_resource("/api/_definitions.json", resource)
    return jsonschema.Draft202012Validator(
        {"$ref": f"/api/_definitions.json#/$defs/{matches[0]}"}, registry=registry
    )


def kserve_errors(value, kind: str, types: dict, path: str = "") -> list[str]:
    """Type errors and unknown fields of ``value`` against KServe type ``kind`` (recursively)."""
    if kind.startswith("list["):
        if not isinstance(value, list):
            return [f"{path}: expected a list"]
        return [e for i, v in enumerate(value) for e in kserve_errors(v, kind[5:-1], types, f"{path}[{i}]")]
    if kind.startswith("dict("):
        inner = kind[kind.index(",") + 1 : -1].strip()
        if not isinstance(value, dict):
            return [f"{path}: expected a mapping"]
        return [e for k, v in value.items() for e in kserve_errors(v, inner, types, f"{path}.{k}")]
    if kind in SCALAR:
        ok = isinstance(value, SCALAR[kind]) and not (kind == "int" and isinstance(value, bool))
        return [] if ok else [f"{path}: expected {kind}, got {value!r}"]
    if kind in types:
        if not isinstance(value, dict):
            return [f"{path}: expected a {kind} object"]
        fields = types[kind]
        errors = [f"{path}.{k}: not a field of {kind}" for k in value if k not in fields]
        return errors + [
            e
            for k, v in value.items()
            if k in fields
            for e in kserve_errors(v, fields[k], types, f"{path}.{k}")
        ]
    validator = kubernetes_validator(kind)  # a Kubernetes type
    return [f"{path}: {e.message}" for e in validator.iter_errors(value)]


def test_kserve_inference_service_matches_the_published_schema():
    schema = kserve_schema()
    [isvc] = documents("kserve-inferenceservice.yaml")
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    assert kserve_errors(isvc, schema["root"], schema["types"]) == []
    [container] = isvc["spec"]["predictor"]["containers"]
    assert (
        container["name"] == "kserve-container" and container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    )
    env = {e["name"]: e["value"] for e in container["env"]}
    assert int(env["REFINEDET_PORT"]) == container["ports"][0]["containerPort"]
    assert env["REFINEDET_MODEL_NAME"] == isvc["metadata"]["name"]  # clients call /v2/models/<name>/infer
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"


def test_kserve_check_catches_mistakes():
    schema = kserve_schema()
    [isvc] = documents("kserve-inferenceservice.yaml")
    isvc["spec"]["predictor"]["minReplica"] = 1  # typo
    isvc["spec"]["predictor"]["maxReplicas"] = "4"  # wrong type
    isvc["spec"]["predictor"]["containers"][0]["readinessProbes"] = {}  # typo inside a Kubernetes type
    errors = kserve_errors(isvc, schema["root"], schema["types"])
    assert any("minReplica: not a field" in e for e in errors)
    assert any("maxReplicas: expected int" in e for e in errors)
    assert any("readinessProbes" in e for e in errors), errors
