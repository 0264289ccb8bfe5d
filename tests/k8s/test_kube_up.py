"""`make kube-up` (deploy/controlplane/controlplane.py up), as docs/deploy.md tells a person to run it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from k8s_support import CPU_NODES, GPU_NODES, OVERLAYS, REPO, controlplane_module


def test_kube_up_applies_an_overlay_and_stops_everything_on_sigterm(tmp_path):
    controlplane_module.build()  # finds the cached build (builds it the first time)
    command = [
        sys.executable, str(REPO / "deploy" / "controlplane" / "controlplane.py"),
        "up", "--dir", str(tmp_path), "--apply", str(OVERLAYS / "local"),
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("export KUBECONFIG="):
                break
        output = "".join(lines)
        assert lines and lines[-1].startswith("export KUBECONFIG="), output
        kubeconfig = lines[-1].split("=", 1)[1].strip()
        assert "deployment.apps/cai-policy" in output
        kubectl = [str(controlplane_module.build() / "kubectl"), f"--kubeconfig={kubeconfig}"]
        nodes = json.loads(subprocess.check_output([*kubectl, "get", "nodes", "-o", "json"], timeout=60))
        assert {n["metadata"]["name"] for n in nodes["items"]} == CPU_NODES | GPU_NODES
        subprocess.run(
            [*kubectl, "-n", "cai", "rollout", "status", "deployment/cai-policy", "--timeout=120s"],
            check=True, capture_output=True, timeout=150,
        )  # fmt: skip
        pids = [int(p.read_text()) for p in (tmp_path / "pids").glob("*")]
        assert len(pids) == 5
    finally:
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=60)
    assert process.returncode == 0, "".join(lines) + rest
    for pid in pids:
        assert not _alive(pid), f"a component (pid {pid}) outlived kube-up"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
