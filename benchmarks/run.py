"""Benchmarks of the foundation (batching, judging, memory) and of the gRPC services.

Run with `make bench` (or `.venv/bin/python -m benchmarks.run [--only NAME ...]`). Each benchmark
runs its variants side by side in one process on the same inputs and reports ratios, because
shared machines are noisy. Results print as a table and go to `benchmarks/results/<name>.json`.
The service benchmarks (service-overhead, grpc-vs-inprocess, langchain-peer) live in
`benchmarks/services.py`, the Kafka ones (kafka-ceiling, kafka-latency, kafka-vs-inprocess) in
`benchmarks/kafka.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from cai import constitution, labels, prompting
from cai.backends.base import SamplingParams
from cai.backends.transformers import TransformersBackend
from cai.engine import CAIEngine
from cai.models import setup_default_model
from cai.pipeline import load_prompts

RESULTS = Path(__file__).parent / "results"
_ANSWER = re.compile(r"answer is:?\s*\(?([AB])\b")
console = Console(width=150)


def machine() -> dict[str, Any]:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }


def save(name: str, rows: list[dict[str, Any]], extra: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    payload = {"benchmark": name, "machine": machine(), **extra, "rows": rows}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")


def show(title: str, rows: list[dict[str, Any]]) -> None:
    table = Table(*rows[0].keys(), title=title)
    for row in rows:
        table.add_row(*(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()))
    console.print(table)


async def timed(make: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = await make()
    return time.perf_counter() - start, result


# ---- batching -----------------------------------------------------------------------------


async def bench_batching(backend: TransformersBackend, requests: int, max_new_tokens: int) -> None:
    prompts = [
        await backend.render([{"role": "user", "content": r.text}])
        for r in load_prompts(None)
        if r.category == "benign"
    ][:requests]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.7, top_p=0.95, seed=0)
    await backend.generate(prompts[0], SamplingParams(max_new_tokens=4))  # warm up

    async def one_by_one() -> list[Any]:
        return [await backend.generate(p, params) for p in prompts]

    async def concurrent() -> list[Any]:
        return list(await asyncio.gather(*(backend.generate(p, params) for p in prompts)))

    rows: list[dict[str, Any]] = []
    for name, run in (("sequential", one_by_one), ("concurrent (dynamic batching)", concurrent)):
        seconds, results = await timed(run)
        tokens = sum(c.tokens for r in results for c in r)
        rows.append(
            {
                "mode": name,
                "requests": len(prompts),
                "tokens": tokens,
                "seconds": seconds,
                "tokens_per_s": tokens / seconds,
            }
        )
    ratio = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    for row in rows:
        row["ratio"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    show(f"batching: {requests} generate requests, max_new_tokens={max_new_tokens}", rows)
    save("batching", rows, {"ratio": ratio, "target": ">= 3x", "max_new_tokens": max_new_tokens})


# ---- judging ------------------------------------------------------------------------------

Pair = tuple[list[dict[str, str]], str, str]


async def sample_pairs(backend: TransformersBackend, pairs: int, answer_tokens: int) -> list[Pair]:
    """Two sampled answers (seeded) to each of the first `pairs` built-in prompts."""
    records = (load_prompts(None) * (pairs // 80 + 1))[:pairs]
    # Rendered first: an `await` inside the generator below would make it an async generator,
    # which gather cannot unpack.
    rendered = [await backend.render([{"role": "user", "content": r.text}]) for r in records]
    responses = await asyncio.gather(
        *(
            backend.generate(prompt, SamplingParams(max_new_tokens=answer_tokens, n=2, seed=i))
            for i, prompt in enumerate(rendered)
        )
    )
    return [
        ([{"role": "user", "content": r.text}], c[0].text, c[1].text)
        for r, c in zip(records, responses, strict=True)
    ]


def cold(backend: TransformersBackend) -> None:
    """Empty the prefix cache, so a timed run only reuses what it computes itself."""
    if backend.prefix_cache is not None:
        backend.prefix_cache.clear()


async def bench_judging(
    backend: TransformersBackend, pairs: int, answer_tokens: int = 48, rationale_tokens: int = 64
) -> None:
    """Labels per second on the same pairs: log-prob scoring vs two generating judges."""
    cons = constitution.load("default")
    engine = CAIEngine(backend, cons)
    items = await sample_pairs(backend, pairs, answer_tokens)
    question = cons.comparison_principles[0].comparison or ""
    examples = cons.comparison_examples[: engine.config.few_shot_comparison]

    async def base_prompt(conv: Any, a: str, b: str) -> str:
        turns = prompting.comparison_messages(cons, examples, conv, question, a, b, cot=False)
        return await backend.render(turns)

    # Each judge returns (label, or None when its output cannot be parsed; tokens it generated).
    Result = tuple[float | None, int]

    async def logprob_judge() -> list[Result]:
        async def one(conv: Any, a: str, b: str) -> Result:
            prompt = (await base_prompt(conv, a, b)) + prompting.ANSWER_PREFIX
            la, lb = await backend.score_options(prompt, ["A", "B"])
            return labels.option_probability(la, lb), 0

        return list(await asyncio.gather(*(one(*it) for it in items)))

    async def one_token_judge() -> list[Result]:
        async def one(conv: Any, a: str, b: str) -> Result:
            params = SamplingParams(max_new_tokens=1, temperature=0)
            [c] = await backend.generate((await base_prompt(conv, a, b)) + prompting.ANSWER_PREFIX, params)
            answer = c.text.strip()[:1]
            return (1.0 if answer == "A" else 0.0 if answer == "B" else None), c.tokens

        return list(await asyncio.gather(*(one(*it) for it in items)))

    async def rationale_judge() -> list[Result]:
        async def one(conv: Any, a: str, b: str) -> Result:
            # One generation: its reasoning, then "The answer is: (X)" in the few-shot's format.
            prompt = (await base_prompt(conv, a, b)) + prompting.COT_PREFIX
            params = SamplingParams(max_new_tokens=rationale_tokens, temperature=0)
            [c] = await backend.generate(prompt, params)
            found = _ANSWER.search(c.text)
            return (None if not found else 1.0 if found.group(1) == "A" else 0.0), c.tokens

        return list(await asyncio.gather(*(one(*it) for it in items)))

    judges = (
        ("log-prob of option tokens (ours)", logprob_judge, "yes"),
        ("generate 1 token, parse A/B", one_token_judge, "no"),
        (f"writes a rationale (<= {rationale_tokens} tokens), then answers", rationale_judge, "no"),
    )
    for _, run, _ in judges:  # warm up every path
        await run()
    # Two rounds, the judges taking turns in each, from an empty prefix cache every time; each
    # keeps its best run: the machine is shared, and turns spread its load over all of them.
    runs: dict[str, list[tuple[float, list[Result]]]] = {name: [] for name, _, _ in judges}
    for _ in range(2):
        for name, run, _ in judges:
            cold(backend)
            runs[name].append(await timed(run))
    rows: list[dict[str, Any]] = []
    for name, _, soft in judges:
        seconds, results = min(runs[name], key=lambda r: r[0])
        parsed = [label for label, _ in results if label is not None]
        rows.append(
            {
                "judge": name,
                "pairs": len(items),
                "seconds": seconds,
                "all runs s": " / ".join(f"{s:.1f}" for s, _ in runs[name]),
                "labels_per_s": len(items) / seconds,
                "new_tokens_per_label": sum(tokens for _, tokens in results) / len(items),
                "parsed": f"{len(parsed)}/{len(items)}",
                "soft_labels": soft,
            }
        )
    for row in rows:
        row["ours_vs_this"] = rows[0]["labels_per_s"] / row["labels_per_s"]
    cache = "on" if backend.prefix_cache is not None else "off"
    show(f"judging: {len(items)} pairs, one ordering each, prefix cache {cache}", rows)
    targets = {"vs one-token judge": ">= 1.0x", "vs rationale judge": ">= 5x"}
    save("judging", rows, {"targets": targets, "prefix_cache": cache, "dtype": str(backend.dtype)})


async def bench_prefix_cache(
    on: TransformersBackend, off: TransformersBackend, pairs: int, rounds: int = 2
) -> None:
    """Debiased labels per second (engine.compare, both orderings) with the prefix cache on and off.

    The cache is emptied before every run: a run reuses only the states it computed itself (the
    system message and few-shot example of every prompt, the conversation both orderings share).
    The two take turns for `rounds` rounds (off, on, on, off, ...) and each keeps its best run.
    """
    cons = constitution.load("default")
    items = await sample_pairs(on, pairs, 48)
    backends = {"off": off, "on": on}
    engines = {name: CAIEngine(backend, cons) for name, backend in backends.items()}
    counters = ("hits", "misses", "reused_tokens", "computed_tokens")
    seconds: dict[str, list[float]] = {name: [] for name in backends}
    results: dict[str, list[float]] = {}
    counted: dict[str, list[int]] = {}
    for engine in engines.values():
        await engine.compare(*items[0])  # warm up
    for round_ in range(rounds):
        for name in ("off", "on") if round_ % 2 == 0 else ("on", "off"):
            engine, cache = engines[name], backends[name].prefix_cache
            cold(backends[name])
            before = [getattr(cache, c) for c in counters] if cache is not None else []
            start = time.perf_counter()
            found = await asyncio.gather(
                *(engine.compare(c, a, b, seed=i) for i, (c, a, b) in enumerate(items))
            )
            seconds[name].append(time.perf_counter() - start)
            results[name] = [r.p_a for r in found]
            if cache is not None:
                counted[name] = [getattr(cache, c) - b for c, b in zip(counters, before, strict=True)]
    rows: list[dict[str, Any]] = []
    for name in backends:
        best = min(seconds[name])
        row: dict[str, Any] = {"prefix cache": name, "pairs": len(items), "best s": best}
        row["all runs s"] = " / ".join(f"{x:.1f}" for x in seconds[name])
        row["labels_per_s"] = len(items) / best
        row["prompts hit / missed"] = row["prompt tokens reused"] = "-"
        if name in counted:  # the counters of its last run
            hits, misses, reused, computed = counted[name]
            row["prompts hit / missed"] = f"{hits}/{misses}"
            row["prompt tokens reused"] = f"{reused / (reused + computed):.0%}"
        rows.append(row)
    for row in rows:
        row["vs off"] = row["labels_per_s"] / rows[0]["labels_per_s"]
    difference = max(abs(x - y) for x, y in zip(results["on"], results["off"], strict=True))
    show(
        f"prefix-cache: {len(items)} debiased labels, {on.dtype}, max |on - off| label {difference:.2g}", rows
    )
    extra = {"target": ">= 2.5x", "ratio": rows[1]["vs off"], "max_label_difference": difference}
    save("prefix-cache", rows, {**extra, "dtype": str(on.dtype), "load_average_1m": os.getloadavg()[0]})


class _RoundedHead(TransformersBackend):
    """The backend as it was before: option log-probs from logits in the model's own dtype."""

    def _token_logprobs(self, hidden: Any, tokens: Any) -> Any:
        import torch

        head = self._base().get_output_embeddings()
        return torch.log_softmax(head(hidden).float(), dim=-1).gather(1, tokens)


