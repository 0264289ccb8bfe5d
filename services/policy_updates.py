"""The policy service follows the trainer: every record on the policy-versions topic names an
adapter archive and its sha256; the service fetches it, checks the hash and loads it at the
next decode step (`TransformersBackend.load_adapter`; running generations finish on the version
they started with). From then on its new completions, and the rollouts of its stream stage,
carry the new version.

On start the service loads the newest version already published, so a restarted replica serves
what the others serve. A version that cannot be fetched or fails its hash is logged and skipped:
the service keeps serving the one it has.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from cai.backends.base import Backend
from cai.errors import InvalidArgument
from cai.kafka import client, records
from cai.policy_versions import fetch_adapter
from cai.records import PolicyVersion
from cai.v1 import records_pb2

log = logging.getLogger("cai.policy_updates")


def adapter_backend(backend: Backend) -> Any:
    """The backend that can load adapters (under the metrics wrapper), or InvalidArgument."""
    inner = getattr(backend, "inner", backend)
    if not hasattr(inner, "load_adapter"):
        raise InvalidArgument(
            f"backend: the {inner.kind} backend cannot load new policy versions; set "
            "follow_policy_versions to false and roll the Deployment from the trainer instead "
            "(rollout_deployment)"
        )
    return inner


class PolicyFollower:
    def __init__(self, backend: Backend, bootstrap: str, topic: str, cache: Path | None = None):
        self.backend = adapter_backend(backend)
        self.bootstrap = bootstrap
        self.topic = topic
        self.cache = cache or Path(tempfile.mkdtemp(prefix="cai-policies-"))
        self.loaded: list[PolicyVersion] = []
        self.failed = 0

    async def apply(self, version: PolicyVersion) -> None:
        """Fetch and check the archive off the event loop, then serve it from the next decode step."""
        if version.version == self.backend.policy_version and self.loaded and self.loaded[-1] == version:
            return  # republished by a trainer that resumed: already serving it
        started = time.perf_counter()
        folder = await asyncio.to_thread(fetch_adapter, version, self.cache)
        await self.backend.load_adapter(folder, version.version)
        self.loaded.append(version)
        log.info(
            "policy version loaded",
            extra={
                "fields": {
                    "version": version.version,
                    "step": version.step,
                    "seconds": round(time.perf_counter() - started, 3),
                }
            },
        )

    def _consumer(self) -> Any:
        from confluent_kafka import TopicPartition

        # A group is required by librdkafka; assign() never joins it and nothing is committed.
        name = "cai-policy-follower"
        consumer = client.consumer(self.bootstrap, name, name, {"fetch.wait.max.ms": 50})
        metadata = consumer.list_topics(self.topic, timeout=10).topics.get(self.topic)
        if metadata is None or metadata.error is not None:
            raise InvalidArgument(
                f"kafka: topic {self.topic!r} does not exist; create it with `cai topics create`"
            )
        start = []
        for partition in metadata.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(self.topic, partition), timeout=10)
            start.append(TopicPartition(self.topic, partition, max(low, high - 1)))  # the newest one
        consumer.assign(start)
        return consumer

    async def run(self, stopping: asyncio.Event) -> None:
        consumer = await asyncio.to_thread(self._consumer)
        try:
            while not stopping.is_set():
                message = consumer.poll(0)  # never blocks the event loop
                if message is None:
                    await asyncio.sleep(0.05)
                    continue
                if message.error() is not None:
                    log.warning("kafka", extra={"fields": {"error": str(message.error())}})
                    continue
                try:
                    record = records.decode(
                        records_pb2.PolicyVersionRecord, message.value(), message.headers()
                    )
                    await self.apply(PolicyVersion.of_proto(record))
                except Exception as exc:  # a bad version must not stop the service: keep the old one
                    self.failed += 1
                    log.warning(
                        "policy version not loaded",
                        extra={"fields": {"offset": message.offset(), "error": str(exc)}},
                    )
        finally:
            await asyncio.to_thread(consumer.close)
