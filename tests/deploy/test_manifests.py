"""The Kubernetes manifests: every overlay renders and keeps the invariants of deploy/check.py; each
invariant fails on a manifest that breaks it; the copies the manifests hold (constitution, topics,
settings, consumer groups) agree with the code they copy from.

Rendering needs kustomize in .tools/ (`make deploy-check` installs it)."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"

_spec = importlib.util.spec_from_file_location("deploy_check", ROOT / "deploy" / "check.py")
assert _spec is not None and _spec.loader is not None
check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check)

OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())


def kustomize() -> str:
    found = os.environ.get("KUSTOMIZE") or str(ROOT / ".tools" / "kustomize")
    assert Path(found).exists(), "kustomize is missing: `make deploy-check` installs it into .tools/"
    return found


_rendered: dict[str, list[dict[str, Any]]] = {}


def rendered(target: str) -> list[dict[str, Any]]:
    """The manifests of an overlay ("local", "gpu") or of "base", rendered once per session."""
    if target not in _rendered:
        path = K8S / "base" if target == "base" else K8S / "overlays" / target
        _rendered[target] = check.load_docs(check.render(kustomize(), path))
    return copy.deepcopy(_rendered[target])


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def settings_of(docs: list[dict[str, Any]]) -> dict[str, str]:
    (doc,) = [
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("cai-settings")
    ]
    return doc["data"]


# ---- the overlays as they are -------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_keeps_the_invariants(overlay: str) -> None:
    assert check.check_invariants(rendered(overlay), check.GPU_WORKLOADS[overlay]) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_match_their_schemas(overlay: str) -> None:
    custom = [d for d in rendered(overlay) if not check.is_builtin(d)]
    assert check.validate_custom(custom) == []


def test_overlays_pick_their_components() -> None:
    local, gpu = rendered("local"), rendered("gpu")
    assert settings_of(local)["CAI_POLICY_BACKEND"].startswith("transformers:")
    assert find(local, "StatefulSet", "kafka")
    assert not [d for d in local if not check.is_builtin(d)]
    assert settings_of(gpu)["CAI_POLICY_BACKEND"] == "openai:http://127.0.0.1:8000"
    assert settings_of(gpu)["KAFKA_BOOTSTRAP"] == "cai-kafka-bootstrap:9092"
    assert not [d for d in gpu if d["kind"] == "Job"]  # Strimzi's KafkaTopics replace the Job
    args = find(gpu, "StatefulSet", "cai-trainer")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--rollout-deployment" not in args  # vLLM loads each version: nothing to roll
    assert not [d for d in gpu if d["kind"] in ("Role", "RoleBinding")]
    for stage in ("policy", "critique", "judge"):
        assert "replicas" not in find(gpu, "Deployment", f"cai-{stage}")["spec"]  # KEDA owns it


def test_trainer_runs_the_online_command() -> None:
    trainer = find(rendered("base"), "StatefulSet", "cai-trainer")
    container = trainer["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[:5] == ["train", "--source", "kafka", "--mode", "online-dpo"]
    options = dict(zip(args[1::2], args[2::2], strict=True))
    assert options["--kafka"] == "$(KAFKA_BOOTSTRAP)"
    assert options["--output-dir"] == "/checkpoints"
    assert options["--serve-policies-port"] == "8081"
    assert {"name": "checkpoints", "mountPath": "/checkpoints"} in container["volumeMounts"]
    assert trainer["spec"]["replicas"] == 1
    assert [t["metadata"]["name"] for t in trainer["spec"]["volumeClaimTemplates"]] == ["checkpoints"]


def test_trainer_arguments_make_a_valid_config() -> None:
    """The manifests' `cai train` arguments parse as its flags and give a valid TrainConfig."""
    import re

    from cli.train import train
    from trainer.config import TrainConfig

    for overlay in OVERLAYS:
        container = find(rendered(overlay), "StatefulSet", "cai-trainer")["spec"]["template"]["spec"][
            "containers"
        ][0]
        args = [re.sub(r"\$\((\w+)\)", "from-env", a) for a in container["args"]]
        assert args[0] == "train"
        context = train.make_context("train", args[1:])
        given = {k: v for k, v in context.params.items() if v is not None and k != "config_file"}
        TrainConfig.from_dict(given, f"{overlay} trainer args")  # raises, naming the setting


