"""components/trainjob: the Kubeflow Trainer TrainJob for offline runs, rendered with the base.

The control plane in tests/k8s has no Kubeflow Trainer CRD, so the TrainJob is checked here as
text against what the trainer and the runtime need: the runtime torch-distributed, torchrun
running `cai train`, arguments that make a valid TrainConfig for an offline mode, GPUs asked for
right, both folders mounted, and the job's pods reaching each other through their policy. The
rendered objects also keep deploy/check.py's invariants."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.test_manifests import K8S, check, find, kustomize


def render(tmp_path: Path) -> list[dict[str, Any]]:
    """The base with the component, as an overlay would use it."""
    base = os.path.relpath(K8S / "base", tmp_path)
    component = os.path.relpath(K8S / "components" / "trainjob", tmp_path)
    overlay = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": "cai",
        "resources": [base],
        "components": [component],
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    return check.load_docs(check.render(kustomize(), tmp_path))


def test_the_trainjob_runs_cai_train_under_torchrun(tmp_path):
    from cli.train import train
    from trainer.config import TrainConfig

    docs = render(tmp_path)
    assert check.check_invariants(docs) == []
    job = find(docs, "TrainJob", "cai-offline-train")
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    assert job["metadata"]["namespace"] == "cai"
    spec = job["spec"]
    assert spec["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "TrainingRuntime",
        "name": "cai-torch-distributed",
    }
    runtime = find(docs, "TrainingRuntime", "cai-torch-distributed")
    assert runtime["spec"]["mlPolicy"]["torch"]["numProcPerNode"] == "auto"  # torchrun's PET_* set
    trainer = spec["trainer"]
    assert trainer["command"] == ["torchrun", "-m", "cli.main"]  # the runtime's PET_* set the rest
    assert isinstance(trainer["numNodes"], int) and trainer["numNodes"] >= 1
    args = [re.sub(r"\$\((\w+)\)", "from-env", a) for a in trainer["args"]]
    assert args[0] == "train"
    context = train.make_context("train", args[1:])
    given = {k: v for k, v in context.params.items() if v is not None and k != "config_file"}
    config = TrainConfig.from_dict(given, "trainjob args")
    assert config.mode in ("sft", "dpo") and config.max_steps is not None
    resources = trainer["resourcesPerNode"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]

    (node,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == "node"
    pod = node["template"]["spec"]["template"]["spec"]
    # the namespace enforces the restricted Pod Security Standard
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    assert claims[mounts[config.data]] == "cai-train-data"
    assert claims[mounts[config.output_dir]] == "cai-train-output"
    for claim in claims.values():  # every node mounts them, whichever is rank 0
        assert find(docs, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"]


def test_the_trainjob_pods_reach_only_each_other(tmp_path):
    policy = find(render(tmp_path), "NetworkPolicy", "cai-offline-train")
    selector = {"matchLabels": {"jobset.sigs.k8s.io/jobset-name": "cai-offline-train"}}
    assert policy["spec"]["podSelector"] == selector
    assert policy["spec"]["ingress"][0]["from"] == [{"podSelector": selector}]
    assert policy["spec"]["egress"][0]["to"] == [{"podSelector": selector}]
    ports = {(p["port"], p.get("endPort")) for p in policy["spec"]["ingress"][0]["ports"]}
    assert ports == {(29400, None), (32768, 60999)}
