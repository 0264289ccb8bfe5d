"""`cai up`: generate -> critique/revise -> judge on one machine, writing SL-CAI and RL-CAI data.

Outputs in the run folder:
- `sft.jsonl`: prompt -> final revision (TRL conversational prompt/completion format);
- `preferences.jsonl`: TRL preference format (prompt/chosen/rejected) plus the soft label
  `p_chosen` and its per-principle detail;
- `revisions.jsonl`: every critique/revision chain in full;
- `run.json`: the configuration, versions, counts and summary, written last: a folder without it
  holds an interrupted run, whose JSONL files keep every prompt it finished.
Every record carries its sample id, prompt id, constitution id and hash, principle ids, model id,
policy version and seed, so any training example can be traced back to how it was made.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from cai import __version__, labels, records
from cai.backends.base import Backend, Completion, SamplingParams
from cai.constitution import Constitution, Conversation
from cai.engine import (
    RESPONSE_PARAMS,
    CAIEngine,
    ComparisonResult,
    CritiqueChain,
    CritiqueOptions,
    EngineConfig,
    JudgeOptions,
)
from cai.errors import InvalidArgument
from cai.jsonl import read_objects
from cai.paths import builtin_prompts_file
from cai.records import Preference, Prompt, Revision, Rollout

PairSource = Literal["revision", "samples"]
Stage = Literal["responses", "critiques", "judgments"]


@dataclass
class RunConfig:
    out: Path
    prompts: Path | None = None  # None: the built-in red-team and benign set
    limit: int | None = None
    seed: int = 0
    critique: CritiqueOptions = field(default_factory=CritiqueOptions)
    judge: JudgeOptions = field(default_factory=JudgeOptions)
    pairs: PairSource = "revision"
    response_params: SamplingParams = RESPONSE_PARAMS
    concurrency: int = 32


def load_prompts(path: Path | None, limit: int | None = None) -> list[Prompt]:
    """Read a JSONL prompt file: one object per line with `prompt`, optional `id` and `category`.

    Any bad line stops the run with its line number, so no prompt is dropped silently.
    """
    path = path or builtin_prompts_file()
    prompts: list[Prompt] = []
    seen: dict[str, int] = {}
    for number, row in read_objects(path, "--prompts"):
        where = f"{path}:{number}"
        text = row.get("prompt")
        if not isinstance(text, str) or not text.strip():
            raise InvalidArgument(f"{where}: prompt: must be a non-empty string")
        prompt_id = str(row.get("id", f"line-{number}"))
        if prompt_id in seen:
            raise InvalidArgument(f"{where}: id: {prompt_id!r} repeats line {seen[prompt_id]}")
        seen[prompt_id] = number
        prompts.append(Prompt(prompt_id, text.strip(), str(row.get("category", "uncategorized"))))
    if not prompts:
        raise InvalidArgument(f"--prompts: {path} holds no prompts")
    return prompts[:limit] if limit else prompts


@dataclass(frozen=True)
class PromptResult:
    """One prompt's records: its rollout, the chain of its first answer and the judged pair."""

    rollout: Rollout
    revision: Revision
    preference: Preference

    @property
    def prompt(self) -> Prompt:
        return self.rollout.prompt


class Stages(Protocol):
    """The three stages a run drives: in this process (`LocalStages`) or through the gRPC services."""

    constitution: Constitution
    model_id: str  # the policy's
    feedback_model_id: str  # the critic's and judge's
    engine_config: EngineConfig

    async def respond(self, conversation: Conversation, params: SamplingParams) -> list[Completion]: ...

    async def critique_revise(
        self, conversation: Conversation, options: CritiqueOptions, seed: int
    ) -> CritiqueChain: ...

    async def compare(
        self, conversation: Conversation, a: str, b: str, options: JudgeOptions, seed: int
    ) -> ComparisonResult: ...


class LocalStages:
    """The stages in this process: answers from `policy` (default: the engine's backend, which
    critiques and judges); `cai up --train-steps` gives the policy its own, trained, weights, and
    `--judge-model` the engine a feedback model of its own."""

    def __init__(self, engine: CAIEngine, policy: Backend | None = None):
        self.engine = engine
        self.policy = policy or engine.backend
        self.constitution = engine.constitution
        self.model_id = self.policy.model_id
        self.feedback_model_id = engine.backend.model_id
        self.engine_config = engine.config

    async def respond(self, conversation: Conversation, params: SamplingParams) -> list[Completion]:
        return await self.policy.generate(await self.policy.render(conversation), params)

    async def critique_revise(
        self, conversation: Conversation, options: CritiqueOptions, seed: int
    ) -> CritiqueChain:
        return await self.engine.critique_revise(conversation, options, seed=seed)

    async def compare(
        self, conversation: Conversation, a: str, b: str, options: JudgeOptions, seed: int
    ) -> ComparisonResult:
        return await self.engine.compare(conversation, a, b, options, seed=seed)


