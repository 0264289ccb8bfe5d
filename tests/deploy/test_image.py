"""The image, built from the Dockerfile and run with no network.

`make image` builds it (deploy/image/image.py: a private Docker engine where none runs, a Debian
base from debootstrap where no registry can be reached, the default model baked in); the fixture
builds it if it is missing. Each container runs with `--network=none` and a read-only root
filesystem, as the manifests run it (readOnlyRootFilesystem, uid 10001, writable /tmp and cache).
"""

from __future__ import annotations

import importlib.util
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]

# The first run may build the image (10-20 minutes on two cores).
pytestmark = pytest.mark.timeout(2400)


def _load_image_module() -> Any:
    path = REPO / "deploy" / "image" / "image.py"
    spec = importlib.util.spec_from_file_location("cai_image", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


image_module = _load_image_module()
IMAGE = image_module.IMAGE
# As the pods mount them: the root filesystem read-only, these writable.
RUN = [
    "run",
    "--rm",
    "--network=none",
    "--read-only",
    "--tmpfs",
    "/tmp",
    "--tmpfs",
    "/var/cache/cai:uid=10001",
]

HEALTH = """
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
channel = grpc.insecure_channel("127.0.0.1:50051")
answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
print(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))
"""


@pytest.fixture(scope="module")
def engine() -> Iterator[Any]:
    engine = image_module.Engine()
    try:
        engine.start()
    except image_module.ImageError as e:
        pytest.skip(f"no Docker engine can run here: {e}")
    try:
        if not engine.has_image(IMAGE):
            image_module.build(engine)
        yield engine
    finally:
        engine.stop()


def test_cai_help_runs_as_the_non_root_user(engine):
    assert engine.docker("image", "inspect", "-f", "{{.Config.User}}", IMAGE).stdout.strip() == "10001:10001"
    help_text = engine.docker(*RUN, IMAGE, "--help").stdout
    assert "serve" in help_text and "train" in help_text
    ids = engine.docker(*RUN, "--entrypoint", "id", IMAGE).stdout
    assert ids.startswith("uid=10001") and "gid=10001" in ids


def test_the_root_filesystem_stays_read_only(engine):
    result = engine.docker(*RUN, "--entrypoint", "sh", IMAGE, "-c", "touch /opt/venv/x", check=False)
    assert result.returncode != 0
    assert "Read-only file system" in result.stderr
    # The writable places the pods mount are enough to import the stack.
    engine.docker(*RUN, "--entrypoint", "python", IMAGE, "-c", "import cai, services, trainer")


def test_the_policy_service_is_healthy_on_the_baked_in_model(engine):
    name = f"cai-policy-{uuid.uuid4().hex[:8]}"
    run = [a for a in RUN if a != "--rm"]
    engine.docker(*run, "-d", "--name", name, "-e", "CAI_POLICY_HOST=127.0.0.1", IMAGE, "serve", "policy")
    try:
        deadline = time.monotonic() + 300
        status = ""
        while time.monotonic() < deadline:
            state = engine.docker("inspect", "-f", "{{.State.Running}}", name).stdout.strip()
            assert state == "true", (
                f"the policy container exited:\n{engine.docker('logs', name).stderr[-3000:]}"
            )
            result = engine.docker("exec", name, "python", "-c", HEALTH, check=False)
            status = result.stdout.strip()
            if status == "SERVING":
                break
            time.sleep(2)
        logs = engine.docker("logs", name, check=False)
        assert status == "SERVING", (
            f"no SERVING within 300 s ({status}):\n{(logs.stdout + logs.stderr)[-3000:]}"
        )
        # SIGTERM drains and exits cleanly, as a pod's termination does.
        engine.docker("stop", "-t", "60", name, timeout_s=90)
        assert engine.docker("inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip() == "0"
    finally:
        engine.docker("rm", "-f", name, check=False)
