"""A service's stream stage: consume its input topic, feed the service's engine, produce to its
output topic, at least once.

Order of a record's life, and why:
1. polled, counted in flight for its partition (a partition at `max_in_flight` is paused, so
   memory stays bounded however far behind the stage is);
2. decoded and processed, with retries for transient errors; a record that cannot be decoded or
   processed goes to `<topic>.dlq` with headers saying what went wrong, and counts as done;
3. its outputs are produced (idempotent producer, acks=all) and acknowledged by the broker;
4. only then is it done, and the partition's committed offset moves up to the first record that is
   not done. A crash therefore replays records whose outputs may already exist: their sample ids
   are derived from the input, so consumers drop the duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import Message

from cai.errors import CAIError, InvalidArgument, NotFound, Unavailable
from cai.kafka import records
from cai.kafka.topics import dlq

log = logging.getLogger("cai.stream")

Output = tuple[str, str, Message]  # topic, key, value
Processor = Callable[[Any], Awaitable[list[Output]]]
PERMANENT = (InvalidArgument, NotFound)  # retrying cannot help: dead-letter at once


@dataclass
class StreamSettings:
    bootstrap: str
    group: str
    input_topic: str
    max_in_flight: int = 8  # records per partition between poll and commit
    max_attempts: int = 3
    retry_backoff_s: float = 1.0
    drain_s: float = 30.0  # on shutdown, how long in-flight records get to finish


@dataclass
class _Partition:
    offsets: list[int] = field(default_factory=list)  # polled and not yet committed, in order
    done: set[int] = field(default_factory=set)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    uncommitted: int | None = None  # a commit point not yet accepted by the broker

    def commit_point(self) -> int | None:
        """The offset to commit: one past the longest done run from the oldest polled record."""
        point = None
        while self.offsets and self.offsets[0] in self.done:
            point = self.offsets.pop(0) + 1
            self.done.discard(point - 1)
        return point


class StreamStage:
    def __init__(self, settings: StreamSettings, stage: str, record_type: type[Message], process: Processor):
        self.settings = settings
        self.stage = stage
        self.record_type = record_type
        self.process = process
        self.partitions: dict[Any, _Partition] = {}
        self.counts = {"processed": 0, "dead_lettered": 0, "retried": 0}
        # kafka-python's consumer is not thread-safe: every consumer call runs on this one thread.
        self._consumer_thread = ThreadPoolExecutor(1, thread_name_prefix=f"cai-{stage}-consumer")
        self._consumer: Any = None
        self._producer: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rewind: dict[Any, int] = {}  # revoked partition -> its first abandoned offset

    # ---- lifecycle ---------------------------------------------------------------------------

    async def _on_consumer(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        assert self._loop is not None
        return await self._loop.run_in_executor(self._consumer_thread, lambda: fn(*args, **kwargs))

    def _connect(self) -> None:
        from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer

        s = self.settings
        stage = self

        class Listener(ConsumerRebalanceListener):  # runs inside poll(), on the consumer thread
            def on_partitions_revoked(self, revoked: Any) -> None:
                stage._revoke(revoked)

            def on_partitions_assigned(self, assigned: Any) -> None:
                log.info(
                    "assigned", extra={"fields": {"stage": stage.stage, "partitions": str(sorted(assigned))}}
                )

        self._producer = KafkaProducer(
            bootstrap_servers=s.bootstrap,
            acks="all",
            enable_idempotence=True,
            linger_ms=5,
            client_id=f"cai-{self.stage}",
        )
        self._consumer = KafkaConsumer(
            bootstrap_servers=s.bootstrap,
            group_id=s.group,
            client_id=f"cai-{self.stage}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=s.max_in_flight,
            metadata_max_age_ms=30_000,  # notice added partitions within 30 s
        )
        # The group's assignment uses the leader's metadata: a topic it has not seen yet gets no
        # partitions, and kafka-python only rebalances at its next metadata refresh.
        deadline = time.monotonic() + 30
        while not self._consumer.partitions_for_topic(s.input_topic):
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"kafka: topic {s.input_topic!r} does not exist on {s.bootstrap}; "
                    "create it with `cai topics create`"
                )
            time.sleep(0.5)
        self._consumer.subscribe([s.input_topic], listener=Listener())

    async def run(self, stopping: asyncio.Event) -> None:
        """Consume until `stopping` is set, then drain, commit and close."""
        self._loop = asyncio.get_running_loop()
        await self._on_consumer(self._connect)
        log.info(
            "stream started", extra={"fields": {"stage": self.stage, "topic": self.settings.input_topic}}
        )
        try:
            while not stopping.is_set():
                batch = await self._on_consumer(self._consumer.poll, timeout_ms=200)
                for tp, items in batch.items():
                    part = self.partitions.setdefault(tp, _Partition())
                    for item in items:
                        part.offsets.append(item.offset)
                        task = asyncio.ensure_future(self._handle(tp, item))
                        part.tasks.add(task)
                        task.add_done_callback(part.tasks.discard)
                await self._flow_control()
                await self._commit()
        finally:
            await self._drain()

    async def _drain(self) -> None:
        tasks = [t for part in self.partitions.values() for t in part.tasks]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.settings.drain_s)
            for task in pending:  # abandoned: not done, so not committed; replayed after restart
                task.cancel()
        with contextlib.suppress(Exception):
            await self._commit()
        await self._on_consumer(self._consumer.close, autocommit=False)
        await asyncio.to_thread(self._producer.flush)
        await asyncio.to_thread(self._producer.close)
        self._consumer_thread.shutdown(wait=False)
        log.info("stream stopped", extra={"fields": {"stage": self.stage, **self.counts}})

    def _assign(self, assigned: Any) -> None:
        """On the consumer thread. A partition we keep across a rebalance keeps its fetch position,
        which is past the records abandoned at revocation: move it back to the first of them."""
        for tp in assigned:
            if tp in self._rewind:
                self._consumer.seek(tp, self._rewind[tp])
        self._rewind.clear()
        self._drop_parked(assigned)
        log.info("assigned", extra={"fields": {"stage": self.stage, "partitions": str(sorted(assigned))}})

    # ---- per record --------------------------------------------------------------------------

    async def _handle(self, tp: Any, item: Any) -> None:
        attempt = 0
        while True:
            attempt += 1
            try:
                message = records.decode(self.record_type, item.value, item.headers)
                outputs = await self.process(message)
                await self._produce(outputs)
                self.counts["processed"] += 1
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if isinstance(exc, PERMANENT) or attempt >= self.settings.max_attempts:
                    await self._dead_letter(item, exc, attempt)
                    break
                self.counts["retried"] += 1
                log.warning(
                    "retrying",
                    extra={
                        "fields": {
                            "stage": self.stage,
                            "offset": item.offset,
                            "attempt": attempt,
                            "error": str(exc),
                        }
                    },
                )
                await asyncio.sleep(self.settings.retry_backoff_s * attempt)
        part = self.partitions.get(tp)
        if part is not None:  # None: the partition was revoked meanwhile; its new owner replays it
            part.done.add(item.offset)

    async def _produce(self, outputs: list[Output]) -> None:
        acks = []
        for topic, key, message in outputs:
            value, headers = records.encode(message)
            acks.append(
                self._acked(self._producer.send(topic, key=key.encode(), value=value, headers=headers))
            )
        await asyncio.gather(*acks)

    def _acked(self, sent: Any) -> asyncio.Future[Any]:
        """The broker's acknowledgement of one send, which arrives on the producer's thread."""
        assert self._loop is not None
        loop, acked = self._loop, self._loop.create_future()

        def settle(setter: Callable[[Any], None], value: Any) -> None:
            loop.call_soon_threadsafe(lambda: None if acked.done() else setter(value))

        sent.add_callback(lambda metadata: settle(acked.set_result, metadata))
        sent.add_errback(lambda error: settle(acked.set_exception, error))
        return acked

    async def _dead_letter(self, item: Any, exc: Exception, attempt: int) -> None:
        error = str(exc) if isinstance(exc, CAIError) else f"{type(exc).__name__}: {exc}"
        headers = [
            ("error", error.encode()[:4096]),
            ("stage", self.stage.encode()),
            ("attempt", str(attempt).encode()),
            ("original-topic", item.topic.encode()),
            ("original-partition", str(item.partition).encode()),
            ("original-offset", str(item.offset).encode()),
            *[(k, v) for k, v in (item.headers or []) if k == records.SCHEMA_HEADER],
        ]
        await self._acked(
            self._producer.send(dlq(item.topic), key=item.key, value=item.value, headers=headers)
        )
        self.counts["dead_lettered"] += 1
        log.warning(
            "dead-lettered",
            extra={
                "fields": {
                    "stage": self.stage,
                    "partition": item.partition,
                    "offset": item.offset,
                    "error": error,
                }
            },
        )

    # ---- offsets and flow control -------------------------------------------------------------

    async def _commit(self) -> None:
        from kafka.errors import KafkaError
        from kafka.structs import OffsetAndMetadata

        offsets = {}
        for tp, part in self.partitions.items():
            point = part.commit_point()
            if point is not None:
                part.uncommitted = point
            if part.uncommitted is not None:
                offsets[tp] = OffsetAndMetadata(part.uncommitted, "", -1)
        if not offsets:
            return
        try:
            await self._on_consumer(self._consumer.commit, offsets)
        except KafkaError as exc:  # e.g. the broker restarts: keep the offsets and try again next round
            log.warning("commit failed", extra={"fields": {"stage": self.stage, "error": str(exc)}})
            return
        for tp, committed in offsets.items():
            kept = self.partitions.get(tp)
            if kept is not None and kept.uncommitted == committed.offset:
                kept.uncommitted = None

    async def _flow_control(self) -> None:
        limit = self.settings.max_in_flight
        full = [tp for tp, p in self.partitions.items() if len(p.offsets) - len(p.done) >= limit]
        await self._on_consumer(self._set_paused, full)

    def _set_paused(self, full: list[Any]) -> None:
        paused = self._consumer.paused()
        to_pause = [tp for tp in full if tp not in paused]
        to_resume = [tp for tp in paused if tp not in full]
        if to_pause:
            self._consumer.pause(*to_pause)
        if to_resume:
            self._consumer.resume(*to_resume)
            self._drop_parked(to_resume)

    def _drop_parked(self, partitions: Any) -> None:
        """kafka-python 3.0 parks records it fetched for a paused partition, and it can fail to give
        them back after a resume or a rebalance (its restore waits for a slot that stays taken); it
        then never fetches that partition again. Drop them: the position has not moved past them,
        so they are fetched again."""
        parked = getattr(getattr(self._consumer, "_fetcher", None), "_paused_partition_records", None)
        if isinstance(parked, dict):
            for tp in partitions:
                parked.pop(tp, None)

    def _revoke(self, revoked: Any) -> None:
        """On the consumer thread: commit what is done, abandon the rest (whoever owns the partition
        next replays it)."""
        from kafka.structs import OffsetAndMetadata

        offsets = {}
        self._rewind.clear()
        for tp in revoked:
            part = self.partitions.pop(tp, None)
            if part is None:
                continue
            point = part.commit_point() or part.uncommitted
            if point is not None:
                offsets[tp] = OffsetAndMetadata(point, "", -1)
            if part.offsets:
                self._rewind[tp] = part.offsets[0]
            assert self._loop is not None
            for task in list(part.tasks):
                self._loop.call_soon_threadsafe(task.cancel)
        if offsets:
            with contextlib.suppress(Exception):  # the group may already have moved on
                self._consumer.commit(offsets)