# ---- the copies agree with the code -------------------------------------------------------------


def test_constitution_copy_is_current() -> None:
    copied = (K8S / "base" / "constitution" / "default.yaml").read_text()
    assert copied == (ROOT / "constitutions" / "default.yaml").read_text(), (
        "deploy/k8s/base/constitution/default.yaml differs from constitutions/default.yaml: copy it again"
    )


def test_settings_are_service_settings() -> None:
    """Every CAI_<SERVICE>_* variable in the ConfigMap is a field of that service's settings, and
    the services listen on 0.0.0.0 on their usual ports."""
    from services.settings import SETTINGS

    for overlay in OVERLAYS:
        data = settings_of(rendered(overlay))
        for key in data:
            if not key.startswith("CAI_"):
                continue
            service, _, field = key.removeprefix("CAI_").partition("_")
            assert service.lower() in SETTINGS, f"{overlay}: {key}: no service {service.lower()}"
            assert field.lower() in SETTINGS[service.lower()].model_fields, (
                f"{overlay}: {key}: no such setting"
            )
        for service, cls in SETTINGS.items():
            prefix = f"CAI_{service.upper()}_"
            assert data[prefix + "HOST"] == "0.0.0.0"
            assert int(data[prefix + "PORT"]) == cls.model_fields["port"].default
            assert int(data[prefix + "METRICS_PORT"]) == cls.model_fields["metrics_port"].default
            assert data[prefix + "KAFKA"] == data["KAFKA_BOOTSTRAP"]


def test_strimzi_topics_match_the_code() -> None:
    from cai.kafka.topics import INPUT_TOPICS, TOPICS, all_topics

    topics = {d["metadata"]["name"]: d["spec"] for d in rendered("gpu") if d["kind"] == "KafkaTopic"}
    assert sorted(topics) == sorted(all_topics(""))
    for name, spec in topics.items():
        single = name.endswith(".dlq") or name == "policy-versions"
        assert spec["partitions"] == (1 if single else 4), name
    week = 7 * 24 * 3600 * 1000
    assert {topics[t]["config"]["retention.ms"] for t in TOPICS} == {week}
    assert {topics[f"{t}.dlq"]["config"]["retention.ms"] for t in INPUT_TOPICS} == {4 * week}


def test_keda_watches_the_stage_groups() -> None:
    from cai.kafka.admin import STAGE_INPUTS, stage_group

    for scaled in (d for d in rendered("gpu") if d["kind"] == "ScaledObject"):
        stage = scaled["spec"]["scaleTargetRef"]["name"].removeprefix("cai-")
        (trigger,) = scaled["spec"]["triggers"]
        assert trigger["metadata"]["consumerGroup"] == stage_group(stage)
        assert trigger["metadata"]["topic"] in STAGE_INPUTS[stage]


# ---- every invariant can fail -------------------------------------------------------------------


def _container(
    docs: list[dict[str, Any]], kind: str = "Deployment", name: str = "cai-policy"
) -> dict[str, Any]:
    containers: list[dict[str, Any]] = find(docs, kind, name)["spec"]["template"]["spec"]["containers"]
    return containers[0]


def _pod(docs: list[dict[str, Any]], kind: str = "Deployment", name: str = "cai-policy") -> dict[str, Any]:
    pod: dict[str, Any] = find(docs, kind, name)["spec"]["template"]["spec"]
    return pod


Breakage = Callable[[list[dict[str, Any]]], None]

