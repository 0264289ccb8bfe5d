"""`cai up --kafka`: the run's three stages as the services' stream stages on a real broker.

The prompts go to fresh topics named after the run (`cai-up.<run id>.<random>.*`), the policy, critique
and judge stages run in this process (on one shared model, or the policy's and the feedback
model's), and the records they produce are read back from the topics into the same run folder,
with the same content, as the in-process run. With `--train-steps` the trainer reads the
preferences topic and publishes each version on the policy-versions topic, which the policy
service follows: the loop a cluster runs.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
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
from cai.records import PolicyVersion, Preference, Prompt, Revision, Rollout
from cai.v1 import records_pb2
from services.policy_updates import PolicyFollower
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


def _metadata(consumer: Any, topics: list[str], timeout_s: float = 60.0) -> dict[str, Any]:
    """The topics' metadata once every one has its partitions: a broker under load may answer
    for new topics before it knows them, and a partition missed here would never be read."""
    deadline = time.monotonic() + timeout_s
    while True:
        metadata = consumer.list_topics(timeout=10).topics
        if all(t in metadata and metadata[t].partitions and metadata[t].error is None for t in topics):
            return dict(metadata)
        if time.monotonic() > deadline:
            raise Unavailable(f"kafka: the broker does not list the topics {', '.join(topics)}")
        time.sleep(0.2)


class _Collector:
    """Reads the output and dead-letter topics from their beginning, without a consumer group."""

    def __init__(self, bootstrap: str, prefix: str):
        self.prefix = prefix
        from cai.kafka import client

        self.consumer = client.consumer(bootstrap, "cai-up-export", f"{prefix}export")
        topics = [prefix + name for name in OUTPUTS] + [dlq(prefix + "prompts"), dlq(prefix + "rollouts")]
        metadata = _metadata(self.consumer, topics)
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


def topic_prefix(out: Path) -> str:
    """A fresh prefix, so no earlier run's records mix in; the folder name made a legal topic name."""
    run_name = re.sub(r"[^A-Za-z0-9._-]", "-", out.name)[:64]
    return f"cai-up.{run_name}.{secrets.token_hex(3)}."


Key = tuple[str, int]  # (prompt id, prompt seed): one prompt answered in one round


