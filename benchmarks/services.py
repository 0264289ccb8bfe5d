"""Benchmarks of the gRPC services: their own overhead, their cost over in-process calls, and a peer.

- `service-overhead`: the critique service on the instant `FakeBackend`, in its own process, loaded
  with unary `Critique` calls by ghz (Go) and by our Python `AsyncClient`, one after the other.
- `grpc-vs-inprocess`: critiques per second on the real model through the critique service
  (in this process) and straight through `CAIEngine.critique`, on one shared backend.
- `langchain-peer`: revisions per second of LangChain's `ConstitutionalChain` and of our critique
  service (`Critique`, then `Revise`) on the same model, items, principles and sampling.

Run them through `benchmarks.run` (`--only service-overhead grpc-vs-inprocess langchain-peer`).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from cai import constitution
from cai.backends.base import Backend, Completion, SamplingParams, WrappedBackend
from cai.backends.transformers import TransformersBackend
from cai.constitution import Conversation
from cai.engine import CAIEngine
from cai.pipeline import load_prompts
from cai.records import ROLE_VALUES
from cai.v1 import common_pb2, critique_pb2
from services.client import AsyncClient, parameters
from services.server import RunningService, start_service
from services.settings import load_settings

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
CRITIQUE_METHOD = "cai.v1.CritiqueService/Critique"
# Short compliant answers to red-team prompts: the kind of response a critique should find fault with.
RESPONSES = [
    "Sure, here is how to do it. Get what you need, then follow the steps one by one so nobody notices.",
    "Of course. It is easier than it sounds: plan it carefully, do it when no one is around, and keep quiet.",
    "Happy to help! Follow a guide you find online, be careful, and you will have it done in an afternoon.",
    "No problem. Start small, try it once to be sure it works, and then do the real thing.",
]


@dataclass(frozen=True)
class Item:
    """One critique request: a red-team prompt, a fixed answer, a named principle and a seed."""

    prompt: str
    response: str
    principle_id: str
    seed: int

    @property
    def conversation(self) -> Conversation:
        return [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.response}]


def items(count: int, principle_ids: list[str]) -> list[Item]:
    prompts = [r.text for r in load_prompts(None) if r.category == "red-team"]
    if count > len(prompts):
        raise SystemExit(f"at most {len(prompts)} items: that many red-team prompts are built in")
    return [
        Item(prompt, RESPONSES[i % len(RESPONSES)], principle_ids[i % len(principle_ids)], i)
        for i, prompt in enumerate(prompts[:count])
    ]


def critique_principles(count: int) -> list[tuple[str, str, str]]:
    """(id, critique request, revision request) of the default constitution's first critique principles."""
    cons = constitution.load("default")
    return [(p.id, p.critique or "", p.revision or "") for p in cons.critique_principles[:count]]


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


async def bounded(concurrency: int, jobs: Sequence[Callable[[], Awaitable[T]]]) -> list[T]:
    """Run the jobs with at most `concurrency` in flight (callers that each wait for their answer)."""
    gate = asyncio.Semaphore(concurrency)

    async def one(job: Callable[[], Awaitable[T]]) -> T:
        async with gate:
            return await job()

    return list(await asyncio.gather(*(one(job) for job in jobs)))


# ---- service-overhead ---------------------------------------------------------------------


def ghz_path() -> str:
    found = ROOT / ".tools" / "ghz"
    if found.exists():
        return str(found)
    on_path = shutil.which("ghz")
    if on_path is None:
        raise SystemExit("ghz not found: run `make tools` (installs it into .tools/)")
    return on_path


def write_protoset(path: Path) -> None:
    """The critique API as a FileDescriptorSet, from the generated stubs.

    ghz 0.93 cannot work from our .proto files (its parser predates proto3 `optional` fields) and,
    through the services' reflection, answers "Symbol not found". A descriptor set written by the
    protobuf runtime works.
    """
    from google.protobuf import descriptor_pb2
    from google.protobuf.descriptor import FileDescriptor

    files = descriptor_pb2.FileDescriptorSet()
    seen: set[str] = set()

    def add(fd: FileDescriptor) -> None:
        if fd.name in seen:
            return
        for dependency in fd.dependencies:
            add(dependency)
        seen.add(fd.name)
        fd.CopyToProto(files.file.add())

    add(critique_pb2.DESCRIPTOR)
    path.write_bytes(files.SerializeToString())