BREAKAGES: dict[str, tuple[Breakage, str]] = {
    "no limits": (
        lambda d: _container(d)["resources"].pop("limits"),
        "Deployment/cai-policy container policy: no limits.cpu",
    ),
    "no memory request": (
        lambda d: _container(d, "Job", "cai-topics")["resources"]["requests"].pop("memory"),
        "Job/cai-topics container topics: no requests.memory",
    ),
    "no liveness probe": (
        lambda d: _container(d, "StatefulSet", "cai-trainer").pop("livenessProbe"),
        "StatefulSet/cai-trainer container trainer: no livenessProbe",
    ),
    "no readiness probe": (
        lambda d: _container(d, "Deployment", "cai-judge").pop("readinessProbe"),
        "Deployment/cai-judge container judge: no readinessProbe",
    ),
    "no security context": (
        lambda d: _container(d).pop("securityContext"),
        "Deployment/cai-policy container policy: no securityContext",
    ),
    "writable root": (
        lambda d: _container(d).__setitem__(
            "securityContext", {**_container(d)["securityContext"], "readOnlyRootFilesystem": False}
        ),
        "Deployment/cai-policy container policy: readOnlyRootFilesystem is not true",
    ),
    "capabilities kept": (
        lambda d: _container(d)["securityContext"].__setitem__("capabilities", {"drop": ["NET_RAW"]}),
        "Deployment/cai-policy container policy: capabilities do not drop ALL",
    ),
    "escalation allowed": (
        lambda d: _container(d)["securityContext"].pop("allowPrivilegeEscalation"),
        "Deployment/cai-policy container policy: allowPrivilegeEscalation is not false",
    ),
    "may run as root": (
        lambda d: _pod(d)["securityContext"].pop("runAsNonRoot"),
        "Deployment/cai-policy container policy: runAsNonRoot is not set",
    ),
    "no seccomp": (
        lambda d: _pod(d)["securityContext"].pop("seccompProfile"),
        "Deployment/cai-policy container policy: no seccompProfile RuntimeDefault",
    ),
    "selector misses the template": (
        lambda d: find(d, "Deployment", "cai-critique")["spec"]["selector"]["matchLabels"].__setitem__(
            "app.kubernetes.io/name", "cai-critic"
        ),
        "Deployment/cai-critique: spec.selector does not match the pod template's labels",
    ),
    "service targets a missing port": (
        lambda d: find(d, "Service", "cai-judge")["spec"]["ports"][1].__setitem__("targetPort", "metric"),
        "Service/cai-judge: port metric does not exist on Deployment/cai-judge's pods",
    ),
    "service selects nothing": (
        lambda d: find(d, "Service", "cai-policy")["spec"]["selector"].__setitem__(
            "app.kubernetes.io/name", "x"
        ),
        "Service/cai-policy: its selector matches no pod template",
    ),
    "pdb selects nothing": (
        lambda d: find(d, "PodDisruptionBudget", "cai-policy")["spec"]["selector"]["matchLabels"].__setitem__(
            "app.kubernetes.io/instance", "other"
        ),
        "PodDisruptionBudget/cai-policy: its selector matches no pod template",
    ),
    "gpu pool without a gpu": (
        lambda d: _pod(d).__setitem__("nodeSelector", {"nvidia.com/gpu.present": "true"}),
        "Deployment/cai-policy: runs on GPU nodes but requests no nvidia.com/gpu",
    ),
    "gpu requests differ from limits": (
        lambda d: _container(d)["resources"]["requests"].__setitem__("nvidia.com/gpu", "1"),
        "Deployment/cai-policy container policy: nvidia.com/gpu requests (1) differ from limits (None)",
    ),
    "undefined variable": (
        lambda d: _container(d, "StatefulSet", "cai-trainer")["args"].__setitem__(6, "$(KAFKA_BOOTSTRAPS)"),
        "StatefulSet/cai-trainer container trainer: $(KAFKA_BOOTSTRAPS) is not one of its "
        "environment variables",
    ),
    "skip without a reason": (
        lambda d: find(d, "Job", "cai-topics")["metadata"]["annotations"].__setitem__(
            "checkov.io/skip1", "CKV_K8S_43"
        ),
        "Job/cai-topics: checkov.io/skip1 must be CHECK_ID=reason, got 'CKV_K8S_43'",
    ),
    "no namespace": (
        lambda d: find(d, "Service", "cai-trainer")["metadata"].pop("namespace"),
        "Service/cai-trainer: no namespace (it would land in the default one)",
    ),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_invariant_fails_on_a_broken_manifest(breakage: str) -> None:
    docs = rendered("local")
    assert check.check_invariants(docs, set()) == []
    apply, expected = BREAKAGES[breakage]
    apply(docs)
    assert expected in check.check_invariants(docs, set())


def test_gpu_workload_without_a_gpu_fails() -> None:
    docs = rendered("gpu")
    pod = _pod(docs, "Deployment", "cai-policy")
    (vllm,) = [c for c in pod["containers"] if c["name"] == "vllm"]
    for part in ("requests", "limits"):
        vllm["resources"][part].pop("nvidia.com/gpu")
    pod.pop("nodeSelector")
    pod.pop("tolerations")
    problems = check.check_invariants(docs, check.GPU_WORKLOADS["gpu"])
    assert problems == ["Deployment/cai-policy: is a GPU workload but requests no nvidia.com/gpu"]
    docs = [d for d in docs if d["metadata"]["name"] != "cai-trainer"]
    assert "StatefulSet/cai-trainer: GPU workload missing from the manifests" in check.check_invariants(
        docs, check.GPU_WORKLOADS["gpu"]
    )


@pytest.mark.parametrize(
    ("kind", "name", "path", "value", "message"),
    [
        ("KafkaTopic", "prompts", ["spec", "partitions"], 0, "0 is less than the minimum of 1"),
        ("KafkaTopic", "prompts", ["spec", "replica"], 3, "Additional properties are not allowed ('replica'"),
        (
            "Kafka",
            "cai",
            ["spec", "kafka", "listeners", 0, "port"],
            80,
            "80 is less than the minimum of 9092",
        ),
        (
            "KafkaNodePool",
            "dual-role",
            ["spec", "roles"],
            ["broker", "zookeeper"],
            "'zookeeper' is not one of",
        ),
        (
            "ScaledObject",
            "cai-judge",
            ["spec", "triggers", 0, "metadata", "lagThreshold"],
            16,
            "16 is not of type",
        ),
        (
            "ScaledObject",
            "cai-judge",
            ["spec", "triggers", 0, "metadata", "consumergroup"],
            "x",
            "'consumergroup'",
        ),
        ("ServiceMonitor", "cai-policy", ["spec", "endpoints", 0, "interval"], "30 s", "does not match"),
    ],
)
def test_custom_resource_schema_rejects_a_broken_resource(
    kind: str, name: str, path: list[Any], value: Any, message: str
) -> None:
    doc = find(rendered("gpu"), kind, name)
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    problems = check.validate_custom([doc])
    assert any(message in p for p in problems), problems


def test_custom_resource_without_a_schema_fails() -> None:
    doc = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {}}
    assert check.validate_custom([doc]) == [
        f"Widget/w: no schema for example.com/v1 Widget in {check.SCHEMAS}"
    ]


