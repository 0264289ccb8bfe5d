"""What the tests in tests/k8s share: the control plane's module and the overlay helpers."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
OVERLAYS = REPO / "deploy" / "k8s" / "overlays"
NAMESPACE = "cai"
# The overlays under test; the workloads whose pods must run on GPU nodes in each (every other pod
# must run on a CPU node).
ON_GPU: dict[str, set[str]] = {"local": set(), "gpu": {"cai-trainer", "cai-policy"}}


def _load_controlplane() -> Any:
    path = REPO / "deploy" / "controlplane" / "controlplane.py"
    spec = importlib.util.spec_from_file_location("cai_controlplane", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


controlplane_module = _load_controlplane()
ControlPlaneError = controlplane_module.ControlPlaneError
CPU_NODES = {n.name for n in controlplane_module.DEFAULT_NODES if not n.gpus}
GPU_NODES = {n.name for n in controlplane_module.DEFAULT_NODES if n.gpus}


@dataclass
class Deployed:
    """One overlay, applied: what kubectl reported and what kustomize rendered."""

    plane: Any
    overlay: Path
    applied: list[str]  # "kind.group/name", as `kubectl apply -o name` prints them
    rendered: list[dict[str, Any]]  # the overlay's objects, as `kubectl kustomize` renders them

    def pods(self, **selector: str) -> list[dict[str, Any]]:
        args = ["pods", "-n", NAMESPACE]
        if selector:
            args += ["-l", ",".join(f"{k}={v}" for k, v in selector.items())]
        return list(self.plane.get(*args)["items"])

    @property
    def name(self) -> str:
        return self.overlay.name

    def workloads(self) -> list[tuple[str, str]]:
        """(kind, name) of every Deployment, StatefulSet and Job the overlay has."""
        kinds = {"Deployment", "StatefulSet", "Job"}
        return [(o["kind"], o["metadata"]["name"]) for o in self.rendered if o["kind"] in kinds]


def render(plane: Any, overlay: Path) -> list[dict[str, Any]]:
    out = plane.kubectl("kustomize", str(overlay)).stdout
    import yaml

    return [doc for doc in yaml.safe_load_all(out) if doc]


def wait_for_rollouts(plane: Any, deployed: Deployed, timeout_s: int = 180) -> None:
    """Every Deployment and StatefulSet rolled out, every Job complete; else name what is not."""
    for kind, name in deployed.workloads():
        if kind == "Job":
            result = plane.kubectl(
                "wait", "-n", NAMESPACE, "--for=condition=Complete", f"job/{name}", f"--timeout={timeout_s}s",
                check=False, timeout_s=timeout_s + 10,
            )  # fmt: skip
        else:
            result = plane.kubectl(
                "rollout", "status", "-n", NAMESPACE, f"{kind.lower()}/{name}", f"--timeout={timeout_s}s",
                check=False, timeout_s=timeout_s + 10,
            )  # fmt: skip
        if result.returncode != 0:
            pods = plane.kubectl("get", "pods", "-n", NAMESPACE, "-o", "wide", check=False).stdout
            events = plane.kubectl(
                "get", "events", "-n", NAMESPACE, "--sort-by=.lastTimestamp", check=False
            ).stdout
            raise ControlPlaneError(
                f"{kind} {name} did not finish rolling out within {timeout_s} s: "
                f"{result.stderr or result.stdout}\npods:\n{pods}\nevents (last 30):\n"
                + "\n".join(events.splitlines()[-30:])
            )


def delete_namespace(plane: Any, timeout_s: int = 120) -> None:
    plane.kubectl("delete", "namespace", NAMESPACE, "--ignore-not-found", "--wait=false")
    plane.wait_for(
        f"namespace {NAMESPACE} to be deleted",
        lambda: plane.kubectl("get", "namespace", NAMESPACE, check=False).returncode != 0,
        timeout_s,
    )
    # The volumes the namespace's claims held are Released (reclaim policy Retain): free them.
    for pv in plane.get("pv")["items"]:
        if pv["status"].get("phase") == "Released":
            patch = json.dumps({"spec": {"claimRef": None}})
            plane.kubectl("patch", "pv", pv["metadata"]["name"], "--type=merge", "-p", patch)


def deploy(plane: Any, overlay_name: str) -> Iterator[Deployed]:
    overlay = OVERLAYS / overlay_name
    rendered = render(plane, overlay)
    applied = plane.apply_overlay(overlay)
    deployed = Deployed(plane, overlay, applied, rendered)
    try:
        wait_for_rollouts(plane, deployed)
        yield deployed
    finally:
        delete_namespace(plane)