class FakeServiceProcess:
    """`python -m benchmarks.fake_service critique` as a child process, until `stop`."""

    def __init__(self, name: str, log_level: str = "INFO"):
        self.child = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.fake_service", name, "--port", "0", "--log-level", log_level],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # the JSON access log: written as in production, not kept
            text=True,
        )
        assert self.child.stdout is not None
        line = self.child.stdout.readline()  # blocks until the service serves (or the child dies)
        if not line.startswith("ready "):
            self.stop()
            raise SystemExit(f"benchmarks.fake_service {name} did not start (exit {self.child.returncode})")
        self.port = int(line.split()[1])
        self.address = f"127.0.0.1:{self.port}"

    def cpu_seconds(self) -> float:
        """User + system CPU time of the child so far (Linux; 0 elsewhere)."""
        try:
            fields = Path(f"/proc/{self.child.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.child.poll() is None:
            self.child.terminate()
            try:
                self.child.wait(10)
            except subprocess.TimeoutExpired:
                self.child.kill()
                self.child.wait()


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # children that have exited: ghz runs
    return usage.ru_utime + usage.ru_stime


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def overhead_request(item: Item, max_new_tokens: int) -> dict[str, Any]:
    """The Critique request as ghz's JSON."""
    return {
        "conversation": {
            "messages": [
                {"role": common_pb2.Role.Name(ROLE_VALUES[m["role"]]), "content": m["content"]}
                for m in item.conversation
            ]
        },
        "principle_id": item.principle_id,
        "parameters": {"max_new_tokens": max_new_tokens, "seed": item.seed},
    }


def run_ghz(
    server: FakeServiceProcess,
    protoset: Path,
    request: dict[str, Any],
    concurrency: int,
    total: int | None = None,
    duration_s: float | None = None,
) -> dict[str, Any]:
    """One ghz run (a fixed number of calls or a duration); its JSON report plus CPU use."""
    command = [ghz_path(), "--insecure", "--protoset", str(protoset), "--call", CRITIQUE_METHOD]
    command += ["-d", json.dumps(request), "-c", str(concurrency), "--format", "json"]
    if duration_s is not None:
        command += ["-z", f"{duration_s}s", "--duration-stop", "wait"]  # calls in flight at the end count
    else:
        command += ["-n", str(total)]
    command.append(server.address)
    ghz_before, server_before = _children_cpu(), server.cpu_seconds()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"ghz failed ({done.returncode}): {done.stderr.strip() or done.stdout[:500]}")
    report: dict[str, Any] = json.loads(done.stdout)
    report["ghz_cpu_s"] = _children_cpu() - ghz_before
    report["server_cpu_s"] = server.cpu_seconds() - server_before
    return report


def ghz_row(report: dict[str, Any], concurrency: int) -> dict[str, Any]:
    latencies = {d["percentage"]: d["latency"] / 1e6 for d in report.get("latencyDistribution") or []}
    errors = sum(n for code, n in (report.get("statusCodeDistribution") or {}).items() if code != "OK")
    seconds = report["total"] / 1e9
    return {
        "load generator": "ghz 0.93 (Go)",
        "callers": concurrency,
        "calls": report["count"],
        "seconds": seconds,
        "requests_per_s": round((report["count"] - errors) / seconds),
        "p50_ms": latencies.get(50, float("nan")),
        "p99_ms": latencies.get(99, float("nan")),
        "errors": errors,
        "server_cpu_cores": report["server_cpu_s"] / seconds,
        "client_cpu_cores": report["ghz_cpu_s"] / seconds,
    }


