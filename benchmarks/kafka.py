"""Benchmarks of the Kafka stream stages, on a real broker started for the run (KRaft, one node).

- `kafka-ceiling`: records per second through the policy stage on the instant `FakeBackend`
  (consume, decode, process, encode, produce, wait for acks, commit), side by side with a bare
  confluent-kafka loop that only copies the same records to another topic: the client's own
  ceiling on this machine, which the stage's rate is reported against.
- `kafka-latency`: prompts produced at a steady rate flow through the policy and judge stages
  (FakeBackend); latency is the preference's broker timestamp minus its prompt's, p50 and p99.
- `kafka-vs-inprocess`: `cai up`'s pipeline on the real model, through Kafka (the three stream
  stages) and in process, on one shared backend: prompts per second and their ratio.

Run them through `benchmarks.run` (`--only kafka-ceiling kafka-latency kafka-vs-inprocess`).
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition

from cai import constitution
from cai.backends.base import Backend
from cai.backends.fake import FakeBackend
from cai.devbroker import Broker
from cai.engine import CAIEngine
from cai.kafka.admin import prompt_message, push_prompts
from cai.kafka.records import encode
from cai.kafka.stream import StreamStage
from cai.kafka.topics import TopicSpec, create_topics
from cai.pipeline import LocalStages, RunConfig, load_prompts, run
from cai.records import Prompt
from cli.kafka_run import run_through_kafka
from services.server import RunningService, start_service
from services.settings import load_settings

PARTITIONS = 3


@contextmanager
def broker() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="cai-bench-kafka-") as data:
        server = Broker(Path(data), detach=False)
        server.start()
        try:
            yield server.bootstrap
        finally:
            server.stop()


def fresh_topics(bootstrap: str, name: str) -> str:
    prefix = f"bench.{name}.{time.monotonic_ns()}."
    create_topics(bootstrap, TopicSpec(partitions=PARTITIONS), prefix=prefix)
    return prefix


def synthetic_prompts(count: int) -> list[Prompt]:
    return [Prompt(f"p{i:06d}", f"Explain tides simply, take {i}.", "benign") for i in range(count)]


@asynccontextmanager
async def stages(
    bootstrap: str, prefix: str, names: tuple[str, ...], backend: Backend, **extra: Any
) -> AsyncIterator[list[StreamStage]]:
    """Services with their stream stages running in this process until the block ends."""
    stopping = asyncio.Event()
    running: list[RunningService] = []
    streams: list[StreamStage] = []
    tasks = []
    for name in names:
        settings = load_settings(  # type: ignore[arg-type]
            name,
            None,
            port=0,
            metrics_port=0,
            kafka=bootstrap,
            kafka_prefix=prefix,
            log_level="WARNING",
            **extra,
        )
        service = await start_service(name, settings, backend)  # type: ignore[arg-type]
        running.append(service)
        streams.append(service.stream(settings))
        tasks.append(asyncio.ensure_future(streams[-1].run(stopping)))
    try:
        yield streams
    finally:
        stopping.set()
        await asyncio.gather(*tasks)
        for service in running:
            await service.stop(0)


# ---- transport ceiling ----------------------------------------------------------------------


def bare_copy(bootstrap: str, prefix: str, count: int) -> float:
    """Seconds for a plain consume -> produce -> commit loop to copy `count` records."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": prefix + "bare",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
    consumer.subscribe([prefix + "prompts"])
    copied, start = 0, None
    try:
        while copied < count:
            batch = consumer.consume(500, 0.5)
            if batch and start is None:
                start = time.perf_counter()
            for item in batch:
                producer.produce(
                    prefix + "rollouts", value=item.value(), key=item.key(), headers=item.headers()
                )
                producer.poll(0)
            copied += len(batch)
            if batch:
                producer.flush()
                consumer.commit(asynchronous=False)
        assert start is not None
        return time.perf_counter() - start
    finally:
        consumer.close()


async def stage_rate(bootstrap: str, prefix: str, count: int, max_in_flight: int) -> float:
    """Seconds for the policy stage to process `count` prompts (from its first record)."""
    async with stages(
        bootstrap, prefix, ("policy",), FakeBackend(), kafka_max_in_flight=max_in_flight, max_n=2
    ) as [stage]:
        while stage.counts["processed"] == 0:
            await asyncio.sleep(0.001)
        start = time.perf_counter()
        while stage.counts["processed"] + stage.counts["dead_lettered"] < count:
            await asyncio.sleep(0.005)
        return time.perf_counter() - start


