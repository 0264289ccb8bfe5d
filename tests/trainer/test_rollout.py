"""Rolling the policy Deployment through the Kubernetes API: retries, give-ups and input checks.

The rollout against a real API server, with the trainer's own ServiceAccount token and RBAC
(the patch, 403 for every other Deployment, 404, 401), is tested in tests/k8s/test_rbac.py. Here a
stdlib HTTP server on loopback stands in for the API server only to inject what a real one cannot
be made to answer on demand: 429 (throttling), 5xx and an unreachable address. It answers
`PATCH /apis/apps/v1/namespaces/{ns}/deployments/{name}` as the API server does (bearer token,
strategic-merge-patch content type, the pod-template annotations merged into a stored
Deployment) and the real `kubernetes` client talks to it.
"""

from __future__ import annotations

import copy
import json
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from kubernetes import client

from cai.errors import InvalidArgument, Unavailable
from trainer.rollout import DeploymentRollout

TOKEN = "t0ken"
SHA = "ab" * 32
PATH = re.compile(r"/apis/apps/v1/namespaces/([^/]+)/deployments/([^/?]+)")


def deployment(namespace: str, name: str) -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "generation": 3},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels, "annotations": {"kept": "yes"}},
                "spec": {"containers": [{"name": "tgi", "image": "tgi:3"}]},
            },
        },
    }


def status_body(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "code": code}


@dataclass
class FakeApiServer:
    """State of the fake API server; `failures` are (status, reason) answered before any success."""

    port: int = 0
    stored: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    failures: list[tuple[int, str]] = field(default_factory=list)

    def answer(self, method: str, path: str, headers: Any, raw: bytes) -> tuple[int, str, dict[str, Any]]:
        self.requests.append({"method": method, "path": path, "headers": dict(headers), "raw": raw})
        if headers.get("Authorization") != f"Bearer {TOKEN}":
            return 401, "Unauthorized", status_body(401, "Unauthorized", "Unauthorized")
        match = PATH.fullmatch(path.split("?")[0])
        if method != "PATCH" or not match:
            return 405, "Method Not Allowed", status_body(405, "MethodNotAllowed", "only PATCH here")
        if headers.get("Content-Type") != "application/strategic-merge-patch+json":
            return 415, "Unsupported Media Type", status_body(415, "UnsupportedMediaType", "bad type")
        if self.failures:
            code, reason = self.failures.pop(0)
            return code, reason, status_body(code, reason, f"injected {code}")
        key = (match[1], match[2])
        if key not in self.stored:
            message = f'deployments.apps "{key[1]}" not found'
            return 404, "Not Found", status_body(404, "NotFound", message)
        patch = json.loads(raw)
        current = self.stored[key]
        meta = current["spec"]["template"]["metadata"]
        new = patch["spec"]["template"]["metadata"]["annotations"]
        if {**meta["annotations"], **new} != meta["annotations"]:
            meta["annotations"].update(new)
            current["metadata"]["generation"] += 1  # as the API server does for a spec change
        return 200, "OK", copy.deepcopy(current)


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    state = FakeApiServer()
    state.stored[("cai", "policy")] = deployment("cai", "policy")

    class Handler(BaseHTTPRequestHandler):
        def _reply(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            code, reason, body = state.answer(self.command, self.path, self.headers, raw)
            data = json.dumps(body).encode()
            self.send_response(code, reason)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_PATCH = do_GET = do_POST = _reply

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def configuration(port: int, token: str = TOKEN) -> client.Configuration:
    return client.Configuration(host=f"http://127.0.0.1:{port}", api_key={"authorization": f"Bearer {token}"})


def rollout(api: FakeApiServer, target: str = "cai/policy", **kwargs: Any) -> DeploymentRollout:
    kwargs.setdefault("backoff_s", 0.01)
    return DeploymentRollout(target, configuration=configuration(api.port), **kwargs)


def test_server_error_then_success_is_retried(api, caplog):
    api.failures = [(500, "Internal Server Error")]
    roller = rollout(api)
    roller.roll("v7", "s3://bucket/policy/v7", SHA, 140)
    assert len(api.requests) == 2
    assert roller.last is not None and roller.last.annotations["cai.dev/policy-version"] == "v7"
    assert "HTTP 500" in caplog.text and "retrying" in caplog.text


def test_throttling_is_retried_and_persistent_errors_give_up(api):
    api.failures = [(429, "Too Many Requests"), (503, "Service Unavailable")]
    roller = rollout(api)
    roller.roll("v7", "s3://bucket/policy/v7", SHA, 140)
    assert roller.last is not None and roller.last.generation == 4
    assert len(api.requests) == 3

    api.requests.clear()
    api.failures = [(503, "Service Unavailable")] * 10
    with pytest.raises(Unavailable) as caught:
        rollout(api, attempts=3).roll("v8", "s3://bucket/policy/v8", SHA, 150)
    assert "cai/policy" in str(caught.value) and "HTTP 503" in str(caught.value)
    assert "3 attempts" in str(caught.value)
    assert len(api.requests) == 3


def test_unreachable_api_server_is_unavailable(api):
    with socket.socket() as s:  # a loopback port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = configuration(port)
    config.retries = 0  # the client's own connection retries: counted here by attempts alone
    roller = DeploymentRollout("cai/policy", configuration=config, attempts=2, backoff_s=0.01)
    with pytest.raises(Unavailable, match=r"cannot roll deployment cai/policy.*127\.0\.0\.1"):
        roller.roll("v7", "s3://bucket/policy/v7", SHA, 140)


@pytest.mark.parametrize(
    "target",
    [
        "policy",
        "",
        "cai/",
        "/policy",
        "cai/policy/x",
        "Cai/policy",
        "cai/Policy",
        "cai/-policy",
        "a" * 64 + "/p",
    ],
)
def test_bad_target_names_the_setting(target):
    with pytest.raises(InvalidArgument, match="rollout_deployment") as caught:
        DeploymentRollout(target, configuration=client.Configuration())
    assert repr(target) in str(caught.value)


def test_good_targets_are_accepted():
    roller = DeploymentRollout("cai-prod/policy.tgi-1", configuration=client.Configuration())
    assert (roller.namespace, roller.name, roller.target) == (
        "cai-prod",
        "policy.tgi-1",
        "cai-prod/policy.tgi-1",
    )


@pytest.mark.parametrize(
    ("version", "uri", "sha256", "step"),
    [("", "s3://x", SHA, 1), ("v1", "", SHA, 1), ("v1", "s3://x", "abc", 1), ("v1", "s3://x", SHA, -1)],
)
def test_bad_version_fields_are_refused_before_any_request(api, version, uri, sha256, step):
    with pytest.raises(InvalidArgument):
        rollout(api).roll(version, uri, sha256, step)
    assert api.requests == []


def test_without_credentials_the_error_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)
    monkeypatch.setattr("kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION", str(tmp_path / "none"))
    with pytest.raises(Unavailable, match="no Kubernetes credentials for rollout_deployment"):
        DeploymentRollout("cai/policy")


def test_import_trainer_rollout_does_not_import_kubernetes():
    code = "import sys, trainer.rollout; print('kubernetes' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