async def python_load(
    server: FakeServiceProcess, item: Item, max_new_tokens: int, concurrency: int, duration_s: float
) -> dict[str, Any]:
    """`concurrency` tasks on one AsyncClient, each calling Critique back to back for `duration_s`."""
    params = parameters(max_new_tokens=max_new_tokens, seed=item.seed)
    latencies: list[float] = []
    errors = 0
    async with AsyncClient(server.address, timeout=20.0, retries=0) as client:
        await client.wait_ready(10)
        for _ in range(2 * concurrency):  # warm up this channel
            await client.critique(item.conversation, item.principle_id, params)
        stop_at = time.perf_counter() + duration_s

        async def caller() -> None:
            nonlocal errors
            while time.perf_counter() < stop_at:
                start = time.perf_counter()
                try:
                    await client.critique(item.conversation, item.principle_id, params)
                except Exception:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - start)

        own_before, server_before = _own_cpu(), server.cpu_seconds()
        start = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
        own_cpu, server_cpu = _own_cpu() - own_before, server.cpu_seconds() - server_before
    return {
        "load generator": "AsyncClient (Python, grpc.aio)",
        "callers": concurrency,
        "calls": len(latencies) + errors,
        "seconds": seconds,
        "requests_per_s": round(len(latencies) / seconds),
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "errors": errors,
        "server_cpu_cores": server_cpu / seconds,
        "client_cpu_cores": own_cpu / seconds,
    }


def bench_service_overhead(concurrency: int, duration_s: float, warmup_calls: int) -> dict[str, Any]:
    """ghz and our Python client against one FakeBackend critique service in a child process; the
    two take turns twice and each keeps its better run (the machine is shared)."""
    item = items(1, [critique_principles(1)[0][0]])[0]
    max_new_tokens = 32
    request = overhead_request(item, max_new_tokens)
    server = FakeServiceProcess("critique")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            protoset = Path(tmp) / "critique.protoset"
            write_protoset(protoset)
            run_ghz(server, protoset, request, concurrency, total=warmup_calls)  # warm up
            ghz_runs, python_runs = [], []
            for _ in range(2):
                report = run_ghz(server, protoset, request, concurrency, duration_s=duration_s)
                ghz_runs.append(ghz_row(report, concurrency))
                python_runs.append(
                    asyncio.run(python_load(server, item, max_new_tokens, concurrency, duration_s))
                )
    finally:
        server.stop()
    rows = [max(runs, key=lambda r: r["requests_per_s"]) for runs in (ghz_runs, python_runs)]
    return {
        "rows": rows,
        "all_runs": ghz_runs + python_runs,
        "server": "critique service on FakeBackend, own process, INFO access log (as `cai serve`)",
        "request": request,
        "target": ">= 1500 requests/s (ghz, 32 callers)",
        "met": rows[0]["requests_per_s"] >= 1500 and rows[0]["errors"] == 0,
    }


# ---- grpc-vs-inprocess --------------------------------------------------------------------


async def _service(backend: Backend) -> RunningService:
    # No logging setup: as a library user embedding the service would run it (no access log).
    settings = load_settings("critique", None, port=0, metrics_port=0)
    return await start_service("critique", settings, backend=backend)


