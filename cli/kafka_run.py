"""`cai up --kafka`: the run's three stages as the services' stream stages on a real broker.

The prompts go to fresh topics named after the run (`cai-up.<run id>.<random>.*`), the policy, critique
and judge stages run in this process on one shared model, and the records they produce are read
back from the topics into the same run folder, with the same content, as the in-process run.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import TopicPartition

from cai.backends.base import Backend
from cai.constitution import Constitution
from cai.engine import EngineConfig
from cai.errors import Unavailable
from cai.kafka import records as codec
from cai.kafka.admin import push_prompts
from cai.kafka.topics import TopicSpec, create_topics, dlq
from cai.pipeline import PromptResult, RunConfig, RunWriter, Stage, write_run_info
from cai.records import Preference, Prompt, Revision, Rollout
from cai.v1 import records_pb2
from services.server import RunningService, start_service
from services.settings import load_settings

# topic -> (its message, the record model type, the progress stage it finishes)
OUTPUTS: dict[str, tuple[type[Any], Any, Stage]] = {
    "rollouts": (records_pb2.RolloutRecord, Rollout, "responses"),
    "revisions": (records_pb2.RevisionRecord, Revision, "critiques"),
    "preferences": (records_pb2.PreferenceRecord, Preference, "judgments"),
}


def _settings(config: RunConfig, constitution: Constitution, bootstrap: str, prefix: str) -> dict[str, Any]:
    """Each stage's settings, so that it does what the in-process run does with `config`."""
    common = {
        "port": 0,
        "metrics_port": 0,
        "kafka": bootstrap,
        "kafka_prefix": prefix,
        "max_prompt_tokens": 8192,
        "max_new_tokens": 1024,
        "max_n": 16,
    }
    return {
        "policy": {
            **common,
            "responses_per_prompt": 2 if config.pairs == "samples" else 1,
            "response_max_new_tokens": config.response_params.max_new_tokens,
        },
        "critique": {**common, "constitution": constitution.source, "rounds": config.critique.rounds},
        "judge": {
            **common,
            "constitution": constitution.source,
            "judge_input": "revisions" if config.pairs == "revision" else "rollouts",
            "k_principles": config.judge.k_principles,
            "debias": config.judge.debias,
            "chain_of_thought": config.judge.cot,
        },
    }


class _Collector:
    """Reads the output and dead-letter topics from their beginning, without a consumer group."""

    def __init__(self, bootstrap: str, prefix: str):
        self.prefix = prefix
        from cai.kafka import client

        self.consumer = client.consumer(bootstrap, "cai-up-export", f"{prefix}export")
        topics = [prefix + name for name in OUTPUTS] + [dlq(prefix + "prompts"), dlq(prefix + "rollouts")]
        metadata = self.consumer.list_topics(timeout=10).topics
        self.consumer.assign(
            [
                TopicPartition(topic, partition, 0)
                for topic in topics
                for partition in metadata[topic].partitions
            ]
        )

    def read(self) -> list[tuple[str, Any, Any]]:
        """(output name or 'dlq', key, decoded record or the dead letter's error)."""
        found = []
        batch: list[Any] = self.consumer.consume(500, 0.5)
        for item in batch:
            if item.error() is not None:
                continue
            name = item.topic().removeprefix(self.prefix)
            if name in OUTPUTS:
                message, model, _ = OUTPUTS[name]
                decoded = codec.decode(message, item.value(), item.headers())
                found.append((name, item.key(), model.of_proto(decoded)))
            else:
                headers = dict(item.headers() or [])
                found.append(("dlq", item.key(), headers.get("error", b"").decode(errors="replace")))
        return found


async def run_through_kafka(
    backend: Backend,
    constitution: Constitution,
    config: RunConfig,
    prompts: list[Prompt],
    bootstrap: str,
    advance: Callable[[Stage], None] = lambda stage: None,
    partitions: int = 3,
) -> dict[str, Any]:
    """Run the pipeline through Kafka and write the run folder; returns run.json's content."""
    started = time.time()
    config.out.mkdir(parents=True, exist_ok=True)
    # A fresh prefix, so no earlier run's records mix in; the folder name made a legal topic name.
    run_name = re.sub(r"[^A-Za-z0-9._-]", "-", config.out.name)[:64]
    prefix = f"cai-up.{run_name}.{secrets.token_hex(3)}."
    await asyncio.to_thread(create_topics, bootstrap, TopicSpec(partitions=partitions), prefix=prefix)
    stopping = asyncio.Event()
    running: list[RunningService] = []
    streams: list[asyncio.Future[None]] = []
    writer = RunWriter(config.out, constitution)
    try:
        for name, values in _settings(config, constitution, bootstrap, prefix).items():
            settings = load_settings(name, None, **values)  # type: ignore[arg-type]
            service = await start_service(name, settings, backend)  # type: ignore[arg-type]
            running.append(service)
            streams.append(asyncio.ensure_future(service.stream(settings).run(stopping)))
        await asyncio.to_thread(push_prompts, bootstrap, prompts, config.seed, prefix)
        results = await _collect(bootstrap, prefix, prompts, writer, streams, advance)
    finally:
        writer.close()
        stopping.set()
        await asyncio.gather(*streams, return_exceptions=True)
        for service in reversed(running):
            await service.stop(0)
    return write_run_info(
        config,
        results,
        started,
        constitution,
        backend.model_id,
        EngineConfig(),  # what the critique and judge services run with
        transport="kafka",
        kafka_topic_prefix=prefix,
    )


async def _collect(
    bootstrap: str,
    prefix: str,
    prompts: list[Prompt],
    writer: RunWriter,
    streams: list[asyncio.Future[None]],
    advance: Callable[[Stage], None],
) -> list[PromptResult]:
    """Wait until every prompt has its rollout, revision and preference (replayed duplicates are
    dropped: the first record per prompt counts), writing each prompt's records as it completes."""
    collector = await asyncio.to_thread(_Collector, bootstrap, prefix)
    index = {p.id: i for i, p in enumerate(prompts)}
    seen: dict[str, dict[str, Any]] = {name: {} for name in OUTPUTS}
    results: dict[str, PromptResult] = {}
    try:
        while len(results) < len(prompts):
            for stream in streams:
                if stream.done():  # a stage stopped on its own: say why instead of waiting forever
                    stream.result()
                    raise Unavailable("kafka: a stream stage stopped before the run finished")
            for name, key, value in await asyncio.to_thread(collector.read):
                prompt_id = (key or b"").decode(errors="replace")
                if name == "dlq":
                    raise Unavailable(f"kafka: prompt {prompt_id!r} went to a dead-letter topic: {value}")
                if prompt_id not in index or prompt_id in seen[name]:
                    continue
                seen[name][prompt_id] = value
                advance(OUTPUTS[name][2])
                if all(prompt_id in seen[n] for n in OUTPUTS):
                    # The topics' own records, as the stages wrote them.
                    result = PromptResult(*(seen[n][prompt_id] for n in OUTPUTS))
                    results[prompt_id] = result
                    writer.add(index[prompt_id], result)
    finally:
        await asyncio.to_thread(collector.consumer.close)
    return [results[p.id] for p in prompts]