async def bench_exact_labels(model: str, pairs: int, answer_tokens: int = 32) -> None:
    """Debiased labels of the same pairs in float32 and in bfloat16: the largest difference."""
    exact = TransformersBackend(model, dtype="float32")
    items = await sample_pairs(exact, pairs, answer_tokens)
    cons = constitution.load("default")

    async def judge(backend: TransformersBackend) -> list[float]:
        engine = CAIEngine(backend, cons)
        found = await asyncio.gather(*(engine.compare(c, a, b, seed=i) for i, (c, a, b) in enumerate(items)))
        return [r.p_a for r in found]

    reference = await judge(exact)
    await exact.close()
    rows: list[dict[str, Any]] = []
    for name, kind in (
        ("bfloat16, LM head in float32 (ours)", TransformersBackend),
        ("bfloat16, LM head in bfloat16 (before)", _RoundedHead),
    ):
        backend = kind(model, dtype="bfloat16")
        found = await judge(backend)
        await backend.close()
        differences = sorted(abs(x - y) for x, y in zip(found, reference, strict=True))
        rows.append(
            {
                "labels": name,
                "pairs": len(items),
                "max abs difference": differences[-1],
                "mean abs difference": sum(differences) / len(differences),
                "pairs within 0.01": f"{sum(d <= 0.01 for d in differences)}/{len(differences)}",
            }
        )
    show(f"exact-labels: debiased labels bfloat16 vs float32 on {len(items)} pairs", rows)
    save(
        "exact-labels",
        rows,
        {"target": "max abs difference <= 0.01", "met": rows[0]["max abs difference"] <= 0.01},
    )