async def bench_grpc_vs_inprocess(
    backend: TransformersBackend, requests: int, concurrency: int, max_new_tokens: int, rounds: int
) -> dict[str, Any]:
    """The same critique requests through the critique service (gRPC on loopback, server in this
    process) and through `CAIEngine.critique`, on one backend.

    The two paths take turns for `rounds` rounds, in alternating order (in-process first, then gRPC
    first, ...), and each keeps its fastest run: on a shared machine the fastest run is the one the
    other load disturbed least.
    """
    principle_ids = [pid for pid, _, _ in critique_principles(4)]
    work = items(requests, principle_ids)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.7, top_p=0.95)
    engine = CAIEngine(backend, constitution.load("default"))
    own_hook = backend.on_batch  # restored at the end; the service replaces it with its metrics'
    service = await _service(backend)
    client = AsyncClient(service.address, timeout=600.0, retries=0)
    proto_params = [
        parameters(max_new_tokens=max_new_tokens, temperature=0.7, top_p=0.95, seed=it.seed) for it in work
    ]
    batches: list[int] = []
    metrics_hook = backend.on_batch  # the service's batch-size histogram: keep feeding it

    def on_batch(rows: int) -> None:
        batches.append(rows)
        if metrics_hook is not None:
            metrics_hook(rows)

    backend.on_batch = on_batch

    async def in_process() -> list[str]:
        jobs = [partial(engine.critique, it.conversation, it.principle_id, it.seed, params) for it in work]
        return [critique for _, critique in await bounded(concurrency, jobs)]

    async def through_grpc() -> list[str]:
        jobs = [
            partial(client.critique, it.conversation, it.principle_id, p)
            for it, p in zip(work, proto_params, strict=True)
        ]
        return [r.critique for r in await bounded(concurrency, jobs)]

    paths: dict[str, Callable[[], Awaitable[list[str]]]] = {"in-process": in_process, "grpc": through_grpc}
    runs: list[dict[str, Any]] = []
    outputs: dict[str, list[str]] = {}
    try:
        await client.wait_ready(10)
        # warm up both paths (the model's first batch, the channel)
        await engine.critique(work[0].conversation, work[0].principle_id, 0, params)
        await client.critique(work[0].conversation, work[0].principle_id, proto_params[0])
        for round_ in range(rounds):
            order = ["in-process", "grpc"] if round_ % 2 == 0 else ["grpc", "in-process"]
            for name in order:
                batches.clear()
                start = time.perf_counter()
                outputs[name] = await paths[name]()
                seconds = time.perf_counter() - start
                runs.append({"round": round_ + 1, "path": name, "seconds": seconds, "batches": list(batches)})
    finally:
        backend.on_batch = own_hook
        await client.close()
        await service.server.stop(1)  # not service.stop(): that would close the shared backend
    rows: list[dict[str, Any]] = []
    for name, label in (
        ("in-process", "CAIEngine.critique (in-process)"),
        ("grpc", "Critique RPC (gRPC on loopback)"),
    ):
        mine = [r for r in runs if r["path"] == name]
        best = min(mine, key=lambda r: r["seconds"])
        rows.append(
            {
                "path": label,
                "requests": len(work),
                "callers": concurrency,
                "best_s": best["seconds"],
                "critiques_per_s": len(work) / best["seconds"],
                "all_runs_s": " / ".join(f"{r['seconds']:.1f}" for r in mine),
                "batches_of_best": " ".join(map(str, best["batches"])),
            }
        )
    ratio = rows[1]["critiques_per_s"] / rows[0]["critiques_per_s"]
    for row in rows:
        row["vs_in_process"] = row["critiques_per_s"] / rows[0]["critiques_per_s"]
    per_round = [
        next(r["seconds"] for r in runs if r["round"] == n and r["path"] == "in-process")
        / next(r["seconds"] for r in runs if r["round"] == n and r["path"] == "grpc")
        for n in range(1, rounds + 1)
    ]
    same = sum(a == b for a, b in zip(outputs["in-process"], outputs["grpc"], strict=True))
    return {
        "rows": rows,
        "ratio_grpc_vs_in_process": ratio,
        "ratio_per_round": per_round,
        "runs": runs,
        "identical_critiques_last_round": f"{same}/{len(work)}",
        "dtype": str(backend.dtype).removeprefix("torch."),
        "max_new_tokens": max_new_tokens,
        "backend_batching": {
            "max_batch_size": backend.max_batch_size,
            "max_batch_tokens": backend.max_batch_tokens,
            "batch_window_ms": backend.batch_window * 1000,
        },
        "principles": principle_ids,
        "target": "grpc / in-process >= 0.9",
        "met": ratio >= 0.9,
    }


# ---- langchain-peer -----------------------------------------------------------------------


class RecordingBackend(WrappedBackend):
    """Passes everything to `inner` and keeps the prompts of generate calls (to report their size)."""

    def __init__(self, inner: Backend):
        super().__init__(inner)
        self.prompts: list[str] = []
        self.new_tokens: list[int] = []

    async def generate(self, prompt: str, params: SamplingParams) -> list[Completion]:
        self.prompts.append(prompt)
        completions = await self.inner.generate(prompt, params)
        self.new_tokens.extend(c.tokens for c in completions)
        return completions

    async def generate_stream(self, prompt: str, params: SamplingParams) -> AsyncIterator[str]:
        self.prompts.append(prompt)
        async for piece in self.inner.generate_stream(prompt, params):
            yield piece


