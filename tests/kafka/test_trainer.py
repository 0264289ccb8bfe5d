"""The trainer on a real broker: exactly once across SIGKILLs, and the policy service loading
each published version between batches. A tiny random model keeps restarts and steps quick:
these tests are about which samples are trained and which weights serve, not what is learned."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from cai.backends.transformers import TransformersBackend
from cai.kafka import records
from cai.kafka.topics import TopicSpec, create_topics, dlq
from cai.policy_versions import KafkaPublisher, pack_adapter
from cai.records import PolicyVersion
from cai.v1 import common_pb2, policy_pb2, policy_pb2_grpc, records_pb2
from services.policy_updates import PolicyFollower
from services.server import start_service
from tests.kafka.test_stream import push, push_prompts, read_all, settings, wait_for

pytestmark = pytest.mark.integration

STEPS = 60
PAIR = 2  # micro_batch_size: samples per step


def preference(i: int, version: str = "base") -> records_pb2.PreferenceRecord:
    return records_pb2.PreferenceRecord(
        metadata=common_pb2.SampleMetadata(
            sample_id=f"pref-{i:03d}", prompt_id=f"p{i}", policy_version=version
        ),
        prompt=records_pb2.PromptRecord(
            prompt_id=f"p{i}",
            conversation=common_pb2.Conversation(
                messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content=f"Question {i}?")]
            ),
        ),
        chosen=f"Answer {i}.",
        rejected="No.",
        p_chosen=0.75,
        p_a=0.75,  # the judge's p(first better): the chosen answer was first
    )


def trained_steps(out: Path) -> list[dict]:
    path = out / "log.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):  # a line cut short by the kill
            rows.append(json.loads(line))
    return rows


@pytest.mark.timeout(1500)  # five killed runs of up to 120 s each, then a final run of up to 300 s
def test_sigkilled_trainer_trains_every_preference_exactly_once(kafka_broker, tiny_model, tmp_path):
    bootstrap = kafka_broker.bootstrap
    prefix = f"t{uuid.uuid4().hex[:8]}."
    create_topics(bootstrap, TopicSpec(partitions=3), prefix=prefix)
    topic = prefix + "preferences"
    ids = [f"pref-{i:03d}" for i in range(STEPS * PAIR)]
    items = [(f"p{i}".encode(), *records.encode(preference(i))) for i in range(STEPS * PAIR)]
    # at-least-once stages may write a record twice: same sample id, trained once
    items[10:10] = [items[3], items[7]]
    items.insert(
        20,
        (b"bad", b"\x00garbage", [(records.SCHEMA_HEADER, records.schema_of(records_pb2.PreferenceRecord))]),
    )
    push(bootstrap, topic, items)

    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "cli.main", "train", "--source", "kafka", "--kafka", bootstrap,
        "--kafka-prefix", prefix, "--mode", "dpo", "--model", tiny_model, "--output-dir", str(out),
        "--max-steps", str(STEPS), "--micro-batch-size", str(PAIR), "--checkpoint-every", "1",
        "--keep-checkpoints", "2", "--device", "cpu", "--dtype", "float32",
        "--lora-target-modules", "q_proj,v_proj", "--stream-idle-timeout-s", "60",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd())}
    rng = random.Random(7)
    kills = 0
    while kills < 5:
        before = len(trained_steps(out))
        errors = tmp_path / f"stderr-{kills}.txt"
        with errors.open("wb") as sink:
            proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=sink)
        # wait for this run to train something, then kill it at a random moment after
        deadline = time.monotonic() + 120
        while len(trained_steps(out)) <= before and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 0.3))
        assert proc.poll() is None, f"the run ended before it was killed: {errors.read_text()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    final = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "resumed at step" in " ".join(final.stdout.split())  # rich wraps long lines

    steps = trained_steps(out)
    assert [row["step"] for row in steps] == list(range(1, STEPS + 1))
    trained = [sample_id for row in steps for sample_id in row["sample_ids"]]
    assert len(trained) == len(set(trained)), "a preference was trained twice"
    assert sorted(trained) == ids, "a preference was skipped"
    # the unreadable record went to the dead-letter topic, once, whatever the kills
    dead = read_all(bootstrap, dlq(topic))
    assert [m.key() for m in dead] == [b"bad"]


async def wait_until(condition: Callable[[], bool], what: str, seconds: float = 120) -> None:
    """Poll `condition` until it holds; fail the test, naming `what`, after `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"waited {seconds:.0f} s for {what}"
        await asyncio.sleep(0.05)


def generate_request(text: str) -> policy_pb2.GenerateRequest:
    return policy_pb2.GenerateRequest(
        input=policy_pb2.PolicyInput(
            conversation=common_pb2.Conversation(
                messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content=text)]
            )
        ),
        parameters=common_pb2.GenerationParameters(max_new_tokens=8, temperature=0.0),
    )


def trained_adapter(model_path: str, folder: Path) -> tuple[Path, str]:
    """A LoRA adapter with random (not zero) weights: it changes what the model says."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    config = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return pack_adapter(get_peft_model(model, config), folder, "v1")


async def test_policy_service_swaps_versions_between_batches(kafka_broker, tiny_model, tmp_path):
    bootstrap = kafka_broker.bootstrap
    prefix = f"t{uuid.uuid4().hex[:8]}."
    create_topics(bootstrap, TopicSpec(partitions=1), prefix=prefix)
    archive, sha256 = await asyncio.to_thread(trained_adapter, tiny_model, tmp_path / "policies")
    s = settings("policy", bootstrap, prefix, responses_per_prompt=1, response_max_new_tokens=8)
    backend = TransformersBackend(tiny_model, device="cpu", dtype="float32", batch_window_ms=2)
    service = await start_service("policy", s, backend)
    stopping = asyncio.Event()
    follower = PolicyFollower(service.backend, bootstrap, prefix + "policy-versions", tmp_path / "cache")
    tasks = [asyncio.ensure_future(follower.run(stopping))]
    seen: list[tuple[str, str]] = []  # (policy_version, text) of every answer
    try:
        async with grpc.aio.insecure_channel(service.address) as channel:
            stub = policy_pb2_grpc.PolicyServiceStub(channel)

            async def caller() -> None:
                while not stopping.is_set():
                    reply = await stub.Generate(generate_request("Tell me about the sea."))
                    seen.append((reply.policy_version, reply.completions[0].text))

            callers = [asyncio.ensure_future(caller()) for _ in range(6)]
            await asyncio.sleep(1.0)
            # a record whose archive fails its hash is refused; the service keeps its version
            publish = KafkaPublisher(bootstrap, prefix + "policy-versions").publish
            await asyncio.to_thread(publish, PolicyVersion("v1", archive.as_uri(), "0" * 64, 5))
            await wait_until(lambda: follower.failed != 0, "the follower to refuse the bad hash")
            await asyncio.to_thread(publish, PolicyVersion("v1", archive.as_uri(), sha256, 10))
            await wait_until(lambda: bool(follower.loaded), "the follower to load version v1")
            swapped_at = len(seen)
            await asyncio.sleep(1.5)
            # the stream stage's rollouts, produced after the swap, carry the new version
            tasks.append(asyncio.ensure_future(service.stream(s).run(stopping)))
            push_prompts(bootstrap, prefix, [_prompt()])
            rollouts = await wait_for(bootstrap, prefix + "rollouts", records_pb2.RolloutRecord, 1)
            stopping.set()
            await asyncio.gather(*callers)
    finally:
        stopping.set()
        await asyncio.gather(*tasks)
        await service.stop(0)
        await backend.close()
    texts: dict[str, set[str]] = {}
    for version, text in seen:
        texts.setdefault(version, set()).add(text)
    # Greedy answers to one prompt: one text per version. A batch run on a half-loaded model
    # would give a third text under one of the two names.
    assert set(texts) == {"base", "v1"}, texts.keys()
    assert len(texts["base"]) == 1 and len(texts["v1"]) == 1, texts
    assert texts["base"] != texts["v1"]
    # once loaded, nothing answers with the old version
    assert all(version == "v1" for version, _ in seen[swapped_at + 6 :])
    assert [r.metadata.policy_version for r in rollouts] == ["v1"]
    assert [v.version for v in follower.loaded] == ["v1"] and follower.failed == 1


def _prompt() -> records_pb2.PromptRecord:
    return records_pb2.PromptRecord(
        prompt_id="after-swap",
        conversation=common_pb2.Conversation(
            messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content="Tell me about the sea.")]
        ),
        seed=3,
    )