def bench_ceiling(records: int, in_flight: list[int]) -> dict[str, Any]:
    rows = []
    with broker() as bootstrap:
        prompts = synthetic_prompts(records)
        prefix = fresh_topics(bootstrap, "bare")
        push_prompts(bootstrap, prompts, prefix=prefix)
        bare_s = bare_copy(bootstrap, prefix, records)
        rows.append(
            {"path": "bare consume-produce-commit", "max_in_flight": "-", "records/s": records / bare_s}
        )
        for limit in in_flight:
            prefix = fresh_topics(bootstrap, f"stage{limit}")
            push_prompts(bootstrap, prompts, prefix=prefix)
            seconds = asyncio.run(stage_rate(bootstrap, prefix, records, limit))
            rows.append(
                {"path": "policy stage, FakeBackend", "max_in_flight": limit, "records/s": records / seconds}
            )
    bare = rows[0]["records/s"]
    for row in rows:
        row["vs bare"] = row["records/s"] / bare
    best = max(row["records/s"] for row in rows[1:])
    return {
        "rows": rows,
        "records": records,
        "partitions": PARTITIONS,
        "target": ">= 5000 records/s",
        "met": best >= 5000,
    }


# ---- latency --------------------------------------------------------------------------------


def produce_steadily(bootstrap: str, prefix: str, prompts: list[Prompt], rate: float) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 0})
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        value, headers = encode(prompt_message(prompt, 0))
        producer.produce(prefix + "prompts", value=value, key=prompt.id.encode(), headers=headers)
        producer.poll(0)
    producer.flush()


def timestamps(bootstrap: str, topic: str, expected: int, timeout: float) -> dict[bytes, int]:
    """The first broker timestamp (ms) per key on `topic`, once `expected` keys are there."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "unused", "enable.auto.commit": False})
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    found: dict[bytes, int] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(found) < expected and time.monotonic() < deadline:
            for item in consumer.consume(500, 0.5):
                if item.error() is None:
                    found.setdefault(item.key(), item.timestamp()[1])
        return found
    finally:
        consumer.close()


async def latency_run(bootstrap: str, prefix: str, prompts: list[Prompt], rate: float) -> list[float]:
    async with stages(bootstrap, prefix, ("policy", "judge"), FakeBackend(), max_n=2):
        # Steady state only: one prompt first, through both stages, while the groups form.
        warm_up = [Prompt("warm-up", "Say hello.")]
        await asyncio.to_thread(produce_steadily, bootstrap, prefix, warm_up, rate)
        await asyncio.to_thread(timestamps, bootstrap, prefix + "preferences", 1, 60)
        await asyncio.to_thread(produce_steadily, bootstrap, prefix, prompts, rate)
        sent = await asyncio.to_thread(timestamps, bootstrap, prefix + "prompts", len(prompts) + 1, 60)
        judged = await asyncio.to_thread(timestamps, bootstrap, prefix + "preferences", len(prompts) + 1, 120)
    assert len(judged) == len(sent) == len(prompts) + 1, f"{len(judged)} of {len(sent)} prompts were judged"
    return [judged[key] - sent[key] for key in sent if key != b"warm-up"]


def bench_latency(rate: float, seconds: float) -> dict[str, Any]:
    prompts = synthetic_prompts(int(rate * seconds))
    with broker() as bootstrap:
        prefix = fresh_topics(bootstrap, "latency")
        latencies = asyncio.run(latency_run(bootstrap, prefix, prompts, rate))
    cuts = statistics.quantiles(latencies, n=100)
    row = {
        "prompts": len(prompts),
        "rate/s": rate,
        "p50 ms": cuts[49],
        "p99 ms": cuts[98],
        "max ms": float(max(latencies)),
    }
    return {"rows": [row]}


# ---- real model: through Kafka vs in process ------------------------------------------------


def bench_vs_inprocess(backend: Backend, prompts: int, rounds: int) -> dict[str, Any]:
    records = load_prompts(None, prompts)
    c = constitution.load("default")
    rows = []
    with broker() as bootstrap, tempfile.TemporaryDirectory(prefix="cai-bench-runs-") as runs:
        # Warm-up: the first batches of a fresh model are slow.
        asyncio.run(run(LocalStages(CAIEngine(backend, c)), RunConfig(Path(runs) / "warm"), records[:2]))
        for i in range(rounds):
            for path in ("in process", "kafka"):
                config = RunConfig(Path(runs) / f"{path.replace(' ', '-')}-{i}")
                start = time.perf_counter()
                if path == "kafka":
                    asyncio.run(run_through_kafka(backend, c, config, records, bootstrap))
                else:
                    asyncio.run(run(LocalStages(CAIEngine(backend, c)), config, records))
                rows.append(
                    {"round": i, "path": path, "prompts/s": len(records) / (time.perf_counter() - start)}
                )
    mean = {
        path: statistics.mean(r["prompts/s"] for r in rows if r["path"] == path)
        for path in ("in process", "kafka")
    }
    ratio = mean["kafka"] / mean["in process"]
    rows.append({"round": "mean", "path": "kafka / in process", "prompts/s": ratio})
    return {"rows": rows, "prompts": prompts, "ratio": ratio, "target": "ratio >= 0.9", "met": ratio >= 0.9}
