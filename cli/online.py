"""`cai up --train-steps N`: the whole online loop, in process, through the gRPC services or
through Kafka.

The policy answers prompts, the feedback model (a copy of the base weights, never trained, or
`--judge-model`) critiques, revises and judges, each finished pair goes to the trainer (through an
in-process queue, or with `--kafka` the preferences topic), and every `publish_every` steps the
trainer publishes its adapter, which the policy serves from its next decode step (the same
archive, hash check and adapter load as the services; with `--kafka` the policy service follows
the policy-versions topic). Generation and
training run at the same time, so pairs from a policy a version or two old are trained; older ones are dropped
(`max_staleness`). The prompts are answered round after round, each round with new seeds, until
the trainer has done its steps, and at least once each (so the run folder holds every prompt's
pair, as without training). Before and after, `cai eval` measures the policy against the base
model on prompts taken in turn from each category of the prompt file, and `training.png` plots
the run.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import queue
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from cai import pipeline
from cai.backends.base import Backend
from cai.backends.transformers import TransformersBackend
from cai.constitution import Constitution
from cai.engine import CAIEngine
from cai.evaluation import EvalConfig, EvalReport, evaluate
from cai.policy_versions import fetch_adapter
from cai.records import PolicyVersion, Prompt, TrainingSample
from trainer.config import TrainConfig
from trainer.io import build_trainer
from trainer.train import StepResult


@dataclass
class OnlineResult:
    results: list[pipeline.PromptResult]  # the pairs in the run folder, in order, trained or not
    steps: list[dict[str, Any]]  # the trainer's log lines
    versions: list[dict[str, Any]] = field(default_factory=list)  # published: version, step, seconds
    before: EvalReport | None = None
    after: EvalReport | None = None
    stale: int = 0


def balanced_prompts(records: list[Prompt], limit: int) -> list[Prompt]:
    """Up to `limit` prompts, taken in turn from each category, so red-team and benign both count."""
    groups: dict[str, list[Prompt]] = {}
    for r in records:
        groups.setdefault(r.category, []).append(r)
    chosen: list[Prompt] = []
    while len(chosen) < limit and any(groups.values()):
        for items in groups.values():
            if items and len(chosen) < limit:
                chosen.append(items.pop(0))
    return chosen


class LocalPairs:
    """Answers prompts through `stages`: in this process, or through the gRPC services on
    loopback (`cai up --services`); a new policy version is loaded into `policy` directly."""

    def __init__(self, stages: pipeline.Stages, config: pipeline.RunConfig, policy: Backend, cache: Path):
        self.stages, self.config, self.policy, self.cache = stages, config, policy, cache
        self.gate = asyncio.Semaphore(config.concurrency)

    async def _one(self, index: int, prompt: Prompt, seed: int) -> tuple[int, pipeline.PromptResult]:
        async with self.gate:
            config = replace(self.config, seed=seed)
            return index, await pipeline.process_prompt(self.stages, config, prompt, lambda _: None)

    async def answer(
        self, jobs: list[tuple[Prompt, int]]
    ) -> AsyncIterator[tuple[int, pipeline.PromptResult]]:
        tasks = [asyncio.ensure_future(self._one(i, p, seed)) for i, (p, seed) in enumerate(jobs)]
        try:
            for done in asyncio.as_completed(tasks):
                yield await done
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def serve(self, version: PolicyVersion) -> None:
        folder = await asyncio.to_thread(fetch_adapter, version, self.cache)
        await self.policy.load_adapter(folder, version.version)  # type: ignore[attr-defined]


class PairSource(Protocol):
    """Where the loop's pairs come from: `LocalPairs`, or the stream stages (`cli.kafka_run`)."""

    def answer(self, jobs: list[tuple[Prompt, int]]) -> AsyncIterator[tuple[int, pipeline.PromptResult]]:
        """Answer each (prompt, run seed) job; yield (job index, records) as each is done."""
        ...

    async def serve(self, version: PolicyVersion) -> None:
        """Return once the policy serves `version`."""


