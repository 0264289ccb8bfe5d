"""The online loop: how fast a published policy is served, and what overlapping generation with
training buys. Writes `benchmarks/results/publish-to-serve.json`, `publish-to-serve-vllm.json`
and `online-loop.json`.

    python -m benchmarks.online [--only publish-to-serve publish-to-serve-vllm online-loop]
        [--versions 5] [--steps 8] [--limit 8] [--device cpu|cuda] [--dtype auto]
        [--random-init MODEL_DIR]

- `publish-to-serve`: a policy service (default model, transformers backend) follows the
  policy-versions topic of a real broker, idle and then while 4 callers keep generating (32
  tokens each, greedy). For each of `--versions` LoRA adapters per phase (TrainConfig's r, alpha
  and target modules, new weights each time) the clock starts when the archive is written, and
  stops (a) when GetInfo reports the new version and (b) when the first completion carrying it
  returns (idle: the next call's): record published, archive fetched and hash-checked, adapter
  loaded between two decode steps (running rows finish on their version).
- `publish-to-serve-vllm`: the same through the vLLM path (the openai backend): the archive is
  fetched, checked and unpacked into the adapter folder, and POST /v1/load_lora_adapter asks the
  engine to load it; new requests name the new adapter. Here the engine is
  `benchmarks.vllm_standin` (50 ms per request, no model), so the figures are our side of the
  cost; `benchmarks.vllm_gpu` runs it against a real vLLM on a GPU.
- `online-loop`: `cai up --train-steps`'s loop (cli/online.py) for `--steps` DPO steps on
  `--limit` built-in prompts, once with generation and training overlapping (as `cai up` runs
  it) and once taking turns (generate a step's pairs, judge them, train, repeat: a synchronous
  online-DPO loop, as TRL's OnlineDPOTrainer runs), in alternating order over `--rounds`:
  preference pairs trained per minute and the ratio overlapped / synchronous.

`--random-init MODEL_DIR` uses the config and tokenizer in MODEL_DIR with random weights (for a
machine that has those but not the weights); generation then runs to max_new_tokens, so only
the timings mean something.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).parent / "results"
console = Console(width=160)


def _model(args: argparse.Namespace, scratch: Path) -> str:
    from cai.models import resolve_model

    if args.random_init:
        from benchmarks.trainer_gpu import random_model

        return str(random_model(args.random_init, scratch / "model"))
    return str(resolve_model("default"))


# ---- publish-to-serve ---------------------------------------------------------------------------


async def publish_to_serve(
    model: str, versions: int, device: str | None, dtype: str, engine_url: str | None = None
) -> dict[str, Any]:
    """The model in process (transformers backend), or on the vLLM server at `engine_url` (the
    openai backend; adapters are unpacked where that server reads them: this machine)."""
    import grpc
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from benchmarks.kafka import broker
    from cai.backends.openai import OpenAIBackend
    from cai.backends.transformers import TransformersBackend
    from cai.kafka.topics import TopicSpec, create_topics
    from cai.policy_versions import KafkaPublisher, pack_adapter
    from cai.records import PolicyVersion
    from cai.v1 import common_pb2, policy_pb2, policy_pb2_grpc
    from services.policy_updates import PolicyFollower
    from services.server import start_service
    from services.settings import load_settings
    from trainer.config import TrainConfig

    lora = TrainConfig()
    trained = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model),
        LoraConfig(r=lora.lora_r, lora_alpha=lora.lora_alpha, target_modules=lora.lora_target_modules),
    )
    request = policy_pb2.GenerateRequest(
        input=policy_pb2.PolicyInput(
            conversation=common_pb2.Conversation(
                messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content="Describe the sea.")]
            )
        ),
        parameters=common_pb2.GenerationParameters(max_new_tokens=32, temperature=0.0),
    )
    rows = []
    with broker() as bootstrap, tempfile.TemporaryDirectory() as folder:
        prefix = f"bench.serve.{time.monotonic_ns()}."
        create_topics(bootstrap, TopicSpec(partitions=1), prefix=prefix)
        backend: Any = (
            TransformersBackend(model, device=device, dtype=dtype)
            if engine_url is None
            else OpenAIBackend(engine_url, tokenizer=model, keep_versions=3)
        )
        settings = load_settings("policy", None, port=0, metrics_port=0)
        service = await start_service("policy", settings, backend)
        stopping = asyncio.Event()
        follower = PolicyFollower(
            service.backend, bootstrap, prefix + "policy-versions", Path(folder) / "cache"
        )
        following = asyncio.ensure_future(follower.run(stopping))
        publisher = KafkaPublisher(bootstrap, prefix + "policy-versions")
        first_seen: dict[str, float] = {}
        async with grpc.aio.insecure_channel(service.address) as channel:
            stub = policy_pb2_grpc.PolicyServiceStub(channel)

            async def caller(done: asyncio.Event) -> None:
                while not done.is_set():
                    reply = await stub.Generate(request)
                    first_seen.setdefault(reply.policy_version, time.perf_counter())

            n = 0
            for load, callers in (("idle", 0), ("4 callers", 4)):
                done = asyncio.Event()
                running = [asyncio.ensure_future(caller(done)) for _ in range(callers)]
                await asyncio.sleep(2)  # warm: batches running
                for _ in range(versions):
                    n += 1
                    with torch.no_grad():
                        for name, weight in trained.named_parameters():
                            if "lora_B" in name:
                                weight.normal_(0, 0.01)
                    version = f"v{n}"
                    path, sha256 = await asyncio.to_thread(pack_adapter, trained, Path(folder), version)
                    started = time.perf_counter()  # the archive is written
                    await asyncio.to_thread(
                        publisher.publish, PolicyVersion(version, path.as_uri(), sha256, n)
                    )
                    while (await stub.GetInfo(policy_pb2.GetInfoRequest())).policy_version != version:
                        await asyncio.sleep(0.005)
                    info_s = time.perf_counter() - started
                    if not callers:  # idle: the first completion is the next call's
                        reply = await stub.Generate(request)
                        first_seen.setdefault(reply.policy_version, time.perf_counter())
                    while version not in first_seen:
                        await asyncio.sleep(0.005)
                    rows.append(
                        {
                            "load": load,
                            "version": version,
                            "to GetInfo s": info_s,
                            "to first completion s": first_seen[version] - started,
                            "archive MiB": path.stat().st_size / 2**20,
                        }
                    )
                done.set()
                await asyncio.gather(*running)
            stopping.set()
            await following
        await service.stop(0)
        await backend.close()
    return {
        "benchmark": "publish-to-serve" if engine_url is None else "publish-to-serve-vllm",
        "engine": "transformers" if engine_url is None else engine_url,
        "device": str(getattr(backend, "device", device)),
        "dtype": str(getattr(backend, "dtype", dtype)),
        "rows": rows,
        "median": {
            load: {
                key: statistics.median(r[key] for r in rows if r["load"] == load)
                for key in ("to GetInfo s", "to first completion s")
            }
            for load in ("idle", "4 callers")
        },
        "target": "to GetInfo < 1 s under load",
    }


# ---- online-loop ---------------------------------------------------------------------------------


async def loop_once(
    model: str, steps: int, limit: int, overlap: bool, device: str | None, dtype: str
) -> dict[str, Any]:
    from cai import constitution, pipeline
    from cai.backends.transformers import TransformersBackend
    from cli.online import run_online
    from trainer.config import TrainConfig

    with tempfile.TemporaryDirectory() as folder:
        policy = TransformersBackend(model, device=device, dtype=dtype)
        feedback = TransformersBackend(model, device=device, dtype=dtype)
        config = pipeline.RunConfig(out=Path(folder) / "run")
        config.out.mkdir()
        train = TrainConfig.from_dict(
            {
                "model": model,
                "mode": "online-dpo",
                "source": "memory",
                "output_dir": str(Path(folder) / "train"),
                "max_steps": steps,
                "publish_every": max(1, steps // 4),
                "device": str(policy.device),
                "dtype": dtype,
            }
        )
        started = time.perf_counter()
        result = await run_online(
            policy,
            feedback,
            constitution.load("default"),
            config,
            pipeline.load_prompts(None, limit),
            train,
            eval_set=[],
            overlap=overlap,
        )
        seconds = time.perf_counter() - started
        await policy.close()
        await feedback.close()
    trained = sum(row["samples"] for row in result.steps)
    return {
        "variant": "overlapped" if overlap else "synchronous",
        "steps": len(result.steps),
        "pairs trained": trained,
        "pairs generated": len(result.results),
        "stale dropped": result.stale,
        "seconds": seconds,
        "pairs trained per min": 60 * trained / seconds,
        "mean staleness": statistics.mean(row["staleness"] for row in result.steps),
    }


def online_loop(
    model: str, steps: int, limit: int, rounds: int, device: str | None, dtype: str
) -> dict[str, Any]:
    rows = []
    for r in range(rounds):
        order = (True, False) if r % 2 == 0 else (False, True)
        for overlap in order:
            rows.append(asyncio.run(loop_once(model, steps, limit, overlap, device, dtype)))
            console.print(rows[-1])
    rate = {
        v: statistics.median(r["pairs trained per min"] for r in rows if r["variant"] == v)
        for v in ("overlapped", "synchronous")
    }
    return {
        "benchmark": "online-loop",
        "steps": steps,
        "prompts": limit,
        "rounds": rounds,
        "rows": rows,
        "median pairs trained per min": rate,
        "ratio overlapped / synchronous": rate["overlapped"] / rate["synchronous"],
    }


def show(title: str, rows: list[dict[str, Any]]) -> None:
    table = Table(*rows[0].keys(), title=title)
    for row in rows:
        table.add_row(*(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()))
    console.print(table)


def publish_to_serve_standin(model: str, versions: int) -> dict[str, Any]:
    """publish-to-serve through the vLLM path with the stand-in engine: our side of the cost."""
    from benchmarks.vllm_standin import VLLMStandIn

    with VLLMStandIn(delay_s=0.05) as engine:
        result = asyncio.run(publish_to_serve(model, versions, None, "auto", engine.url))
    return result | {"engine": "vLLM stand-in (50 ms per request)", "target": "our side < 0.5 s"}


def report_publish(result: dict[str, Any], target: str) -> None:
    show(
        f"{result['benchmark']} ({result['engine']}): archive written -> the policy service answers "
        "with the version",
        result["rows"],
    )
    for load, median in result["median"].items():
        console.print(
            f"median, {load}: GetInfo {median['to GetInfo s']:.3f} s, first completion "
            f"{median['to first completion s']:.3f} s ({target})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", nargs="*", choices=["publish-to-serve", "publish-to-serve-vllm", "online-loop"]
    )
    parser.add_argument("--versions", type=int, default=5, help="publish-to-serve: versions published")
    parser.add_argument("--steps", type=int, default=8, help="online-loop: DPO steps per run")
    parser.add_argument("--limit", type=int, default=8, help="online-loop: built-in prompts")
    parser.add_argument("--rounds", type=int, default=2, help="online-loop: runs of each variant")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--random-init", type=Path, default=None, metavar="MODEL_DIR")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    chosen = args.only or ["publish-to-serve", "publish-to-serve-vllm", "online-loop"]
    with tempfile.TemporaryDirectory(prefix="cai-bench-online-") as scratch:
        model = _model(args, Path(scratch))
        args.out.mkdir(parents=True, exist_ok=True)
        extra = {"weights": "random" if args.random_init else "default", "load average": os.getloadavg()}
        if "publish-to-serve" in chosen:
            result = asyncio.run(publish_to_serve(model, args.versions, args.device, args.dtype)) | extra
            report_publish(result, "target: GetInfo < 1 s under load")
            (args.out / "publish-to-serve.json").write_text(json.dumps(result, indent=2) + "\n")
        if "publish-to-serve-vllm" in chosen:
            result = publish_to_serve_standin(model, args.versions) | extra
            report_publish(result, "target: our side < 0.5 s")
            (args.out / "publish-to-serve-vllm.json").write_text(json.dumps(result, indent=2) + "\n")
        if "online-loop" in chosen:
            result = online_loop(model, args.steps, args.limit, args.rounds, args.device, args.dtype) | extra
            show(f"online-loop: {args.steps} DPO steps, overlapped vs synchronous", result["rows"])
            console.print(f"ratio overlapped / synchronous: {result['ratio overlapped / synchronous']:.2f}")
            (args.out / "online-loop.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