async def process_prompt(
    stages: Stages, config: RunConfig, prompt: Prompt, advance: Callable[[Stage], None]
) -> PromptResult:
    """Answer, critique and revise, judge: the same steps, and records, as the stream stages."""
    prompt = prompt.seeded(config.seed)
    n = 2 if config.pairs == "samples" else 1
    completions = await stages.respond(
        prompt.conversation, replace(config.response_params, n=n, seed=prompt.seed)
    )
    rollout = records.rollout_of(prompt, completions, stages.model_id)
    advance("responses")
    answered = [*prompt.conversation, {"role": "assistant", "content": rollout.responses[0]}]
    chain = await stages.critique_revise(answered, config.critique, prompt.seed)
    revision = records.revision_of(rollout, chain, stages.constitution, stages.feedback_model_id)
    advance("critiques")
    # revision pairs: is the revision better than the answer it revised? samples: RL-CAI proper.
    source: Rollout | Revision = revision if config.pairs == "revision" else rollout
    judgment = await stages.compare(prompt.conversation, *records.pair_of(source), config.judge, prompt.seed)
    preference = records.preference_of(source, judgment, stages.constitution, stages.feedback_model_id)
    advance("judgments")
    return PromptResult(rollout, revision, preference)


class RunWriter:
    """Appends each prompt's records as soon as it and every prompt before it are done.

    Files grow while the run goes on (an interrupted run keeps what it finished) and still list
    records in prompt order, so two runs with the same seed give identical files.
    """

    def __init__(self, out: Path, constitution: Constitution):
        names = {"sft": "sft.jsonl", "revision": "revisions.jsonl", "preference": "preferences.jsonl"}
        self.files = {kind: (out / name).open("w", encoding="utf-8") for kind, name in names.items()}
        self.constitution_version = constitution.version
        self.run_id = out.name
        self.done: dict[int, PromptResult] = {}
        self.next = 0

    def add(self, index: int, result: PromptResult) -> None:
        self.done[index] = result
        while self.next in self.done:
            done = self.done.pop(self.next)
            context = (self.run_id, self.constitution_version)
            rows = {
                "sft": done.revision.to_sft_row(*context),
                "revision": done.revision.to_row(*context),
                "preference": done.preference.to_row(*context),
            }
            for kind, row in rows.items():
                self.files[kind].write(json.dumps(row, ensure_ascii=False) + "\n")
                self.files[kind].flush()
            self.next += 1

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def summarize(results: list[PromptResult]) -> list[dict[str, Any]]:
    """One row per prompt category and one for all prompts."""
    groups: dict[str, list[PromptResult]] = {}
    for r in results:
        groups.setdefault(r.prompt.category, []).append(r)
    groups["all"] = results
    rows = []
    for category, items in groups.items():
        n = len(items)
        rows.append(
            {
                "category": category,
                "prompts": n,
                # In revision mode the pair is (revision, initial): p_a is p(revision better).
                "mean_p_first": sum(r.preference.judgment.p_a for r in items) / n,
                "first_preferred": sum(r.preference.a_wins for r in items) / n,
                "mean_initial_chars": sum(len(r.revision.chain.initial) for r in items) / n,
                "mean_final_chars": sum(len(r.revision.chain.final) for r in items) / n,
            }
        )
    return rows


def label_signal(preferences: list[Preference]) -> labels.LabelSignal:
    """The signal of a run's labels: every `cai up` path reports it in run.json and its summary."""
    return labels.label_signal(
        [
            (
                p.judgment.p_a,
                [(v.p_first_ab, v.p_first_ba) for v in p.judgment.labels if v.p_first_ba is not None],
            )
            for p in preferences
        ]
    )


async def run(
    stages: Stages,
    config: RunConfig,
    prompts: list[Prompt],
    advance: Callable[[Stage], None] = lambda stage: None,
) -> dict[str, Any]:
    """Run the pipeline over `prompts` and write the run folder; returns run.json's content."""
    started = time.time()
    config.out.mkdir(parents=True, exist_ok=True)
    gate = asyncio.Semaphore(config.concurrency)
    writer = RunWriter(config.out, stages.constitution)

    async def bounded(index: int, prompt: Prompt) -> PromptResult:
        async with gate:
            result = await process_prompt(stages, config, prompt, advance)
        writer.add(index, result)
        return result

    try:
        results = await asyncio.gather(*(bounded(i, r) for i, r in enumerate(prompts)))
    finally:
        writer.close()
    return write_run_info(
        config, results, started, stages.constitution, stages.model_id, stages.engine_config
    )


def write_run_info(
    config: RunConfig,
    results: list[PromptResult],
    started: float,
    c: Constitution,
    model_id: str,
    engine_config: EngineConfig,
    **extra: Any,
) -> dict[str, Any]:
    """Write run.json, last, so a folder without it holds an interrupted run; returns its content."""
    import torch
    import transformers

    run_info = {
        "run_id": config.out.name,
        "created_at": datetime.fromtimestamp(started, UTC).isoformat(),
        "duration_s": round(time.time() - started, 2),
        "model_id": model_id,
        "constitution": {"id": c.id, "version": c.version, "hash": c.hash, "source": c.source},
        "config": {
            **{k: v for k, v in asdict(config).items() if k not in ("out", "prompts")},
            "prompts": str(config.prompts or builtin_prompts_file()),
            "engine": asdict(engine_config),
            **extra,
        },
        "counts": {
            "prompts": len(results),
            "sft": len(results),
            "preferences": len(results),
            "revisions": len(results),
        },
        "summary": summarize(results),
        "signals": label_signal([r.preference for r in results]).to_dict(),
        "versions": {
            "cai": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
    (config.out / "run.json").write_text(json.dumps(run_info, indent=2, ensure_ascii=False) + "\n")
    return run_info


def new_run_dir(root: Path = Path("runs")) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    path, i = root / stamp, 1
    while path.exists():
        path, i = root / f"{stamp}-{i}", i + 1
    return path