# ---- continuous batching -------------------------------------------------------------------


async def bench_ttft(
    backend: TransformersBackend, running: int = 4, max_new_tokens: int = 128, rounds: int = 3
) -> None:
    """Time to first token of a request that arrives while a batch of `running` generations of
    `max_new_tokens` tokens decodes: joining it at the next step (continuous batching) vs waiting
    for it to end (run to completion). The modes take turns; each keeps its best run."""
    texts = [r.text for r in load_prompts(None) if r.category == "benign"]
    batch_prompts = [await backend.render([{"role": "user", "content": t}]) for t in texts[:running]]
    newcomer = await backend.render([{"role": "user", "content": texts[running]}])
    # Sampled, seeded: long answers that rarely stop before max_new_tokens.
    long_params = [
        SamplingParams(max_new_tokens=max_new_tokens, temperature=0.7, seed=i) for i in range(running)
    ]
    loop = asyncio.get_running_loop()
    ttft: dict[str, list[float]] = {"continuous": [], "run to completion": []}
    batch_seconds: dict[str, list[float]] = {name: [] for name in ttft}
    tokens: dict[str, int] = {}
    await backend.generate(newcomer, SamplingParams(max_new_tokens=2))  # warm up
    for round_ in range(rounds):
        for name in list(ttft) if round_ % 2 == 0 else list(ttft)[::-1]:
            backend.continuous_batching = name == "continuous"
            admitted = asyncio.Event()
            backend.on_batch = lambda rows, event=admitted: loop.call_soon_threadsafe(event.set)
            start = time.perf_counter()
            batch = asyncio.gather(
                *(backend.generate(p, q) for p, q in zip(batch_prompts, long_params, strict=True))
            )
            await admitted.wait()
            backend.on_batch = None
            await asyncio.sleep(0.5)  # a few decode steps into the batch
            arrived = time.perf_counter()
            first: float | None = None
            async for _ in backend.generate_stream(newcomer, SamplingParams(max_new_tokens=4, temperature=0)):
                first = first or time.perf_counter() - arrived
            assert first is not None
            ttft[name].append(first)
            results = await batch
            batch_seconds[name].append(time.perf_counter() - start)
            tokens[name] = sum(c.tokens for r in results for c in r)
    backend.continuous_batching = True
    rows: list[dict[str, Any]] = [
        {
            "mode": name,
            "batch rows": running,
            "batch tokens": tokens[name],
            "best batch s": min(batch_seconds[name]),
            "all TTFT s": " / ".join(f"{x:.2f}" for x in ttft[name]),
            "best TTFT s": min(ttft[name]),
        }
        for name in ttft
    ]
    ratio = rows[1]["best TTFT s"] / rows[0]["best TTFT s"]
    show(f"ttft: a request arriving 0.5 s into a batch of {running} x {max_new_tokens} tokens; "
         f"run to completion / continuous = {ratio:.1f}x", rows)  # fmt: skip
    save("ttft", rows, {"target": ">= 5x shorter", "ratio": ratio, "dtype": str(backend.dtype)})


