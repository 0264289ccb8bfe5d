"""`cai serve critique --kafka` whose policy service is not there yet: the process stays up and
NOT_SERVING, its stream stage takes no rollout (nothing dead-lettered, nothing written under a
placeholder model id), and once the policy service answers the revisions flow, each naming the
model that made it."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid

from cai.backends.base import Completion
from cai.backends.fake import FakeBackend
from cai.kafka import records
from cai.kafka.topics import TopicSpec, create_topics, dlq
from cai.records import Prompt, rollout_of
from cai.v1 import records_pb2
from services.client import AsyncClient
from services.server import SERVICE_NAMES, start_service
from tests.kafka.test_stream import push, read_all, wait_for
from tests.reliability.support import NOT_SERVING, SERVING, free_port, policy_settings, wait_status


def rollout(i: int) -> records_pb2.RolloutRecord:
    prompt = Prompt(f"r{i:02d}", f"Explain tides simply, {i}.", "benign", seed=i)
    return rollout_of(
        prompt, [Completion("The moon.", 2, "stop"), Completion("Tides.", 1, "stop")], "fake"
    ).to_proto()


async def test_a_stage_waits_for_its_backend_and_then_names_it(kafka_broker, tmp_path):
    bootstrap = kafka_broker.bootstrap
    prefix = f"r{uuid.uuid4().hex[:8]}."
    create_topics(bootstrap, TopicSpec(partitions=1), prefix=prefix)
    push(
        bootstrap,
        prefix + "rollouts",
        [(f"r{i:02d}".encode(), *records.encode(rollout(i))) for i in range(3)],
    )
    policy_port, port = free_port(), free_port()
    env = {
        **os.environ,
        "CAI_CRITIQUE_PORT": str(port),
        "CAI_CRITIQUE_METRICS_PORT": "0",
        "CAI_CRITIQUE_BACKEND": f"policy:127.0.0.1:{policy_port}",
        "CAI_CRITIQUE_KAFKA": bootstrap,
        "CAI_CRITIQUE_KAFKA_PREFIX": prefix,
        "CAI_CRITIQUE_HEALTH_INTERVAL_S": "0.2",
        "CAI_CRITIQUE_DRAIN_S": "0",
    }
    log = (tmp_path / "critique.log").open("w+")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli.main", "serve", "critique", env=env, stderr=log
    )
    address = f"127.0.0.1:{port}"
    name = SERVICE_NAMES["critique"]
    policy = None
    try:
        async with AsyncClient(address, retries=0) as client:
            await client.wait_ready(timeout=60)
        await wait_status(address, "", SERVING)  # the process is up ...
        await wait_status(address, name, NOT_SERVING, timeout=5)  # ... and not ready
        await asyncio.sleep(2)  # several health checks and would-be polls
        assert not read_all(bootstrap, prefix + "revisions")
        assert not read_all(bootstrap, dlq(prefix + "rollouts"))

        policy = await start_service("policy", policy_settings(port=policy_port), FakeBackend())
        await wait_status(address, name, SERVING)
        revisions = await wait_for(bootstrap, prefix + "revisions", records_pb2.RevisionRecord, 3)
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 60) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        if policy is not None:
            await policy.stop(0)
    assert sorted(r.prompt.prompt_id for r in revisions) == ["r00", "r01", "r02"]
    # the critic is the policy service's model, learnt once it answered
    assert all(list(r.metadata.model_ids)[-1] == "fake" for r in revisions), [
        r.metadata.model_ids for r in revisions
    ]
    assert not read_all(bootstrap, dlq(prefix + "rollouts"))
