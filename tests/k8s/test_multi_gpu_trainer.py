"""The GPU overlay's trainer scaled to 2 pods of 4 GPUs each (the recipe in docs/training.md:
replicas, TRAINER_NODES and the GPU count changed together), applied to the real control plane:
the API server accepts it, the scheduler puts each pod on a GPU node with its 4 GPUs, every pod
gets the ordinal label its node rank is read from, and pod 0's name resolves before it is Ready."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from k8s_support import GPU_NODES, NAMESPACE, OVERLAYS, Deployed, deploy

SCALE = """\
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - {overlay}
patches:
  - patch: |-
      apiVersion: apps/v1
      kind: StatefulSet
      metadata:
        name: cai-trainer
        namespace: cai
      spec:
        replicas: 2
        template:
          spec:
            containers:
              - name: trainer
                env:
                  - name: TRAINER_NODES
                    value: "2"
                resources:
                  requests:
                    nvidia.com/gpu: "4"
                  limits:
                    nvidia.com/gpu: "4"
"""


@pytest.fixture(scope="module")
def scaled(controlplane: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    folder = tmp_path_factory.mktemp("gpu-scaled")
    overlay = os.path.relpath(OVERLAYS / "gpu", folder)  # kustomize takes relative paths
    (folder / "kustomization.yaml").write_text(SCALE.format(overlay=overlay))
    yield from deploy(controlplane, str(folder))  # an absolute path: OVERLAYS / it is itself


def env_of(pod: dict[str, Any]) -> dict[str, Any]:
    container = next(c for c in pod["spec"]["containers"] if c["name"] == "trainer")
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_the_trainer_runs_on_two_gpu_pods_of_four_gpus(scaled):
    pods = sorted(
        scaled.pods(**{"app.kubernetes.io/name": "cai-trainer"}), key=lambda p: p["metadata"]["name"]
    )
    assert [p["metadata"]["name"] for p in pods] == ["cai-trainer-0", "cai-trainer-1"]
    for ordinal, pod in enumerate(pods):
        assert pod["spec"]["nodeName"] in GPU_NODES
        assert pod["status"]["phase"] == "Running"
        container = next(c for c in pod["spec"]["containers"] if c["name"] == "trainer")
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
        # torchrun's node rank comes from this label, so rank 0 is always pod 0 (its checkpoints)
        assert pod["metadata"]["labels"]["apps.kubernetes.io/pod-index"] == str(ordinal)
        env = env_of(pod)
        assert env["TRAINER_NODES"] == "2"
        assert "apps.kubernetes.io/pod-index" in env["NODE_RANK"]["fieldRef"]["fieldPath"]
        command = container["command"]
        assert command[0] == "torchrun" and "--nproc-per-node=gpu" in command
        assert "--master-addr=cai-trainer-0.cai-trainer" in command


def test_ranks_may_reach_each_other_and_pod_zero_resolves_early(scaled):
    service = scaled.plane.get("service/cai-trainer", "-n", NAMESPACE)
    assert service["spec"]["publishNotReadyAddresses"] is True
    policy = scaled.plane.get("networkpolicy/cai-trainer-ranks", "-n", NAMESPACE)
    rules = policy["spec"]["ingress"][0]
    assert rules["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "cai-trainer"}}}]
    ports = {(p["port"], p.get("endPort")) for p in rules["ports"]}
    assert ports == {(29500, None), (32768, 60999)}  # the rendezvous, and NCCL's ephemeral ports
