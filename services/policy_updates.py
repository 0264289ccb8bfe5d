"""The policy service follows the trainer: every record on the policy-versions topic names an
adapter archive and its sha256; the service fetches it, checks the hash, unpacks it into its
adapter folder and loads it: at the next decode step in process (`TransformersBackend`; running
generations finish on the version they started with), or as a new LoRA adapter on a vLLM server
that reads the same folder (`OpenAIBackend`). From then on its new completions, and the rollouts
of its stream stage, carry the new version.

On start the service loads the newest version already published, and its stream stage waits for
that (`caught_up`), so a restarted replica serves what the others serve. A version that cannot be
fetched, fails its hash or is refused by the engine is logged, counted and tried again with a
growing pause until it loads or a newer one arrives; the service keeps serving the one it has.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
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


RETRY_FIRST_S, RETRY_MAX_S = 1.0, 30.0


class PolicyFollower:
    def __init__(
        self,
        backend: Backend,
        bootstrap: str,
        topic: str,
        cache: Path | None = None,
        on_load: Callable[[str], object] | None = None,
    ):
        self.backend = adapter_backend(backend)
        self.bootstrap = bootstrap
        self.topic = topic
        self._own_cache = cache is None  # a temporary folder of ours, removed when run() ends
        self.cache = cache or Path(tempfile.mkdtemp(prefix="cai-policies-"))
        self._folders: list[Path] = []  # unpacked adapters still on disk, newest last
        self.on_load = on_load  # told "ok" or "failed" for every try (the service's metrics)
        self.loaded: list[PolicyVersion] = []
        self.failed = 0
        self.caught_up = asyncio.Event()  # the newest version published before the start is tried
        self._pending: PolicyVersion | None = None  # the newest version not loaded yet
        self._retry_s = RETRY_FIRST_S
        self._retry_at = 0.0

    async def apply(self, version: PolicyVersion) -> None:
        """Fetch and check the archive off the event loop, then serve it from the next decode step."""
        if version.version == self.backend.policy_version and self.loaded and self.loaded[-1] == version:
            return  # republished by a trainer that resumed: already serving it
        started = time.perf_counter()
        folder = await asyncio.to_thread(fetch_adapter, version, self.cache)
        await self.backend.load_adapter(folder, version.version)
        self.loaded.append(version)
        self._prune(folder)
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

    def _prune(self, newest: Path) -> None:
        """Delete the unpacked adapters the engine will not read again, so a long run's disk stays
        bounded: vLLM reloads its newest `keep_versions` after a restart; the embedded engine
        reads none again, and keeps the newest only."""
        self._folders = [f for f in self._folders if f != newest] + [newest]
        keep = getattr(self.backend, "keep_versions", 1)
        for old in self._folders[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        del self._folders[:-keep]

    async def _try(self, version: PolicyVersion) -> None:
        """Load `version`; on failure keep it pending and try again later (unless a newer one comes)."""
        try:
            await self.apply(version)
        except Exception as exc:  # a bad version must not stop the service: keep the old one
            self.failed += 1
            # A wrong hash or an archive the engine rejects stays wrong; anything else may pass.
            retry = not isinstance(exc, InvalidArgument)
            self._pending = version if retry else None
            self._retry_at = time.monotonic() + self._retry_s
            log.warning(
                "policy version not loaded",
                extra={
                    "fields": {
                        "version": version.version,
                        "error": str(exc),
                        "retry_in_s": self._retry_s if retry else None,
                    }
                },
            )
            if retry:
                self._retry_s = min(self._retry_s * 2, RETRY_MAX_S)
            if self.on_load is not None:
                self.on_load("failed")
            return
        self._pending = None
        self._retry_s = RETRY_FIRST_S
        if self.on_load is not None:
            self.on_load("ok")

    def _consumer(self) -> tuple[Any, dict[int, int]]:
        """A consumer at the newest record of each partition, and each non-empty partition's end."""
        from confluent_kafka import TopicPartition

        # A group is required by librdkafka; assign() never joins it and nothing is committed.
        name = "cai-policy-follower"
        consumer = client.consumer(self.bootstrap, name, name, {"fetch.wait.max.ms": 50})
        metadata = consumer.list_topics(self.topic, timeout=10).topics.get(self.topic)
        if metadata is None or metadata.error is not None:
            raise InvalidArgument(
                f"kafka: topic {self.topic!r} does not exist; create it with `cai topics create`"
            )
        start, ends = [], {}
        for partition in metadata.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(self.topic, partition), timeout=10)
            start.append(TopicPartition(self.topic, partition, max(low, high - 1)))  # the newest one
            if high > low:
                ends[partition] = high
        consumer.assign(start)
        return consumer, ends

    async def run(self, stopping: asyncio.Event) -> None:
        # ends: partition -> its end at the start, until the record before it has been read
        consumer, ends = await asyncio.to_thread(self._consumer)
        try:
            while not stopping.is_set():
                if not ends:
                    self.caught_up.set()
                if self._pending is not None and time.monotonic() >= self._retry_at:
                    await self._try(self._pending)
                message = consumer.poll(0)  # never blocks the event loop
                if message is None:
                    await asyncio.sleep(0.05)
                    continue
                if message.error() is not None:
                    log.warning("kafka", extra={"fields": {"error": str(message.error())}})
                    continue
                if ends.get(message.partition(), 0) <= message.offset() + 1:
                    ends.pop(message.partition(), None)
                try:
                    record = records.decode(
                        records_pb2.PolicyVersionRecord, message.value(), message.headers()
                    )
                    version = PolicyVersion.of_proto(record)
                except Exception as exc:  # not a version record: nothing to retry
                    self.failed += 1
                    log.warning(
                        "policy version record unreadable",
                        extra={"fields": {"offset": message.offset(), "error": str(exc)}},
                    )
                    continue
                await self._try(version)
        finally:
            self.caught_up.set()  # never leave a waiting stream stage behind
            await asyncio.to_thread(consumer.close)
            if self._own_cache:
                shutil.rmtree(self.cache, ignore_errors=True)
