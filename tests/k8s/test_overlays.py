"""The overlays in deploy/k8s/overlays, applied server-side to a real API server.

The API server validates every object (built-in kinds by Kubernetes, custom kinds by the CRDs their
projects publish), admission runs PodSecurity, the scheduler places the pods on kwok's nodes
against their taints, selectors and capacity, the controller manager rolls the workloads out and
keeps the PodDisruptionBudgets' status, and kwok reports the pods Running and Ready (no container
runs). Each test module parameter is one overlay in a fresh namespace.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from k8s_support import CPU_NODES, GPU_NODES, NAMESPACE, ON_GPU, wait_for_rollouts


def owner_name(pod: dict[str, Any]) -> str:
    """The Deployment, StatefulSet or Job a pod belongs to (the pod's app.kubernetes.io/name)."""
    return str(pod["metadata"]["labels"]["app.kubernetes.io/name"])


def test_every_rendered_object_is_accepted(deployed):
    applied = Counter(
        (line.split("/", 1)[0].split(".")[0], line.split("/", 1)[1]) for line in deployed.applied
    )
    rendered = Counter((o["kind"].lower(), o["metadata"]["name"]) for o in deployed.rendered)
    assert applied == rendered
    names = [f"{kind}/{name}" for kind, name in rendered]
    stored = deployed.plane.kubectl("get", "-n", NAMESPACE, *names, "-o", "name").stdout.split()
    assert len(stored) == len(names)


def test_custom_resources_are_served_by_the_published_crds(deployed, controlplane):
    custom = {
        o["apiVersion"].split("/")[0] for o in deployed.rendered if "." in o["apiVersion"].split("/")[0]
    }
    custom -= {"apps", "batch", "policy", "networking.k8s.io", "rbac.authorization.k8s.io"}
    groups = {name.split(".", 1)[1] for name in controlplane.crds}
    assert custom <= groups
    if deployed.name == "gpu":
        assert custom == {"kafka.strimzi.io", "keda.sh", "monitoring.coreos.com"}
        # The objects were validated by the real schemas: what they hold survived structural pruning.
        kafka = controlplane.get("kafka.kafka.strimzi.io/cai", "-n", NAMESPACE)
        assert kafka["spec"]["kafka"]["listeners"][0]["port"] == 9092
        scaled = controlplane.get("scaledobject.keda.sh/cai-judge", "-n", NAMESPACE)
        assert scaled["spec"]["triggers"][0]["metadata"]["lagThreshold"] == "16"


def test_a_schema_violation_is_rejected_by_the_crd(controlplane):
    bad = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": "bad", "namespace": "default"},
        "spec": {"scaleTargetRef": {"name": "cai-judge"}, "minReplicaCount": "many", "triggers": []},
    }
    result = controlplane.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(bad), check=False)
    assert result.returncode != 0
    assert "minReplicaCount" in result.stderr


def test_every_workload_rolls_out(deployed, controlplane):
    for kind, name in deployed.workloads():
        obj = controlplane.get(f"{kind.lower()}/{name}", "-n", NAMESPACE)
        status = obj["status"]
        if kind == "Job":
            assert status.get("succeeded", 0) >= 1, name
            assert any(c["type"] == "Complete" and c["status"] == "True" for c in status["conditions"]), name
            continue
        replicas = obj["spec"].get("replicas", 1)
        assert status["observedGeneration"] == obj["metadata"]["generation"], name
        assert status.get("readyReplicas") == status.get("updatedReplicas") == replicas, name
        if kind == "StatefulSet":
            assert status["currentRevision"] == status["updateRevision"], name


def test_pods_run_on_the_right_nodes(deployed):
    on_gpu = ON_GPU[deployed.name]
    pods = deployed.pods()
    seen = {owner_name(p) for p in pods}
    assert on_gpu <= seen
    for pod in pods:
        node = pod["spec"].get("nodeName")
        wanted = GPU_NODES if owner_name(pod) in on_gpu else CPU_NODES
        assert node in wanted, f"{pod['metadata']['name']} runs on {node}, expected one of {sorted(wanted)}"
        assert pod["status"]["phase"] in ("Running", "Succeeded"), pod["metadata"]["name"]