async def run_online(
    policy: TransformersBackend,
    feedback: Backend,
    constitution: Constitution,
    config: pipeline.RunConfig,
    records: list[Prompt],
    train_config: TrainConfig,
    eval_set: list[Prompt],
    advance: Callable[[str, float], None] = lambda task, amount: None,
    overlap: bool = True,
    pairs: PairSource | None = None,
    baseline: Backend | None = None,
) -> OnlineResult:
    """Train online on `records` and evaluate before and after on `eval_set` (none: no evaluation).
    `advance(task, amount)` reports progress: "pairs", "steps" and "eval". With `overlap`
    False, generation and training take turns (the pairs of one step, then that step, ...), as a
    synchronous online-DPO loop does: benchmarks/online.py compares the two.

    `pairs` answers the prompts (default: in this process, `feedback` critiquing and judging).
    With the trainer's `memory` source every pair is handed to it here; with `kafka` it reads the
    preferences topic itself. `baseline` (default `feedback`) is the untrained model the
    evaluation compares the policy with."""
    loop = asyncio.get_running_loop()
    cache = Path(train_config.output_dir) / "served"
    if pairs is None:
        stages = pipeline.LocalStages(CAIEngine(feedback, constitution), policy=policy)
        pairs = LocalPairs(stages, config, policy, cache)
    eval_config = EvalConfig(seed=config.seed + 7919, response_params=config.response_params)
    reference = baseline or feedback

    async def measure() -> EvalReport:
        tick = lambda _: advance("eval", 1)  # noqa: E731
        return await evaluate(policy, reference, feedback, constitution, eval_set, eval_config, advance=tick)

    before = await measure() if eval_set else None

    feed: queue.Queue[TrainingSample | None] | None = (
        queue.Queue() if train_config.source == "memory" else None
    )
    versions: list[dict[str, Any]] = []
    source = pairs

    class Serve:
        """The trainer's last publisher: the policy serves the new version before training goes on."""

        def publish(self, version: PolicyVersion) -> None:  # in the trainer's thread
            started = time.perf_counter()
            asyncio.run_coroutine_threadsafe(source.serve(version), loop).result()
            seconds = time.perf_counter() - started
            versions.append({"version": version.version, "step": version.step, "publish_to_serve_s": seconds})

        def close(self) -> None:
            pass

    trainer = build_trainer(train_config, feed, [Serve()])
    steps: list[dict[str, Any]] = []

    stepped = asyncio.Event()

    def on_step(step: StepResult) -> None:
        steps.append({k: v for k, v in step.metrics.items() if k != "sample_ids"})
        advance("steps", 1)
        loop.call_soon_threadsafe(stepped.set)

    # A thread of its own: the trainer holds it for the whole run, and the default executor's few
    # workers (cores + 4) are shared by every to_thread call of the stages and the Kafka clients.
    executor = ThreadPoolExecutor(1, thread_name_prefix="trainer")
    training: asyncio.Future[Any] = loop.run_in_executor(executor, trainer.train, on_step)
    finished: dict[int, pipeline.PromptResult] = {}
    writer = pipeline.RunWriter(config.out, constitution)

    async def batch(first: int, jobs: list[tuple[Prompt, int]]) -> None:
        async for i, result in source.answer(jobs):
            finished[first + i] = result
            writer.add(first + i, result)
            if feed is not None:
                prompt, seed = jobs[i]
                feed.put(TrainingSample.of(result.preference, f"round seed {seed}, prompt {prompt.id}"))
            advance("pairs", 1)

    async def generate() -> None:
        """Until cancelled, once the trainer is done."""
        if not overlap:
            per_step = train_config.samples_per_step
            for step in itertools.count():
                first = step * per_step
                jobs = [
                    (records[i % len(records)], config.seed + i // len(records))
                    for i in range(first, first + per_step)
                ]
                stepped.clear()
                await batch(first, jobs)
                await stepped.wait()
        index = 0
        for round_number in itertools.count():
            seed = config.seed + round_number
            await batch(index, [(r, seed) for r in records])
            index += len(records)
            first_round.set()

    first_round = asyncio.Event()
    generating = asyncio.ensure_future(generate())
    round_done = asyncio.ensure_future(first_round.wait())
    try:
        await asyncio.wait([training, generating], return_when=asyncio.FIRST_COMPLETED)
        if overlap and not generating.done():
            # Every prompt gets its pair into the run folder, as without training.
            await asyncio.wait([generating, round_done], return_when=asyncio.FIRST_COMPLETED)
        if generating.done():
            generating.result()  # a generation error stops the run
    finally:
        trainer.request_stop()
        if feed is not None:
            feed.put(None)
        round_done.cancel()
        generating.cancel()
        await asyncio.gather(generating, return_exceptions=True)
        result = await training
        executor.shutdown()
        trainer.close()
        writer.close()
    after = await measure() if eval_set else None
    # The run folder holds the pairs up to the first one cut short when generation stopped.
    results = [finished[i] for i in range(writer.next)]
    return OnlineResult(results, steps, versions, before, after, result.stale)


def write_outputs(out: Path, online: OnlineResult) -> dict[str, Any]:
    """eval.json (before and after) and training.png; returns what run.json records of the loop."""
    reports = [("before", online.before), ("after", online.after)]
    evaluation = {name: report.to_dict() for name, report in reports if report}
    if evaluation:
        (out / "eval.json").write_text(json.dumps(evaluation, indent=2, ensure_ascii=False) + "\n")
    plot(out / "training.png", online)
    return {
        "steps": len(online.steps),
        "pairs_generated": len(online.results),
        "stale_dropped": online.stale,
        "versions": online.versions,
        "win_rate": {name: {c.category: c.win_rate for c in r.categories} for name, r in reports if r},
    }


def plot(path: Path, online: OnlineResult) -> None:
    """Loss, mean preference margin, win-rate (before and after) and staleness over the steps."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    steps = [row["step"] for row in online.steps]
    figure, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    panels = [
        (axes[0][0], "loss", "DPO loss"),
        (axes[0][1], "margin", "mean preference margin d"),
        (axes[1][1], "staleness", "mean staleness of trained pairs (versions)"),
    ]
    for axis, key, title in panels:
        axis.plot(steps, [row.get(key, float("nan")) for row in online.steps], marker=".")
        axis.set_title(title)
    for row in online.versions:
        for axis, _, _ in panels:
            axis.axvline(row["step"], color="grey", alpha=0.3, linewidth=0.8)  # a new policy version
    win = axes[1][0]
    last = steps[-1] if steps else 0
    for name, x, report in (("before", 0, online.before), ("after", last, online.after)):
        if report is None:
            continue
        for c in report.categories:
            win.errorbar(
                [x], [c.win_rate], yerr=[[c.win_rate - c.ci_low], [c.ci_high - c.win_rate]],
                fmt="o", capsize=4, label=f"{c.category} ({name})",
            )  # fmt: skip
    win.axhline(0.5, color="grey", linestyle="--", linewidth=0.8)
    win.set_ylim(0, 1)
    win.set_title("win-rate over the base model (judge)")
    if online.before or online.after:
        win.legend(fontsize=7)
    for axis in axes[1]:
        axis.set_xlabel("optimizer step")
    figure.suptitle(f"cai up: online DPO, {len(steps)} steps, {len(online.versions)} policy versions")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
