"""Stream sources: samples from the revisions or preferences topic (`KafkaSource`), or from a
queue in this process (`MemorySource`, fed by `cai up --train-steps`).

Exactly once across crashes: the Kafka source does not rely on the consumer group's committed
offsets. Its state, the next offset of every partition counting only the records handed to the
trainer, is written into each checkpoint together with the weights, and a restarted trainer
assigns itself the partitions at exactly those offsets. Records after the checkpoint are read
again, the steps they made are trained again; none is lost and none counts twice. The group's
offsets are committed after each checkpoint for monitoring only (lag, KEDA).
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from typing import Any

from cai.errors import CAIError, InvalidArgument, Unavailable
from cai.kafka import records
from cai.kafka.topics import dlq, kafka_failure
from cai.records import Preference, Revision, TrainingSample
from cai.v1 import records_pb2

log = logging.getLogger("cai.trainer")

POLL_S = 0.2  # how often a waiting source looks at its stop condition


class KafkaSource:
    epoch = 0  # a stream has no epochs
    size: int | None = None  # nor an end

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        group: str,
        idle_timeout_s: float | None,
        should_stop: Callable[[], bool],
    ):
        from cai.kafka import client

        self.bootstrap = bootstrap
        self.topic = topic
        self.record_type: type[records_pb2.RevisionRecord] | type[records_pb2.PreferenceRecord] = (
            records_pb2.RevisionRecord if topic.endswith("revisions") else records_pb2.PreferenceRecord
        )
        self.idle_timeout_s = idle_timeout_s
        self.should_stop = should_stop
        self.offsets: dict[int, int] = {}  # partition -> next offset to hand out
        self.dead_lettered = 0
        # The group's offsets are for monitoring only: the partitions are assigned, not subscribed.
        self.consumer: Any = client.consumer(bootstrap, "cai-trainer", group)
        self.producer: Any = client.producer(bootstrap, "cai-trainer")  # dead letters
        self.partitions = self._partitions()
        self._assigned = False

    def _partitions(self) -> list[int]:
        deadline = time.monotonic() + 30
        while True:
            try:
                found = self.consumer.list_topics(self.topic, timeout=10).topics.get(self.topic)
            except Exception as exc:  # confluent-kafka raises KafkaException with a KafkaError
                raise kafka_failure(self.bootstrap, exc) from exc
            if found is not None and found.error is None and found.partitions:
                return sorted(found.partitions)
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"kafka: topic {self.topic!r} does not exist on {self.bootstrap}; "
                    "create it with `cai topics create`"
                )
            time.sleep(0.5)

    def _assign(self) -> None:
        from confluent_kafka import OFFSET_BEGINNING, TopicPartition

        self.consumer.assign(
            [TopicPartition(self.topic, p, self.offsets.get(p, OFFSET_BEGINNING)) for p in self.partitions]
        )
        self._assigned = True

    def next(self) -> TrainingSample | None:
        if not self._assigned:
            self._assign()
        idle_since = time.monotonic()
        while not self.should_stop():
            message = self.consumer.poll(POLL_S)
            if message is None:
                if self.idle_timeout_s is not None and time.monotonic() - idle_since > self.idle_timeout_s:
                    return None
                continue
            if message.error() is not None:
                log.warning("kafka: %s", message.error())
                continue
            where = f"{message.topic()}[{message.partition()}]@{message.offset()}"
            # A revision record is an sft sample (prompt -> final); a preference record a dpo pair.
            value, headers = message.value(), message.headers()
            record: Revision | Preference
            try:
                if self.record_type is records_pb2.RevisionRecord:
                    record = Revision.of_proto(records.decode(records_pb2.RevisionRecord, value, headers))
                else:
                    record = Preference.of_proto(records.decode(records_pb2.PreferenceRecord, value, headers))
                sample: TrainingSample | None = TrainingSample.of(record, where)
            except Exception as exc:  # a record that cannot be read must not stop training for good
                self._dead_letter(message, exc)
                sample = None
            # Handed out (or dead-lettered): the checkpoint after this step resumes past it.
            self.offsets[message.partition()] = message.offset() + 1
            if sample is not None:
                return sample
        return None

    def _dead_letter(self, message: Any, exc: Exception) -> None:
        """A record the trainer cannot read goes to `<topic>.dlq`, written before its offset moves.
        Any error counts, not only the record model's own: a restarted trainer would meet the same
        record at the same offset again and again."""
        error = str(exc) if isinstance(exc, CAIError) else f"{type(exc).__name__}: {exc}"
        headers = [
            ("error", error.encode()[:4096]),
            ("stage", b"trainer"),
            ("original-topic", message.topic().encode()),
            ("original-partition", str(message.partition()).encode()),
            ("original-offset", str(message.offset()).encode()),
        ]
        self.producer.produce(dlq(self.topic), value=message.value(), key=message.key(), headers=headers)
        if self.producer.flush(30) > 0:
            raise Unavailable(f"kafka: could not write to {dlq(self.topic)} on {self.bootstrap}")
        self.dead_lettered += 1
        where = f"{message.topic()}[{message.partition()}]@{message.offset()}"
        log.warning("dead-lettered %s: %s", where, exc)

    def state(self) -> dict[str, Any]:
        return {"kind": "kafka", "topic": self.topic, "offsets": {str(p): o for p, o in self.offsets.items()}}

    def restore(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "kafka" or state.get("topic") != self.topic:
            raise InvalidArgument(
                f"checkpoint: its source state {state} is not topic {self.topic!r}; "
                "use a new output_dir to train on another source"
            )
        self.offsets = {int(p): int(o) for p, o in state["offsets"].items()}
        if self._assigned:
            self._assign()

    def committed(self) -> None:
        """After a checkpoint: tell the consumer group how far training is, for lag monitoring."""
        from confluent_kafka import KafkaException, TopicPartition

        if self.offsets:
            try:
                self.consumer.commit(
                    offsets=[TopicPartition(self.topic, p, o) for p, o in self.offsets.items()],
                    asynchronous=True,
                )
            except KafkaException as exc:
                log.warning("kafka: could not commit the group's offsets (monitoring only): %s", exc)

    def close(self) -> None:
        self.consumer.close()
        self.producer.flush(10)


class MemorySource:
    """Samples put into a queue by this process; None in the queue ends the source. Nothing is
    kept across a restart, so a run on it cannot resume."""

    epoch = 0
    size: int | None = None

    def __init__(self, samples: queue.Queue[TrainingSample | None], should_stop: Callable[[], bool]):
        self.queue = samples
        self.should_stop = should_stop
        self.taken = 0
        self.ended = False

    def next(self) -> TrainingSample | None:
        while not self.ended and not self.should_stop():
            try:
                sample = self.queue.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if sample is None:
                self.ended = True
                break
            self.taken += 1
            return sample
        return None

    def state(self) -> dict[str, Any]:
        return {"kind": "memory", "taken": self.taken}

    def restore(self, state: dict[str, Any]) -> None:
        raise InvalidArgument(
            "checkpoint: a run on the in-process source cannot resume; use a new output_dir"
        )

    def committed(self) -> None:
        pass

    def close(self) -> None:
        pass
