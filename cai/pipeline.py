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
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from cai import __version__
from cai.backends.base import Backend, Completion, SamplingParams
from cai.constitution import Constitution, Conversation
from cai.engine import CAIEngine, ComparisonResult, CritiqueChain, EngineConfig
from cai.errors import InvalidArgument
from cai.jsonl import read_objects
from cai.paths import builtin_prompts_file

PairSource = Literal["revision", "samples"]
RESPONSE_PARAMS = SamplingParams(max_new_tokens=96, temperature=0.7, top_p=0.95)  # the policy's answers
Stage = Literal["responses", "critiques", "judgments"]


@dataclass(frozen=True)
class PromptRecord:
    id: str
    prompt: str
    category: str = "uncategorized"


@dataclass
class RunConfig:
    out: Path
    prompts: Path | None = None  # None: the built-in red-team and benign set
    limit: int | None = None
    rounds: int = 1
    seed: int = 0
    k_principles: int = 1
    debias: bool = True
    cot: bool = False
    pairs: PairSource = "revision"
    response_params: SamplingParams = RESPONSE_PARAMS
    concurrency: int = 32


def load_prompts(path: Path | None, limit: int | None = None) -> list[PromptRecord]:
    """Read a JSONL prompt file: one object per line with `prompt`, optional `id` and `category`.

    Any bad line stops the run with its line number, so no prompt is dropped silently.
    """
    path = path or builtin_prompts_file()
    records: list[PromptRecord] = []
    seen: dict[str, int] = {}
    for number, row in read_objects(path, "--prompts"):
        where = f"{path}:{number}"
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidArgument(f"{where}: prompt: must be a non-empty string")
        prompt_id = str(row.get("id", f"line-{number}"))
        if prompt_id in seen:
            raise InvalidArgument(f"{where}: id: {prompt_id!r} repeats line {seen[prompt_id]}")
        seen[prompt_id] = number
        records.append(PromptRecord(prompt_id, prompt.strip(), str(row.get("category", "uncategorized"))))
    if not records:
        raise InvalidArgument(f"--prompts: {path} holds no prompts")
    return records[:limit] if limit else records


def _digest(*parts: object) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()


def prompt_seed(seed: int, prompt_id: str) -> int:
    """A per-prompt seed, so a prompt's results do not depend on the others in the run."""
    return int(_digest(seed, prompt_id)[:8], 16)


@dataclass
class PromptResult:
    record: PromptRecord
    seed: int
    responses: list[str]
    chain: CritiqueChain
    pair: tuple[str, str]
    judgment: ComparisonResult  # p_a: p(first response of the pair is better)
    policy_version: str


class Stages(Protocol):
    """The three stages a run drives: in this process (`LocalStages`) or through the gRPC services."""

    constitution: Constitution
    model_id: str
    engine_config: EngineConfig

    async def respond(self, conversation: Conversation, params: SamplingParams) -> list[Completion]: ...

    async def critique_revise(self, conversation: Conversation, rounds: int, seed: int) -> CritiqueChain: ...

    async def compare(
        self,
        conversation: Conversation,
        a: str,
        b: str,
        k_principles: int,
        debias: bool,
        cot: bool,
        seed: int,
    ) -> ComparisonResult: ...


class LocalStages:
    """The stages in this process: answers from `policy` (default: the engine's backend, which
    critiques and judges); `cai up --train-steps` gives the policy its own, trained, weights."""

    def __init__(self, engine: CAIEngine, policy: Backend | None = None):
        self.engine = engine
        self.policy = policy or engine.backend
        self.constitution = engine.constitution
        self.model_id = engine.backend.model_id
        self.engine_config = engine.config

    async def respond(self, conversation: Conversation, params: SamplingParams) -> list[Completion]:
        return await self.policy.generate(await self.policy.render(conversation), params)

    async def critique_revise(self, conversation: Conversation, rounds: int, seed: int) -> CritiqueChain:
        return await self.engine.critique_revise(conversation, rounds, seed=seed)

    async def compare(
        self,
        conversation: Conversation,
        a: str,
        b: str,
        k_principles: int,
        debias: bool,
        cot: bool,
        seed: int,
    ) -> ComparisonResult:
        return await self.engine.compare(
            conversation, a, b, k_principles=k_principles, debias=debias, cot=cot, seed=seed
        )


async def process_prompt(
    stages: Stages, config: RunConfig, record: PromptRecord, advance: Callable[[Stage], None]
) -> PromptResult:
    seed = prompt_seed(config.seed, record.id)
    conversation: Conversation = [{"role": "user", "content": record.prompt}]
    n = 2 if config.pairs == "samples" else 1
    completions = await stages.respond(conversation, replace(config.response_params, n=n, seed=seed))
    responses = [c.text.strip() or "(empty response)" for c in completions]
    advance("responses")
    chain = await stages.critique_revise(
        [*conversation, {"role": "assistant", "content": responses[0]}], config.rounds, seed
    )
    advance("critiques")
    # revision pairs: is the revision better than the answer it revised? samples: RL-CAI proper.
    pair = (chain.final, chain.initial) if config.pairs == "revision" else (responses[0], responses[1])
    result = await stages.compare(conversation, *pair, config.k_principles, config.debias, config.cot, seed)
    advance("judgments")
    return PromptResult(record, seed, responses, chain, pair, result, completions[0].policy_version)


