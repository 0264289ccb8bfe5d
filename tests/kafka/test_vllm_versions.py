"""The online loop's serving path on vLLM, end to end on a real broker: the trainer's policy
versions reach `cai serve policy --backend openai:URL` through the policy-versions topic, and every
rollout of its stream stage says which version produced it.

vLLM cannot run here (no GPU): `benchmarks.vllm_standin.VLLMStandIn` stands in for it (vLLM's
adapter routes, status codes and error bodies; its text names the adapter that produced it, which
is how this test checks each rollout's version against what really served it). The archives are
real policy archives (tar + sha256, fetched from the trainer's HTTP archive server); the stand-in
reads only their adapter_config.json.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import pytest

from benchmarks.vllm_standin import VLLMStandIn
from cai.kafka.topics import TopicSpec, create_topics
from cai.policy_versions import ADAPTER_FILES, KafkaPublisher, PolicyServer, version_index
from cai.records import PolicyVersion
from cai.v1 import records_pb2
from services.server import start_service
from tests.kafka.test_stream import prompt, push_prompts, scrape, settings, wait_for
from tests.reliability.support import free_port

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve()


def archive(folder: Path, version: str) -> tuple[str, str]:
    """A policy archive as the trainer writes it: the name and its sha256."""
    import hashlib

    buffer = io.BytesIO()
    contents = {
        ADAPTER_FILES[0]: json.dumps({"peft_type": "LORA", "r": 8}).encode(),
        ADAPTER_FILES[1]: f"weights of {version}".encode(),
    }
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in contents.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (folder / f"{version}.tar").write_bytes(buffer.getvalue())
    return f"{version}.tar", hashlib.sha256(buffer.getvalue()).hexdigest()


async def until(check, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def test_rollouts_carry_the_vllm_adapter_that_served_them(kafka_broker, tmp_path):
    bootstrap = kafka_broker.bootstrap
    prefix = f"t{uuid.uuid4().hex[:8]}."
    create_topics(bootstrap, TopicSpec(partitions=1), prefix=prefix)
    archives = tmp_path / "archives"
    archives.mkdir()
    files = PolicyServer(archives, 0, host="127.0.0.1")  # the trainer's archive server
    publisher = KafkaPublisher(bootstrap, prefix + "policy-versions")

    def publish(version: str) -> None:
        name, sha256 = archive(archives, version)
        uri = f"http://127.0.0.1:{files.port}/{name}"
        publisher.publish(PolicyVersion(version, uri, sha256, 10 * version_index(version)))

    metrics_port = free_port()
    vllm = VLLMStandIn(delay_s=0.02)
    publish("v1")  # before the service starts: it must catch up before its first rollout
    service = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "serve", "policy", "--port", "0"],
        env={
            **os.environ,
            "PYTHONPATH": str(HERE.parents[2]),
            "CAI_POLICY_BACKEND": f"openai:{vllm.url}",
            "CAI_POLICY_METRICS_PORT": str(metrics_port),
            "CAI_POLICY_KAFKA": bootstrap,
            "CAI_POLICY_KAFKA_PREFIX": prefix,
            "CAI_POLICY_ADAPTER_DIR": str(tmp_path / "adapters"),  # shared with "vLLM"
            "CAI_POLICY_LOADED_VERSIONS": "2",
            "CAI_POLICY_RESPONSES_PER_PROMPT": "2",
            "CAI_POLICY_RESPONSE_MAX_NEW_TOKENS": "8",
            "CAI_POLICY_HEALTH_INTERVAL_S": "0.5",
        },
    )
    rollouts: list[records_pb2.RolloutRecord] = []
    served_while: dict[str, str] = {}  # prompt id -> the newest version loaded when it was sent

    async def batch(first: int, newest: str) -> None:
        ids = range(first, first + 4)
        served_while.update({f"p{i:03d}": newest for i in ids})
        push_prompts(bootstrap, prefix, [prompt(i) for i in ids])
        found = await wait_for(bootstrap, prefix + "rollouts", records_pb2.RolloutRecord, first + 4)
        rollouts[:] = found

    try:
        await batch(0, "v1")
        publish("v2")
        await until(lambda: "policy-v2" in vllm.adapters, "v2 to be loaded on the server")
        await batch(4, "v2")
        vllm.fail_next_loads(1000)  # the engine refuses v3 (say, out of memory) ...
        publish("v3")
        await until(lambda: vllm.loads.count("policy-v3") >= 2, "the failed load to be tried again")
        await batch(8, "v2")  # ... and v2 keeps serving meanwhile
        vllm.fail_next_loads(0)  # the next try loads it
        await until(lambda: "policy-v3" in vllm.adapters, "v3 to be loaded on a later try", timeout=90)
        vllm.restart()  # vLLM restarts and forgets its adapters; the service brings them back
        await until(lambda: "policy-v3" in vllm.adapters, "the restarted server to be re-synced")
        await batch(12, "v3")
        metrics = scrape(metrics_port)
        # critique and judge on the same engine name its base model, whatever the policy serves
        served_before = len(vllm.served)
        stopping = asyncio.Event()
        feedback = []
        for name in ("critique", "judge"):
            s = settings(name, bootstrap, prefix, backend=f"openai:{vllm.url}")
            running = await start_service(name, s)
            feedback.append((running, asyncio.ensure_future(running.stream(s).run(stopping))))
        try:
            revisions = await wait_for(bootstrap, prefix + "revisions", records_pb2.RevisionRecord, 16)
            preferences = await wait_for(bootstrap, prefix + "preferences", records_pb2.PreferenceRecord, 16)
        finally:
            stopping.set()
            for running, task in feedback:
                await task
                await running.stop(0)
    finally:
        service.send_signal(signal.SIGTERM)
        code = service.wait(60)
        vllm.close()
        files.close()
        publisher.close()
    assert code == 0
    assert len(rollouts) == 16
    for rollout in rollouts:
        version = rollout.metadata.policy_version
        # the version the record names is the adapter that produced every one of its responses
        assert all(f"(policy-{version})" in text for text in rollout.responses), (version, rollout.responses)
        assert version == served_while[rollout.prompt.prompt_id]
    # no rollout of the base model (caught up first), none on a version the server did not load
    assert {r.metadata.policy_version for r in rollouts} == {"v1", "v2", "v3"}
    # a window of two versions: v1 unloaded once v3 was in
    assert list(vllm.adapters) == ["policy-v2", "policy-v3"] and "policy-v1" in vllm.unloads
    # and its files deleted: the adapter folder holds what a restarted server would reload
    assert sorted(f.name.split("-")[0] for f in (tmp_path / "adapters").iterdir()) == ["v2", "v3"]
    assert 'cai_policy_version_loads_total{outcome="ok",service="policy"} 3.0' in metrics
    assert 'cai_policy_version_loads_total{outcome="failed",service="policy"}' in metrics
    # the feedback records name the base model after the policy's: never the policy's adapter
    for record in [*revisions, *preferences]:
        assert list(record.metadata.model_ids)[1:] == ["base-model"], record.metadata.model_ids
    assert set(vllm.served[served_before:]) == {"base-model"}
