"""components/trainjob on the real control plane: the API server, with Kubeflow Trainer v2.1's own
CRDs (crds.sh), accepts the offline TrainJob and its TrainingRuntime as rendered, keeps what the
Trainer reads from them (nothing pruned), and refuses a TrainJob that breaks the CRD's schema.
No Trainer controller runs here (kwok runs no containers either), so the job is never started."""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import pytest
import yaml
from k8s_support import REPO, render

NAMESPACE = "cai-trainjob"  # not `cai`: the overlays' modules create and delete that one


@pytest.fixture
def trainjob_docs(controlplane: Any, tmp_path) -> list[dict[str, Any]]:
    component = os.path.relpath(REPO / "deploy" / "k8s" / "components" / "trainjob", tmp_path)
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": NAMESPACE,
        "components": [component],
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return render(controlplane, tmp_path)


def pod_of(runtime: dict[str, Any]) -> dict[str, Any]:
    (node,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    pod: dict[str, Any] = node["template"]["spec"]["template"]["spec"]
    return pod


def test_the_api_server_accepts_the_trainjob_and_its_runtime_and_refuses_a_broken_one(
    controlplane, trainjob_docs
):
    assert "trainjobs.trainer.kubeflow.org" in controlplane.crds
    controlplane.kubectl("create", "namespace", NAMESPACE)
    try:
        controlplane.apply(trainjob_docs)
        job = controlplane.get("trainjob/cai-offline-train", "-n", NAMESPACE)
        (sent,) = [d for d in trainjob_docs if d["kind"] == "TrainJob"]
        # nothing the runtime reads was pruned by the CRD's schema
        assert job["spec"]["runtimeRef"] == sent["spec"]["runtimeRef"]
        assert job["spec"]["trainer"] == sent["spec"]["trainer"]
        assert job["spec"]["trainer"]["command"][0] == "torchrun"
        runtime = controlplane.get("trainingruntime/cai-torch-distributed", "-n", NAMESPACE)
        (sent_runtime,) = [d for d in trainjob_docs if d["kind"] == "TrainingRuntime"]
        assert runtime["spec"]["mlPolicy"] == sent_runtime["spec"]["mlPolicy"]
        pods = [pod_of(r) for r in (runtime, sent_runtime)]
        for key in ("securityContext", "nodeSelector", "tolerations", "volumes", "containers"):
            assert pods[0][key] == pods[1][key], key  # the pod template kept as written
        broken = copy.deepcopy(sent)
        broken["metadata"]["name"] = "cai-broken-train"
        broken["spec"]["trainer"]["numNodes"] = "two"
        refused = controlplane.kubectl(
            "apply", "--server-side", "-f", "-", input=json.dumps(broken), check=False
        )
        assert refused.returncode != 0
        assert "spec.trainer.numNodes" in refused.stderr, refused.stderr
    finally:
        controlplane.kubectl("delete", "namespace", NAMESPACE, "--wait=false")
