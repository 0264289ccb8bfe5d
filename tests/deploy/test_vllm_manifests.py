"""The GPU overlay's vLLM serving path: each invariant of deploy/check.py's `check_vllm` holds on
the rendered overlay and fails on a manifest that breaks it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.deploy.test_manifests import check, find, rendered, settings_of

Docs = list[dict[str, Any]]


def vllm(docs: Docs) -> dict[str, Any]:
    pod = find(docs, "Deployment", "cai-policy")["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "vllm"]
    return container


def set_arg(docs: Docs, name: str, value: str) -> None:
    args = vllm(docs)["args"]
    args[:] = [a for a in args if not a.startswith(name + "=")] + [f"{name}={value}"]


def set_setting(docs: Docs, key: str, value: str | None) -> None:
    data = settings_of(docs)
    if value is None:
        data.pop(key)
    else:
        data[key] = value


def trainer_args(docs: Docs) -> list[str]:
    args: list[str] = find(docs, "StatefulSet", "cai-trainer")["spec"]["template"]["spec"]["containers"][0][
        "args"
    ]
    return args


def set_trainer_arg(docs: Docs, name: str, value: str) -> None:
    args = trainer_args(docs)
    if name in args:
        args[args.index(name) + 1] = value
    else:
        args += [name, value]


def unmount_adapters(docs: Docs) -> None:
    vllm(docs)["volumeMounts"] = [m for m in vllm(docs)["volumeMounts"] if m["name"] != "adapters"]


def readd_trainer_binding(docs: Docs) -> None:
    docs.append(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "cai-trainer-rollout", "namespace": "cai"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "x"},
            "subjects": [{"kind": "ServiceAccount", "name": "cai-trainer"}],
        }
    )


W = "Deployment/cai-policy container vllm"
BREAKAGES: dict[str, tuple[Callable[[Docs], None], str]] = {
    "too few LoRA slots": (
        lambda d: set_arg(d, "--max-loras", "2"),
        f"{W}: --max-loras 2 < the trainer's max_staleness + 1 (3): rollouts on the older versions "
        "it still accepts would wait for a slot",
    ),
    "a wider staleness window": (
        lambda d: set_trainer_arg(d, "--max-staleness", "4"),
        f"{W}: --max-loras 3 < the trainer's max_staleness + 1 (5): rollouts on the older versions "
        "it still accepts would wait for a slot",
    ),
    "runtime updating off": (
        lambda d: vllm(d).update(env=[e for e in vllm(d)["env"] if not e["name"].startswith("VLLM_ALLOW")]),
        f"{W}: the trainer publishes policy versions but VLLM_ALLOW_RUNTIME_LORA_UPDATING is not true "
        "(vLLM cannot load them)",
    ),
    "no LoRA": (
        lambda d: vllm(d).update(args=[a for a in vllm(d)["args"] if a != "--enable-lora"]),
        f"{W}: the trainer publishes LoRA adapters but vLLM lacks --enable-lora",
    ),
    "rank too small": (
        lambda d: set_trainer_arg(d, "--lora-r", "32"),
        f"{W}: --max-lora-rank 16 < the trainer's lora_r (32)",
    ),
    "more versions kept than slots": (
        lambda d: set_setting(d, "CAI_POLICY_LOADED_VERSIONS", "4"),
        f"{W}: CAI_POLICY_LOADED_VERSIONS 4 must be between the trainer's max_staleness + 1 (3) and "
        "--max-loras (3)",
    ),
    "the policy on another engine": (
        lambda d: set_setting(d, "CAI_POLICY_BACKEND", "openai:http://cai-vllm:8000"),
        f"{W}: CAI_POLICY_BACKEND must be openai:http://127.0.0.1:8000, this pod's vLLM",
    ),
    "adapters not shared": (
        unmount_adapters,
        f"{W}: CAI_POLICY_ADAPTER_DIR (/var/cai/adapters) must be one volume mounted at that path in "
        "both the policy and the vllm container",
    ),
    "judge on whatever model": (
        lambda d: set_setting(d, "CAI_JUDGE_SERVED_MODEL", None),
        f"{W}: CAI_JUDGE_SERVED_MODEL must name the base model ('smollm2-135m-instruct'), or judge may "
        "be served by a policy adapter",
    ),
    "trainer RBAC back": (
        readd_trainer_binding,
        "RoleBinding/cai-trainer-rollout: with vLLM loading policy versions the trainer needs no "
        "Kubernetes API access",
    ),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_vllm_invariant_fails_on_a_broken_manifest(breakage: str) -> None:
    docs = rendered("gpu")
    assert check.check_vllm(docs) == []
    apply, expected = BREAKAGES[breakage]
    apply(docs)
    assert expected in check.check_vllm(docs)


def test_feedback_names_the_base_model_the_engine_serves() -> None:
    docs = rendered("gpu")
    served = check._flag(vllm(docs)["args"], "--served-model-name")
    settings = settings_of(docs)
    for service in ("CRITIQUE", "JUDGE"):
        assert settings[f"CAI_{service}_BACKEND"] == "openai:http://cai-vllm:8000"
        assert settings[f"CAI_{service}_SERVED_MODEL"] == served
    assert vllm(docs)["image"].startswith("vllm/vllm-openai:v")  # pinned by tag
    assert {"path": "/health", "port": "vllm"}.items() <= vllm(docs)["readinessProbe"]["httpGet"].items()
    monitor = find(docs, "ServiceMonitor", "cai-vllm")
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