async def bench_up(model: str, limit: int, rounds: int = 1, dtype: str = "float32") -> None:
    """`cai up --limit N --train-steps 0`'s pipeline (one backend for policy, critique and judge)
    with the prefix cache and continuous batching on vs both off, greedy decoding everywhere, so
    in float32 the two must write the same records (in bfloat16 a different batch shape rounds
    differently, and greedy picks can flip). The variants take turns; each keeps its best run."""
    from dataclasses import replace

    from cai.engine import EngineConfig
    from cai.pipeline import LocalStages, RunConfig
    from cai.pipeline import run as run_pipeline

    cons = constitution.load("default")
    records = load_prompts(None, limit)
    greedy = EngineConfig()
    greedy = replace(
        greedy,
        critique_params=replace(greedy.critique_params, temperature=0.0),
        revision_params=replace(greedy.revision_params, temperature=0.0),
    )
    backends = {
        "on": TransformersBackend(model, dtype=dtype),
        "off": TransformersBackend(model, dtype=dtype, prefix_cache=False, continuous_batching=False),
    }
    seconds: dict[str, list[float]] = {name: [] for name in backends}
    written: dict[str, dict[str, list[dict[str, Any]]]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(rounds):
            for name in ("off", "on") if round_ % 2 == 0 else ("on", "off"):
                out = Path(scratch) / f"{name}-{round_}"
                config = RunConfig(
                    out=out, response_params=replace(RunConfig.response_params, temperature=0.0)
                )
                stages = LocalStages(CAIEngine(backends[name], cons, greedy))
                start = time.perf_counter()
                await run_pipeline(stages, config, records)
                seconds[name].append(time.perf_counter() - start)
                written[name] = {
                    f: [json.loads(line) for line in (out / f).read_text().splitlines()]
                    for f in ("sft.jsonl", "preferences.jsonl", "revisions.jsonl")
                }
    for backend in backends.values():
        await backend.close()

    def texts(rows: list[dict[str, Any]]) -> list[Any]:
        # Everything but the run's own name and time and the labels' last digits (compared below).
        varies = ("run_id", "created_at", "p_chosen", "p_a", "judgment")
        return [{k: v for k, v in r.items() if k not in varies} for r in rows]

    same = all(texts(written["on"][f]) == texts(written["off"][f]) for f in written["on"])
    labels_on = [r.get("p_chosen", 0.0) for r in written["on"]["preferences.jsonl"]]
    labels_off = [r.get("p_chosen", 0.0) for r in written["off"]["preferences.jsonl"]]
    label_difference = max((abs(a - b) for a, b in zip(labels_on, labels_off, strict=True)), default=0.0)
    rows: list[dict[str, Any]] = []
    for name, label in (("off", "prefix cache and continuous batching off"), ("on", "both on (default)")):
        best = min(seconds[name])
        rows.append(
            {
                "variant": label,
                "prompts": len(records),
                "all runs s": " / ".join(f"{x:.1f}" for x in seconds[name]),
                "best s": best,
                "speed-up": min(seconds["off"]) / best,
            }
        )
    title = f"up: cai up's pipeline on {len(records)} prompts, greedy, {backends['on'].dtype}"
    show(f"{title}; records identical: {same}, max label difference {label_difference:.2g}", rows)
    extra = {"target": ">= 1.5x", "ratio": rows[1]["speed-up"], "records_identical": same}
    dtype_name = str(backends["on"].dtype).removeprefix("torch.")
    save(f"up-{dtype_name}", rows, {**extra, "max_label_difference": label_difference, "dtype": dtype_name})


# ---- memory -------------------------------------------------------------------------------


def bench_memory(limit: int) -> None:
    """Peak RSS and wall time of `cai up --limit N`: the default dtype next to float32."""
    rows: list[dict[str, Any]] = []
    for dtype in ("auto", "float32"):
        with tempfile.TemporaryDirectory() as out:
            command = [
                "cai",
                "up",
                "--limit",
                str(limit),
                "--out",
                out,
                "--dtype",
                dtype,
                "--train-steps",
                "0",
            ]
            start = time.perf_counter()
            child = subprocess.Popen(
                [sys.executable, "-m", "cli.main", *command[1:]],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            _, status, usage = os.wait4(child.pid, 0)  # this child's own peak, not all children's
            seconds = time.perf_counter() - start
            if status != 0:
                raise SystemExit(
                    f"{' '.join(command)} failed: {child.stderr.read().decode() if child.stderr else ''}"
                )
        # ru_maxrss is in KiB on Linux, bytes on macOS
        peak_gb = usage.ru_maxrss / 1e9 if sys.platform == "darwin" else usage.ru_maxrss * 1024 / 1e9
        rows.append(
            {"command": " ".join(command[:4] + command[6:]), "peak_rss_gb": peak_gb, "seconds": seconds}
        )
    for row in rows:
        row["time_vs_default"] = row["seconds"] / rows[0]["seconds"]
    show("memory and time of cai up", rows)
    save("memory", rows, {"target": "<= 2 GB peak RSS with the defaults"})


FOUNDATION = ["batching", "ttft", "judging", "prefix-cache", "exact-labels", "up", "memory"]
SERVICES = ["service-overhead", "grpc-vs-inprocess", "langchain-peer"]
KAFKA = ["kafka-ceiling", "kafka-latency", "kafka-vs-inprocess"]
TRAINER = ["distributed"]  # benchmarks/distributed.py: torchrun children, the trainer only


def report(name: str, title: str, result: dict[str, Any], load_before: tuple[float, ...]) -> None:
    """Print a service benchmark's table and save its JSON (rows plus every other field)."""
    rows = result.pop("rows")
    # The machine is shared: the 1-minute load average before and after tells how busy it was.
    result["load_average_1m"] = {"before": load_before[0], "after": os.getloadavg()[0]}
    show(title, rows)
    met = result.get("met")
    if met is not None:
        console.print(f"target {result['target']}: {'met' if met else 'NOT met'}")
    save(name, rows, result)


def run_services(args: argparse.Namespace, chosen: list[str], model: str, backend: Any) -> None:
    from benchmarks import services

    if "service-overhead" in chosen:
        load = os.getloadavg()
        result = services.bench_service_overhead(args.callers, args.duration, args.warmup_calls)
        report(
            "service-overhead",
            f"service-overhead: Critique on FakeBackend, {args.callers} callers, {args.duration:g} s per run",
            result,
            load,
        )
    if "grpc-vs-inprocess" in chosen:
        load = os.getloadavg()
        result = asyncio.run(
            services.bench_grpc_vs_inprocess(backend, args.critiques, 16, args.critique_tokens, args.rounds)
        )
        report(
            "grpc-vs-inprocess",
            f"grpc-vs-inprocess: {args.critiques} critiques, 16 callers, "
            f"max_new_tokens={args.critique_tokens}, {result['dtype']}",
            result,
            load,
        )
    if "langchain-peer" in chosen:
        load = os.getloadavg()
        result = services.bench_langchain_peer(
            model,
            args.peer_items,
            args.peer_callers,
            args.peer_tokens,
            args.peer_dtype,
            not args.peer_skip_alone,
        )
        report(
            "langchain-peer",
            f"langchain-peer: {args.peer_items} items, one critique + one revision each (ours: Critique and "
            f"Revise RPCs; LangChain: ConstitutionalChain), max_new_tokens={args.peer_tokens}, "
            f"{args.peer_dtype}",
            result,
            load,
        )


def run_kafka(args: argparse.Namespace, chosen: list[str], backend: Any) -> None:
    from benchmarks import kafka

    if "kafka-ceiling" in chosen:
        load = os.getloadavg()
        result = kafka.bench_ceiling(args.kafka_records, args.kafka_in_flight)
        title = f"kafka-ceiling: {args.kafka_records} prompts, {kafka.PARTITIONS} partitions, FakeBackend"
        report("kafka-ceiling", title, result, load)
    if "kafka-latency" in chosen:
        load = os.getloadavg()
        result = kafka.bench_latency(args.kafka_rate, args.kafka_seconds)
        title = "kafka-latency: prompt produced -> preference produced, policy and judge stages, FakeBackend"
        report("kafka-latency", title, result, load)
    if "kafka-vs-inprocess" in chosen:
        load = os.getloadavg()
        result = kafka.bench_vs_inprocess(backend, args.kafka_prompts, args.kafka_rounds)
        title = f"kafka-vs-inprocess: cai up's pipeline on {args.kafka_prompts} prompts, real model"
        report("kafka-vs-inprocess", title, result, load)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=FOUNDATION + SERVICES + KAFKA + TRAINER)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=16, help="judging and prefix-cache: pairs")
    parser.add_argument("--label-pairs", type=int, default=64, help="exact-labels: pairs")
    parser.add_argument("--cache-rounds", type=int, default=2, help="prefix-cache: runs of each side")
    parser.add_argument("--memory-limit", type=int, default=8)
    parser.add_argument("--ttft-rounds", type=int, default=3, help="ttft: runs of each mode")
    parser.add_argument("--up-limit", type=int, default=8, help="up: prompts")
    parser.add_argument("--up-rounds", type=int, default=1, help="up: runs of each variant")
    parser.add_argument(
        "--up-dtype", default="float32", choices=["auto", "float32", "bfloat16"], help="up: dtype"
    )
    group = parser.add_argument_group("service benchmarks")
    group.add_argument("--callers", type=int, default=32, help="service-overhead: concurrent callers")
    group.add_argument("--duration", type=float, default=5.0, help="service-overhead: seconds per run")
    group.add_argument("--warmup-calls", type=int, default=2000, help="service-overhead: ghz warm-up calls")
    group.add_argument("--critiques", type=int, default=32, help="grpc-vs-inprocess: requests per run")
    group.add_argument("--rounds", type=int, default=3, help="grpc-vs-inprocess: runs of each path")
    group.add_argument("--critique-tokens", type=int, default=32, help="grpc-vs-inprocess: max_new_tokens")
    group.add_argument("--peer-items", type=int, default=8, help="langchain-peer: items")
    group.add_argument("--peer-callers", type=int, default=8, help="langchain-peer: concurrency, both sides")
    group.add_argument("--peer-tokens", type=int, default=48, help="langchain-peer: max_new_tokens")
    group.add_argument(
        "--peer-skip-alone", action="store_true", help="langchain-peer: skip LangChain with one caller"
    )
    group.add_argument("--peer-dtype", default="float32", choices=["float32", "bfloat16"])
    group = parser.add_argument_group("kafka benchmarks")
    group.add_argument("--kafka-records", type=int, default=20000, help="kafka-ceiling: prompts")
    group.add_argument(
        "--kafka-in-flight",
        type=int,
        nargs="+",
        default=[8, 64, 512],
        help="kafka-ceiling: max_in_flight values",
    )
    group.add_argument("--kafka-rate", type=float, default=50.0, help="kafka-latency: prompts per second")
    group.add_argument("--kafka-seconds", type=float, default=20.0, help="kafka-latency: seconds of prompts")
    group.add_argument("--kafka-prompts", type=int, default=8, help="kafka-vs-inprocess: prompts per run")
    group.add_argument("--kafka-rounds", type=int, default=2, help="kafka-vs-inprocess: runs of each path")
    args = parser.parse_args()
    chosen = args.only or FOUNDATION + SERVICES + KAFKA + TRAINER
    model = str(setup_default_model(progress=lambda _: None))
    if "distributed" in chosen:  # in children of its own, before this process loads a model
        from benchmarks import distributed

        distributed.main(["--model", model])
    if "memory" in chosen:  # first, in a fresh child, before this process loads anything
        bench_memory(args.memory_limit)
    if "service-overhead" in chosen:  # before a model is loaded into this process
        run_services(args, ["service-overhead"], model, None)
    backend = None
    if {"kafka-ceiling", "kafka-latency"} & set(chosen):  # FakeBackend only: before the model loads
        run_kafka(args, [c for c in chosen if c in ("kafka-ceiling", "kafka-latency")], None)
    if {"batching", "ttft", "judging", "grpc-vs-inprocess", "kafka-vs-inprocess"} & set(chosen):
        backend = TransformersBackend(model)
        console.print(f"model {model} on {backend.device} {backend.dtype}")
        if "batching" in chosen:
            asyncio.run(bench_batching(backend, args.requests, args.max_new_tokens))
        if "ttft" in chosen:
            asyncio.run(bench_ttft(backend, rounds=args.ttft_rounds))
        if "judging" in chosen:
            asyncio.run(bench_judging(backend, args.pairs))
    if "prefix-cache" in chosen:
        on = backend or TransformersBackend(model)
        off = TransformersBackend(model, prefix_cache=False)
        asyncio.run(bench_prefix_cache(on, off, args.pairs, args.cache_rounds))
    if "exact-labels" in chosen:
        asyncio.run(bench_exact_labels(model, args.label_pairs))
    if "up" in chosen:
        asyncio.run(bench_up(model, args.up_limit, args.up_rounds, args.up_dtype))
    served = [c for c in chosen if c in ("grpc-vs-inprocess", "langchain-peer")]
    if served:  # imports the services: only when asked for
        run_services(args, served, model, backend)
    if "kafka-vs-inprocess" in chosen:
        run_kafka(args, ["kafka-vs-inprocess"], backend)


if __name__ == "__main__":
    main()