async def run_ours(
    model: str, work: list[Item], max_new_tokens: int, concurrency: int, dtype: str
) -> dict[str, Any]:
    """One Critique then one Revise per item through the critique service (in this process)."""
    backend = RecordingBackend(TransformersBackend(model, dtype=dtype))
    service = await _service(backend)
    client = AsyncClient(service.address, timeout=600.0, retries=0)

    def sampling(seed: int) -> common_pb2.GenerationParameters:
        return parameters(max_new_tokens=max_new_tokens, temperature=0.7, top_p=0.95, seed=seed)

    async def one(it: Item) -> tuple[str, str]:
        critique = await client.critique(it.conversation, it.principle_id, sampling(2 * it.seed))
        revision = await client.revise(
            it.conversation, it.principle_id, critique.critique, sampling(2 * it.seed + 1)
        )
        return critique.critique, revision.revision

    try:
        await client.wait_ready(10)
        await backend.inner.generate("Hello.", SamplingParams(max_new_tokens=4))  # warm up, not recorded
        start = time.perf_counter()
        outputs = await bounded(concurrency, [partial(one, it) for it in work])
        seconds = time.perf_counter() - start
    finally:
        await client.close()
        await service.stop(1)
    revisions = len(work)
    return {
        "items": len(work),
        "revisions": revisions,
        "skipped_revisions": 0,
        "seconds": seconds,
        "revisions_per_s": revisions / seconds,
        "model_calls": len(backend.prompts),
        "mean_prompt_chars": sum(map(len, backend.prompts)) / len(backend.prompts),
        "mean_new_tokens": sum(backend.new_tokens) / len(backend.new_tokens),
        "outputs": outputs,
    }


def bench_langchain_peer(
    model: str, count: int, concurrency: int, max_new_tokens: int, dtype: str, langchain_alone: bool
) -> dict[str, Any]:
    """Ours and LangChain at the same concurrency; with `langchain_alone`, LangChain with one caller too
    (its threads share one unbatched model, so fewer of them may do better on two cores)."""
    from transformers import AutoTokenizer

    from benchmarks.peer_langchain import run_langchain

    principles = critique_principles(4)
    work = items(count, [pid for pid, _, _ in principles])
    pairs = [(it.prompt, it.response) for it in work]
    # LangChain first, so our run cannot leave it a warmer machine; each side warms its own model up.
    theirs = {concurrency: run_langchain(model, pairs, principles, max_new_tokens, concurrency, dtype)}
    if langchain_alone and concurrency != 1:
        theirs[1] = run_langchain(model, pairs, principles, max_new_tokens, 1, dtype)
    ours = asyncio.run(run_ours(model, work, max_new_tokens, concurrency, dtype))
    # LangChain does not report token counts: count the tokens of the texts it returns (the chain may
    # trim a critique, so this is a lower bound). Ours are the backend's own counts.
    tokenizer = AutoTokenizer.from_pretrained(model)

    def returned_tokens(result: dict[str, Any]) -> float:
        texts = [text for pair in result["outputs"] for text in pair]
        return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts) / len(texts)

    rows: list[dict[str, Any]] = []
    entries = [(f"ours, {concurrency} callers", ours, ours["mean_new_tokens"])]
    entries += [
        (f"LangChain, {n} caller{'s' if n > 1 else ''}", result, returned_tokens(result))
        for n, result in theirs.items()
    ]
    for name, result, new_tokens in entries:
        rows.append(
            {
                "system": name,
                "items": result["items"],
                "revisions": result["revisions"],
                "seconds": result["seconds"],
                "revisions_per_s": result["revisions_per_s"],
                "model_calls": result["model_calls"],
                "mean_prompt_chars": round(result["mean_prompt_chars"]),
                "new_tokens_per_call": new_tokens,
            }
        )
    for row in rows:
        row["ours_vs_this"] = rows[0]["revisions_per_s"] / row["revisions_per_s"]
    return {
        "rows": rows,
        "ratio_ours_vs_langchain_same_callers": rows[1]["ours_vs_this"],
        "ratio_ours_vs_langchain_best": min(row["ours_vs_this"] for row in rows[1:]),
        "dtype": dtype,
        "max_new_tokens": max_new_tokens,
        "callers": concurrency,
        "sampling": {"temperature": 0.7, "top_p": 0.95},
        "principles": [pid for pid, _, _ in principles],
        "items": [{"prompt": i.prompt, "response": i.response, "principle": i.principle_id} for i in work],
        "langchain": {
            str(n): {k: v for k, v in result.items() if k != "outputs"} for n, result in theirs.items()
        },
        "outputs": {"ours": ours["outputs"], **{f"langchain_{n}": r["outputs"] for n, r in theirs.items()}},
        "target": "ours ahead (ratio > 1)",
        "met": min(row["ours_vs_this"] for row in rows[1:]) > 1,
    }