class KafkaPipeline:
    """The three stages as stream stages on fresh topics (`prefix`), in this process, and the
    records they produce, gathered by prompt. The policy stage serves `policy`; critique and judge
    use `feedback` (default: `policy`). With `follow`, the policy service loads each version the
    trainer publishes on the policy-versions topic, as a cluster's policy service does."""

    def __init__(
        self,
        policy: Backend,
        constitution: Constitution,
        config: RunConfig,
        bootstrap: str,
        prefix: str,
        feedback: Backend | None = None,
        follow: bool = False,
        advance: Callable[[Stage], None] = lambda stage: None,
        partitions: int = 3,
    ):
        self.policy, self.feedback = policy, feedback or policy
        self.constitution, self.config = constitution, config
        self.bootstrap, self.prefix, self.follow = bootstrap, prefix, follow
        self.advance, self.partitions = advance, partitions
        self.stopping = asyncio.Event()
        self.running: list[RunningService] = []
        self.tasks: list[asyncio.Future[None]] = []  # the stream stages, then the follower
        self.follower: PolicyFollower | None = None
        self.partial: dict[Key, dict[str, Any]] = {}
        self.waiting: dict[Key, tuple[int, asyncio.Queue[Any]]] = {}
        self.collector: _Collector

    async def __aenter__(self) -> KafkaPipeline:
        await asyncio.to_thread(
            create_topics, self.bootstrap, TopicSpec(partitions=self.partitions), prefix=self.prefix
        )
        try:
            for name, values in _settings(
                self.config, self.constitution, self.bootstrap, self.prefix
            ).items():
                settings = load_settings(name, None, **values)  # type: ignore[arg-type]
                backend = self.policy if name == "policy" else self.feedback
                service = await start_service(name, settings, backend)  # type: ignore[arg-type]
                self.running.append(service)
                self.tasks.append(asyncio.ensure_future(service.stream(settings).run(self.stopping)))
            self.collector = await asyncio.to_thread(_Collector, self.bootstrap, self.prefix)
            if self.follow:
                topic = self.prefix + "policy-versions"
                await asyncio.to_thread(_metadata, self.collector.consumer, [topic])
                self.follower = PolicyFollower(self.running[0].backend, self.bootstrap, topic)
                self.tasks.append(asyncio.ensure_future(self.follower.run(self.stopping)))
            self.collecting = asyncio.ensure_future(self._collect())
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *_: object) -> None:
        self.stopping.set()
        collecting = getattr(self, "collecting", None)
        if collecting is not None:
            collecting.cancel()
            await asyncio.gather(collecting, return_exceptions=True)
        if hasattr(self, "collector"):
            await asyncio.to_thread(self.collector.consumer.close)
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for service in reversed(self.running):
            await service.stop(0)

    async def answer(self, jobs: list[tuple[Prompt, int]]) -> AsyncIterator[tuple[int, PromptResult]]:
        """Push each (prompt, run seed) job to the prompts topic; yield (job index, its records, as
        the stages wrote them) as each prompt's rollout, revision and preference have all arrived."""
        done: asyncio.Queue[Any] = asyncio.Queue()
        keys = []
        for i, (prompt, seed) in enumerate(jobs):
            key = (prompt.id, prompt.seeded(seed).seed)
            self.waiting[key] = (i, done)
            keys.append(key)
            self._complete(key)  # replayed records of an earlier push may already be here
        try:
            for seed in sorted({seed for _, seed in jobs}):
                prompts = [prompt for prompt, s in jobs if s == seed]
                await asyncio.to_thread(push_prompts, self.bootstrap, prompts, seed, self.prefix)
            for _ in jobs:
                item = await done.get()
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            for key in keys:
                self.waiting.pop(key, None)

    def _complete(self, key: Key) -> None:
        found = self.partial.get(key, {})
        if key in self.waiting and all(name in found for name in OUTPUTS):
            index, done = self.waiting.pop(key)
            done.put_nowait((index, PromptResult(*(found[name] for name in OUTPUTS))))

    def _fail(self, error: Exception) -> None:
        for _, done in list(self.waiting.values()):
            done.put_nowait(error)
        self.waiting.clear()

    async def _collect(self) -> None:
        """Read the output topics for as long as the pipeline runs (a replayed duplicate is
        dropped: the first record of each prompt and round counts)."""
        try:
            while True:
                for task in self.tasks:
                    if task.done():  # a stage stopped on its own: say why instead of waiting forever
                        task.result()
                        raise Unavailable("kafka: a stream stage stopped before the run finished")
                for name, key, value in await asyncio.to_thread(self.collector.read):
                    prompt_id = (key or b"").decode(errors="replace")
                    if name == "dlq":
                        raise Unavailable(f"kafka: prompt {prompt_id!r} went to a dead-letter topic: {value}")
                    found = self.partial.setdefault((prompt_id, value.meta.seed), {})
                    if name in found:
                        continue
                    found[name] = value
                    self.advance(OUTPUTS[name][2])
                    self._complete((prompt_id, value.meta.seed))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._fail(exc)
            raise

    async def serve(self, version: PolicyVersion, timeout_s: float = 600.0) -> None:
        """Return once the policy service has loaded `version` from the policy-versions topic."""
        assert self.follower is not None, "serve() needs follow=True"
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not any(v.version == version.version for v in self.follower.loaded):
            if self.tasks[-1].done():
                self.tasks[-1].result()
            if asyncio.get_running_loop().time() > deadline:
                raise Unavailable(
                    f"kafka: the policy service did not load {version.version} within {timeout_s:.0f} s"
                    f" ({self.follower.failed} versions failed to load; see the log)"
                )
            await asyncio.sleep(0.05)


async def run_through_kafka(
    backend: Backend,
    constitution: Constitution,
    config: RunConfig,
    prompts: list[Prompt],
    bootstrap: str,
    advance: Callable[[Stage], None] = lambda stage: None,
    feedback: Backend | None = None,
) -> dict[str, Any]:
    """Run the pipeline through Kafka and write the run folder; returns run.json's content."""
    started = time.time()
    config.out.mkdir(parents=True, exist_ok=True)
    prefix = topic_prefix(config.out)
    writer = RunWriter(config.out, constitution)
    results: dict[int, PromptResult] = {}
    try:
        async with KafkaPipeline(
            backend, constitution, config, bootstrap, prefix, feedback, advance=advance
        ) as stages:
            async for index, result in stages.answer([(p, config.seed) for p in prompts]):
                results[index] = result
                writer.add(index, result)
    finally:
        writer.close()
    return write_run_info(
        config,
        [results[i] for i in range(len(prompts))],
        started,
        constitution,
        backend.model_id,
        EngineConfig(),  # what the critique and judge services run with
        transport="kafka",
        kafka_topic_prefix=prefix,
    )