def test_exactly_the_gpu_workloads_request_whole_gpus(deployed, controlplane):
    on_gpu = ON_GPU[deployed.name]
    requested = 0
    for pod in deployed.pods():
        gpus = []
        for container in pod["spec"]["containers"]:
            resources = container.get("resources", {})
            limit = resources.get("limits", {}).get("nvidia.com/gpu")
            assert resources.get("requests", {}).get("nvidia.com/gpu") == limit, pod["metadata"]["name"]
            gpus += [int(limit)] if limit else []
        if owner_name(pod) in on_gpu:
            assert sum(gpus) >= 1, f"{pod['metadata']['name']} runs on a GPU node without a GPU"
        else:
            assert not gpus, f"{pod['metadata']['name']} requests a GPU"
        requested += sum(gpus)
    # The GPU nodes count them against their nvidia.com/gpu capacity.
    allocated = 0
    for node in sorted(GPU_NODES):
        described = controlplane.kubectl("describe", "node", node).stdout
        table = described.split("Allocated resources:", 1)[1].split("Events:", 1)[0]
        allocated += sum(int(line.split()[1]) for line in table.splitlines() if "nvidia.com/gpu" in line)
    assert allocated == requested


def test_a_pod_without_the_gpu_toleration_is_not_scheduled_on_a_gpu_node(deployed, controlplane):
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "wants-gpu-node", "namespace": NAMESPACE},
        "spec": {
            "nodeSelector": {"nvidia.com/gpu.present": "true"},
            "automountServiceAccountToken": False,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 1000,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "c",
                    "image": "busybox",
                    "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                }
            ],
        },
    }
    controlplane.apply([pod])
    try:
        controlplane.wait_for(
            "the scheduler to report wants-gpu-node unschedulable",
            lambda: any(
                c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable"
                for c in controlplane.get("pod/wants-gpu-node", "-n", NAMESPACE)["status"].get(
                    "conditions", []
                )
            ),
            60,
        )
        got = controlplane.get("pod/wants-gpu-node", "-n", NAMESPACE)
        assert "nodeName" not in got["spec"]
        message = next(c["message"] for c in got["status"]["conditions"] if c["type"] == "PodScheduled")
        assert "nvidia.com/gpu" in message
    finally:
        controlplane.kubectl("delete", "pod", "wants-gpu-node", "-n", NAMESPACE, "--wait=false")


def test_every_pod_meets_the_restricted_pod_security_standard(deployed, controlplane):
    # A server-side dry run of enforcing `restricted` (at a pinned version, so the check runs even
    # where it is enforced already) warns about every existing pod that would violate it.
    result = controlplane.kubectl(
        "label", "--dry-run=server", "--overwrite", "namespace", NAMESPACE,
        "pod-security.kubernetes.io/enforce=restricted", "pod-security.kubernetes.io/enforce-version=v1.33",
    )  # fmt: skip
    assert "violate" not in result.stderr, result.stderr
    assert deployed.pods()


def test_pod_security_admission_rejects_a_privileged_pod(deployed, controlplane):
    labels = controlplane.get("namespace", NAMESPACE)["metadata"]["labels"]
    enforced = labels["pod-security.kubernetes.io/enforce"]
    assert enforced == {"local": "restricted", "gpu": "baseline"}[deployed.name]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "privileged", "namespace": NAMESPACE},
        "spec": {"containers": [{"name": "c", "image": "busybox", "securityContext": {"privileged": True}}]},
    }
    result = controlplane.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(pod), check=False)
    assert result.returncode != 0
    assert f'violates PodSecurity "{enforced}' in result.stderr


def test_pod_disruption_budgets_allow_one_disruption(deployed, controlplane):
    budgets = [o["metadata"]["name"] for o in deployed.rendered if o["kind"] == "PodDisruptionBudget"]
    assert budgets
    for name in budgets:
        status = controlplane.get(f"pdb/{name}", "-n", NAMESPACE)["status"]
        assert status["expectedPods"] == status["currentHealthy"] >= 1, name
        assert status["disruptionsAllowed"] == 1, name