def test_schemas_are_valid_json_schemas() -> None:
    paths = sorted((K8S / "schemas").glob("*.json"))
    # the exact set, so that an empty or renamed schemas/ folder fails here instead of passing
    assert [p.name for p in paths] == [
        "kafka.strimzi.io_v1_kafka.json",
        "kafka.strimzi.io_v1_kafkanodepool.json",
        "kafka.strimzi.io_v1_kafkatopic.json",
        "keda.sh_v1alpha1_scaledobject.json",
        "monitoring.coreos.com_v1_servicemonitor.json",
    ]
    for path in paths:
        jsonschema.Draft7Validator.check_schema(json.loads(path.read_text()))


def test_builtin_and_custom_kinds_are_told_apart() -> None:
    kinds = {(d["apiVersion"], d["kind"]): check.is_builtin(d) for d in rendered("gpu")}
    assert kinds[("apps/v1", "Deployment")] and kinds[("v1", "Service")]
    assert kinds[("networking.k8s.io/v1", "NetworkPolicy")] and kinds[("policy/v1", "PodDisruptionBudget")]
    assert (
        not kinds[("kafka.strimzi.io/v1", "KafkaTopic")] and not kinds[("keda.sh/v1alpha1", "ScaledObject")]
    )


def test_kustomize_refuses_a_broken_overlay(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump({"resources": [str(K8S / "base")], "components": ["../no-such-component"]})
    )
    with pytest.raises(subprocess.CalledProcessError):
        check.render(kustomize(), tmp_path)