def records_of(
    result: PromptResult, c: Constitution, model_id: str, run_id: str
) -> dict[str, dict[str, Any]]:
    rec = result.record
    meta = {
        "prompt_id": rec.id,
        "category": rec.category,
        "constitution_id": c.id,
        "constitution_version": c.version,
        "constitution_hash": c.hash,
        "model_id": model_id,
        "policy_version": result.policy_version,
        "seed": result.seed,
        "run_id": run_id,
        "created_at": datetime.now(UTC).isoformat(),
    }
    prompt = [{"role": "user", "content": rec.prompt}]
    chain_ids = result.chain.principle_ids

    def sample_id(kind: str) -> str:
        # Deterministic: the same prompt, seed, constitution and model give the same id.
        return _digest(kind, result.seed, rec.id, c.hash, model_id)[:24]

    a_wins = result.judgment.p_a >= 0.5
    chosen, rejected = result.pair if a_wins else result.pair[::-1]
    return {
        "sft": {
            "sample_id": sample_id("sft"),
            "prompt": prompt,
            "completion": [{"role": "assistant", "content": result.chain.final}],
            "principle_ids": chain_ids,
            **meta,
        },
        "revision": {
            "sample_id": sample_id("revision"),
            "prompt": prompt,
            "initial": result.chain.initial,
            "steps": [asdict(s) for s in result.chain.steps],
            "final": result.chain.final,
            "principle_ids": chain_ids,
            **meta,
        },
        "preference": {
            "sample_id": sample_id("preference"),
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "p_chosen": result.judgment.p_a if a_wins else 1 - result.judgment.p_a,
            "chosen_is_revision": (chosen == result.chain.final) if len(result.responses) == 1 else None,
            "principle_ids": result.judgment.principle_ids,
            "judgment": [asdict(label) for label in result.judgment.labels],
            "critique_principle_ids": chain_ids,
            **meta,
        },
    }


class RunWriter:
    """Appends each prompt's records as soon as it and every prompt before it are done.

    Files grow while the run goes on (an interrupted run keeps what it finished) and still list
    records in prompt order, so two runs with the same seed give identical files.
    """

    def __init__(self, out: Path, constitution: Constitution):
        names = {"sft": "sft.jsonl", "revision": "revisions.jsonl", "preference": "preferences.jsonl"}
        self.files = {kind: (out / name).open("w", encoding="utf-8") for kind, name in names.items()}
        self.constitution = constitution
        self.run_id = out.name
        self.done: dict[int, dict[str, dict[str, Any]]] = {}
        self.next = 0

    def add(self, index: int, result: PromptResult, model_id: str) -> None:
        self.done[index] = records_of(result, self.constitution, model_id, self.run_id)
        while self.next in self.done:
            for kind, record in self.done.pop(self.next).items():
                self.files[kind].write(json.dumps(record, ensure_ascii=False) + "\n")
                self.files[kind].flush()
            self.next += 1

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def summarize(results: list[PromptResult]) -> list[dict[str, Any]]:
    """One row per prompt category and one for all prompts."""
    groups: dict[str, list[PromptResult]] = {}
    for r in results:
        groups.setdefault(r.record.category, []).append(r)
    groups["all"] = results
    rows = []
    for category, items in groups.items():
        n = len(items)
        rows.append(
            {
                "category": category,
                "prompts": n,
                # In revision mode the pair is (revision, initial): p_a is p(revision better).
                "mean_p_first": sum(r.judgment.p_a for r in items) / n,
                "first_preferred": sum(r.judgment.p_a >= 0.5 for r in items) / n,
                "mean_initial_chars": sum(len(r.chain.initial) for r in items) / n,
                "mean_final_chars": sum(len(r.chain.final) for r in items) / n,
            }
        )
    return rows


async def run(
    stages: Stages,
    config: RunConfig,
    prompts: list[PromptRecord],
    advance: Callable[[Stage], None] = lambda stage: None,
) -> dict[str, Any]:
    """Run the pipeline over `prompts` and write the run folder; returns run.json's content."""
    started = time.time()
    config.out.mkdir(parents=True, exist_ok=True)
    gate = asyncio.Semaphore(config.concurrency)
    writer = RunWriter(config.out, stages.constitution)

    async def bounded(index: int, record: PromptRecord) -> PromptResult:
        async with gate:
            result = await process_prompt(stages, config, record, advance)
        writer.add(index, result, stages.model_id)
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