def test_network_policies_are_admitted(deployed, controlplane):
    rendered = {o["metadata"]["name"] for o in deployed.rendered if o["kind"] == "NetworkPolicy"}
    stored = {p["metadata"]["name"] for p in controlplane.get("networkpolicy", "-n", NAMESPACE)["items"]}
    assert rendered and rendered == stored


def test_applying_again_changes_nothing_and_only_keda_leaves_replicas_alone(deployed, controlplane):
    """A second server-side apply rolls nothing. Where KEDA owns the replica counts (gpu), the
    overlay leaves them alone; where the overlay sets them (local), a count changed since is a
    conflict that the apply reports instead of silently undoing it."""
    plane = controlplane
    stages = ["cai-policy", "cai-critique", "cai-judge"]
    before = {n: plane.get(f"deployment/{n}", "-n", NAMESPACE)["metadata"]["generation"] for n in stages}
    plane.kubectl("scale", "deployment/cai-critique", "-n", NAMESPACE, "--replicas=3")  # as an HPA would
    try:
        result = plane.kubectl(
            "apply", "--server-side", "--field-manager=cai-tests", "-k", str(deployed.overlay), check=False
        )
        after = {n: plane.get(f"deployment/{n}", "-n", NAMESPACE) for n in stages}
        assert after["cai-policy"]["metadata"]["generation"] == before["cai-policy"]
        assert after["cai-judge"]["metadata"]["generation"] == before["cai-judge"]
        assert after["cai-critique"]["spec"]["replicas"] == 3
        if deployed.name == "gpu":
            assert result.returncode == 0, result.stderr
        else:
            assert result.returncode != 0
            assert "conflict" in result.stderr and ".spec.replicas" in result.stderr
    finally:
        plane.kubectl("scale", "deployment/cai-critique", "-n", NAMESPACE, "--replicas=1")
    wait_for_rollouts(plane, deployed)


def test_drain_respects_the_disruption_budgets(deployed, controlplane):
    """With nowhere to reschedule, a drain evicts one of two judge pods and then waits on the PDB."""
    plane = controlplane
    plane.kubectl("scale", "deployment/cai-judge", "-n", NAMESPACE, "--replicas=2")
    plane.kubectl("rollout", "status", "deployment/cai-judge", "-n", NAMESPACE, "--timeout=120s")
    plane.wait_for(
        "the cai-judge PDB to count two healthy pods",
        lambda: plane.get("pdb/cai-judge", "-n", NAMESPACE)["status"].get("currentHealthy") == 2,
        60,
    )
    judges = deployed.pods(**{"app.kubernetes.io/name": "cai-judge"})
    nodes = sorted({p["spec"]["nodeName"] for p in judges})
    try:
        plane.kubectl("cordon", *sorted(CPU_NODES))
        result = plane.kubectl(
            "drain", *nodes, "--ignore-daemonsets", "--delete-emptydir-data", "--timeout=20s",
            check=False, timeout_s=60,
        )  # fmt: skip
        assert result.returncode != 0, result.stdout
        assert "disruption budget" in result.stderr
        left = [
            p for p in deployed.pods(**{"app.kubernetes.io/name": "cai-judge"}) if p["spec"].get("nodeName")
        ]
        running = [p for p in left if "deletionTimestamp" not in p["metadata"]]
        assert len(running) == 1, [p["metadata"]["name"] for p in left]
        assert plane.get("pdb/cai-judge", "-n", NAMESPACE)["status"]["disruptionsAllowed"] == 0
    finally:
        plane.kubectl("uncordon", *sorted(CPU_NODES))
        plane.kubectl("scale", "deployment/cai-judge", "-n", NAMESPACE, "--replicas=1")
    wait_for_rollouts(plane, deployed)
    plane.wait_for(
        "the cai-judge PDB to allow one disruption again",
        lambda: plane.get("pdb/cai-judge", "-n", NAMESPACE)["status"].get("disruptionsAllowed") == 1,
        60,
    )
