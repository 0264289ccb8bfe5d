"""A service's stream stage: consume its input topic, feed the service's engine, produce to its
output topic, at least once.

Order of a record's life, and why:
1. polled and queued for its partition, which processes `max_in_flight` records at once; a
   partition with as many more waiting is paused, so memory stays bounded however far behind the
   stage is;
2. decoded and processed, with retries; a record that cannot be decoded or processed goes to
   `<topic>.dlq` with headers saying what went wrong, and counts as done. An error that is not
   the record's fault (the backend unavailable or its queue full, the broker not taking the
   output) is retried until it passes, however long that takes, never dead-lettered: a valid
   record waits out an outage instead of being lost to the dead-letter topic;
3. its outputs are produced (idempotent producer, acks=all) and acknowledged by the broker;
4. only then is it done, and the partition's committed offset moves up to the first record that is
   not done. A crash therefore replays records whose outputs may already exist: their sample ids
   are derived from the input, so consumers drop the duplicates.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from google.protobuf.message import Message
from prometheus_client import CollectorRegistry, Counter, Gauge

from cai.errors import CAIError, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from cai.kafka import client, records
from cai.kafka.topics import dlq

log = logging.getLogger("cai.stream")

Output = tuple[str, str, Message]  # topic, key, value
Processor = Callable[[Any], Awaitable[list[Output]]]
PERMANENT = (InvalidArgument, NotFound)  # retrying cannot help: dead-letter at once
MAX_BACKOFF_S = 30.0  # the longest pause between two tries of one record


def transient(exc: Exception) -> bool:
    """Not the record's fault, so retried without limit: the backend is unavailable or busy, or
    the broker did not take the output (a record too large for it excepted)."""
    if isinstance(exc, (Unavailable, ResourceExhausted)):
        return True
    if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
        return exc.args[0].code() != KafkaError.MSG_SIZE_TOO_LARGE and not exc.args[0].fatal()
    return False


class StreamMetrics:
    """A stage's Prometheus series, labelled by stage like `cai pipeline status`."""

    def __init__(self, registry: CollectorRegistry):
        self.records = Counter(
            "cai_stream_records",
            "input records by outcome: processed, dead_lettered or retried",
            ["stage", "outcome"],
            registry=registry,
        )
        self.lag = Gauge(
            "cai_stream_lag",
            "records from the oldest one not done to the end of the partition",
            ["stage", "topic", "partition"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "cai_stream_in_flight", "records polled and not yet done", ["stage"], registry=registry
        )


@dataclass
class StreamSettings:
    bootstrap: str
    group: str
    input_topic: str
    max_in_flight: int = 8  # records per partition processed at once (as many more wait their turn)
    max_attempts: int = 3  # tries of a record that keeps failing for a reason of its own
    retry_backoff_s: float = 1.0
    drain_s: float = 30.0  # on shutdown, how long in-flight records get to finish
    commit_interval_s: float = 0.5  # a crash replays at most about this long's worth of done records


Key = tuple[str, int]  # topic, partition
Record = Any  # a consumed confluent_kafka.Message: its stubs type every field as optional


@dataclass
class _Partition:
    slots: asyncio.Semaphore  # records of this partition being processed at once
    offsets: list[int] = field(default_factory=list)  # polled and not yet committed, in order
    done: set[int] = field(default_factory=set)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    uncommitted: int | None = None  # a commit point not yet accepted by the broker
    next_offset: int | None = None  # one past the newest polled record

    def commit_point(self) -> int | None:
        """The offset to commit: one past the longest done run from the oldest polled record."""
        point = None
        while self.offsets and self.offsets[0] in self.done:
            point = self.offsets.pop(0) + 1
            self.done.discard(point - 1)
        return point


class StreamStage:
    """All Kafka calls happen on the event loop's thread and never block it for long: consume()
    and poll() are called with no timeout, and librdkafka serves its callbacks (rebalances,
    deliveries, commits, logs) inside them. Threads would fight over the GIL for every message."""

    def __init__(
        self,
        settings: StreamSettings,
        stage: str,
        record_type: type[Message],
        process: Processor,
        metrics: StreamMetrics | None = None,
    ):
        self.settings = settings
        self.stage = stage
        self.record_type = record_type
        self.process = process
        self.metrics = metrics
        self.partitions: dict[Key, _Partition] = {}
        self.counts = {"processed": 0, "dead_lettered": 0, "retried": 0}
        self._consumer: Any = None
        self._producer: Any = None
        self._paused: set[Key] = set()
        self._committing = False

    # ---- lifecycle ---------------------------------------------------------------------------

    def _connect(self) -> None:
        """In a worker thread: the only blocking calls (creating the clients, waiting for the topic)."""
        s = self.settings
        name = f"cai-{self.stage}"
        self._producer = client.producer(s.bootstrap, name, {"linger.ms": 5, "error_cb": self._client_error})
        self._consumer = client.consumer(
            s.bootstrap,
            name,
            s.group,
            {
                "error_cb": self._client_error,
                # A resumed partition waits for the next fetch request: keep long-polls short.
                "fetch.wait.max.ms": 50,
                "on_commit": self._committed,
            },
        )
        # A group formed before the broker knows the topic assigns nothing: wait for it.
        deadline = time.monotonic() + 30
        while True:
            topic = self._consumer.list_topics(s.input_topic, timeout=10).topics.get(s.input_topic)
            if topic is not None and topic.error is None and topic.partitions:
                break
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"kafka: topic {s.input_topic!r} does not exist on {s.bootstrap}; "
                    "create it with `cai topics create`"
                )
            time.sleep(0.5)
        self._consumer.subscribe([s.input_topic], on_assign=self._on_assign, on_revoke=self._on_revoke)

    def _client_error(self, error: KafkaError) -> None:
        # librdkafka retries connection errors itself (a broker restart shows up here): log them.
        log.warning("kafka client error", extra={"fields": {"stage": self.stage, "error": str(error)}})

    async def run(self, stopping: asyncio.Event) -> None:
        """Consume until `stopping` is set, then drain, commit and close."""
        await asyncio.to_thread(self._connect)
        log.info(
            "stream started", extra={"fields": {"stage": self.stage, "topic": self.settings.input_topic}}
        )
        last_commit, idle_s = time.monotonic(), 0.0
        try:
            while not stopping.is_set():
                events = self._producer.poll(0) + self._take(
                    self._consumer.consume(self.settings.max_in_flight, 0)
                )
                if time.monotonic() - last_commit >= self.settings.commit_interval_s:
                    last_commit = time.monotonic()
                    self._commit()
                    self._report_lag()
                # Nothing happened: wait a little longer each time, up to 5 ms while records are
                # in flight (their acks arrive through poll()) and 50 ms when the stage is idle.
                busy = any(p.tasks for p in self.partitions.values())
                idle_s = 0.0 if events else min(max(idle_s * 2, 0.0005), 0.005 if busy else 0.05)
                await asyncio.sleep(idle_s)
        finally:
            await self._drain()

    def _take(self, batch: list[Record]) -> int:
        """Start a task per consumed record, then pause the partitions that are full."""
        for item in batch:
            if item.error() is not None:
                log.warning(
                    "consume error", extra={"fields": {"stage": self.stage, "error": str(item.error())}}
                )
                continue
            key = (item.topic(), item.partition())
            part = self.partitions.get(key)
            if part is None:
                part = self.partitions[key] = _Partition(asyncio.Semaphore(self.settings.max_in_flight))
            part.offsets.append(item.offset())
            part.next_offset = item.offset() + 1
            task = asyncio.ensure_future(self._handle(key, part, item))
            part.tasks.add(task)
            task.add_done_callback(part.tasks.discard)
        for key in {(item.topic(), item.partition()) for item in batch}:
            self._flow_control(key)
        return len(batch)

    def _flow_control(self, key: Key) -> None:
        """`max_in_flight` records of a partition are processed at once and as many more wait
        their turn: the partition is paused when that queue is full and resumed when it is empty.
        (librdkafka drops what it prefetched for a paused partition and fetches it again after the
        resume; the waiting records keep the stage busy meanwhile.)"""
        part = self.partitions.get(key)
        held = len(part.offsets) - len(part.done) if part is not None else 0
        limit = self.settings.max_in_flight
        if held >= 2 * limit and key not in self._paused:
            self._consumer.pause([TopicPartition(*key)])
            self._paused.add(key)
        elif held <= limit and key in self._paused:
            self._consumer.resume([TopicPartition(*key)])
            self._paused.discard(key)

    async def _drain(self) -> None:
        tasks = [t for part in self.partitions.values() for t in part.tasks]
        if tasks:
            deadline = time.monotonic() + self.settings.drain_s
            while any(not t.done() for t in tasks) and time.monotonic() < deadline:
                self._producer.poll(0)  # their acks come through here
                await asyncio.sleep(0.005)
            for task in tasks:  # abandoned: not done, so not committed; replayed after restart
                task.cancel()
        self._commit()
        self._consumer.close()  # revokes the partitions: commits synchronously what is done
        await asyncio.to_thread(self._producer.flush, self.settings.drain_s)
        log.info("stream stopped", extra={"fields": {"stage": self.stage, **self.counts}})

    # ---- rebalances (librdkafka calls these inside consume() or close()) ----------------------

    def _on_assign(self, consumer: Consumer, assigned: list[TopicPartition]) -> None:
        # Eager rebalancing: every partition was revoked first, and each assigned one starts
        # from its committed offset, so nothing abandoned at revocation is skipped.
        consumer.assign(assigned)
        log.info(
            "assigned",
            extra={"fields": {"stage": self.stage, "partitions": sorted(tp.partition for tp in assigned)}},
        )

    def _on_revoke(self, consumer: Consumer, revoked: list[TopicPartition]) -> None:
        """Commit what is done, abandon the rest (whoever owns the partition next replays it)."""
        offsets = []
        for tp in revoked:
            key = (tp.topic, tp.partition)
            part = self.partitions.pop(key, None)
            if key in self._paused:  # pausing is ours to undo: the next owner may be us
                consumer.resume([TopicPartition(*key)])
                self._paused.discard(key)
            if part is None:
                continue
            for task in part.tasks:
                task.cancel()
            point = part.commit_point() or part.uncommitted
            if point is not None:
                offsets.append(TopicPartition(*key, point))
        if offsets:
            try:
                consumer.commit(offsets=offsets, asynchronous=False)
            except KafkaException as exc:  # the group may already have moved on: replayed later
                log.warning(
                    "commit on revoke failed", extra={"fields": {"stage": self.stage, "error": str(exc)}}
                )

    # ---- per record --------------------------------------------------------------------------

    async def _handle(self, key: Key, part: _Partition, item: Record) -> None:
        async with part.slots:
            await self._process(item)
        if self.partitions.get(key) is part:  # else revoked meanwhile: its next owner replays it
            part.done.add(item.offset())
            self._flow_control(key)

    async def _process(self, item: Record) -> None:
        """Decode, process and produce one record, with retries; or dead-letter it."""
        attempt = 0
        while True:
            attempt += 1
            try:
                message = records.decode(self.record_type, item.value(), item.headers())
                outputs = await self.process(message)
                await self._produce(outputs)
                self._count("processed")
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if isinstance(exc, PERMANENT) or (
                    attempt >= self.settings.max_attempts and not transient(exc)
                ):
                    await self._dead_letter(item, exc, attempt)
                    break
                self._count("retried")
                log.warning(
                    "retrying",
                    extra={
                        "fields": {
                            "stage": self.stage,
                            "offset": item.offset(),
                            "attempt": attempt,
                            "error": str(exc),
                        }
                    },
                )
                await asyncio.sleep(min(self.settings.retry_backoff_s * attempt, MAX_BACKOFF_S))

    def _count(self, outcome: str) -> None:
        self.counts[outcome] += 1
        if self.metrics is not None:
            self.metrics.records.labels(self.stage, outcome).inc()

    async def _produce(self, outputs: list[Output]) -> None:
        acks = []
        for topic, key, message in outputs:
            value, headers = records.encode(message)
            acks.append(self._send(topic, key.encode(), value, headers))
        await asyncio.gather(*acks)

    async def _send(self, topic: str, key: bytes | None, value: bytes | None, headers: Any) -> None:
        """Produce one record and wait for the broker's acknowledgement."""
        acked = asyncio.get_running_loop().create_future()

        def delivered(error: KafkaError | None, _: Record) -> None:  # inside poll()
            if acked.done():
                return
            if error is None:
                acked.set_result(None)
            else:
                acked.set_exception(KafkaException(error))

        while True:
            try:
                self._producer.produce(topic, value=value, key=key, headers=headers, on_delivery=delivered)
                break
            except BufferError:  # the local queue is full: let deliveries drain it
                await asyncio.sleep(0.05)
        await acked

    async def _dead_letter(self, item: Record, exc: Exception, attempt: int) -> None:
        error = str(exc) if isinstance(exc, CAIError) else f"{type(exc).__name__}: {exc}"
        headers = [
            ("error", error.encode()[:4096]),
            ("stage", self.stage.encode()),
            ("attempt", str(attempt).encode()),
            ("original-topic", item.topic().encode()),
            ("original-partition", str(item.partition()).encode()),
            ("original-offset", str(item.offset()).encode()),
            *[(k, v) for k, v in (item.headers() or []) if k == records.SCHEMA_HEADER],
        ]
        await self._send(dlq(item.topic()), item.key(), item.value(), headers)
        self._count("dead_lettered")
        log.warning(
            "dead-lettered",
            extra={
                "fields": {
                    "stage": self.stage,
                    "partition": item.partition(),
                    "offset": item.offset(),
                    "error": error,
                }
            },
        )

    # ---- offsets -------------------------------------------------------------------------------

    def _commit(self) -> None:
        """Commit, asynchronously, each partition's done run; `_committed` hears the answer."""
        if self._committing:  # one commit at a time, so answers cannot arrive out of order
            return
        offsets = []
        for key, part in self.partitions.items():
            point = part.commit_point()
            if point is not None:
                part.uncommitted = point
            if part.uncommitted is not None:
                offsets.append(TopicPartition(*key, part.uncommitted))
        if offsets:
            self._committing = True
            try:
                self._consumer.commit(offsets=offsets, asynchronous=True)
            except KafkaException as exc:
                self._committing = False
                log.warning("commit failed", extra={"fields": {"stage": self.stage, "error": str(exc)}})

    def _committed(self, error: KafkaError | None, offsets: list[TopicPartition]) -> None:
        """librdkafka's answer to a commit. A failed one (e.g. while the broker restarts) keeps its
        offsets, and the next round tries again."""
        self._committing = False
        if error is not None:
            log.warning("commit failed", extra={"fields": {"stage": self.stage, "error": str(error)}})
            return
        for tp in offsets:
            kept = self.partitions.get((tp.topic, tp.partition))
            if tp.error is None and kept is not None and kept.uncommitted == tp.offset:
                kept.uncommitted = None

    def _report_lag(self) -> None:
        """Prometheus: records behind the end of each partition, counted from the oldest one not
        done yet (what a restart would replay)."""
        if self.metrics is None:
            return
        in_flight = 0
        for (topic, partition), part in self.partitions.items():
            # cached: the end offset the last fetch response reported, no request to the broker
            _, high = self._consumer.get_watermark_offsets(TopicPartition(topic, partition), cached=True)
            start = part.offsets[0] if part.offsets else part.next_offset
            if high >= 0 and start is not None:
                self.metrics.lag.labels(self.stage, topic, str(partition)).set(max(0, high - start))
            in_flight += len(part.offsets) - len(part.done)
        self.metrics.in_flight.labels(self.stage).set(in_flight)
