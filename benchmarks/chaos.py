"""Chaos soak: the streaming pipeline under random kills, broker restarts and poison records.

The policy, critique and judge stream stages (each its own process, on the instant FakeBackend)
and the online trainer (`cai train --source kafka`, a tiny random model on the CPU) run on a real
single-node broker (with `--model default`, the stages and the trainer all run the default
model: slower, so fewer prompts and kills fit, but every restart reloads a real model) for
`--duration-s` seconds while prompts are pushed at a steady rate. A seeded scheduler SIGKILLs
a random component every `--kill-every-s` seconds and starts it again at once, as Kubernetes
would; every `--broker-restart-every-s` seconds it restarts the broker; every
`--poison-every-s` seconds it writes an unreadable record to one of the stages' input topics.
Then the kills stop, the pipeline gets `--settle-s` seconds to finish what is in flight, and
every topic and the trainer's log are reconciled against the prompts pushed:

- prompts pushed, with a preference, lost (no preference);
- preferences trained, trained twice, not trained;
- poison records dead-lettered: expected, got (distinct), written more than once;
- kills and restarts per component, recovery time per kill (restart to the first record the new
  process handled);
- duplicates produced (records with a sample id already on the topic) and dropped by the trainer.

    .venv/bin/python -m benchmarks.chaos --duration-s 600 --kill-every-s 5
    .venv/bin/python -m benchmarks.chaos --duration-s 60 --kill-every-s 3   # a quick look
    .venv/bin/python -m benchmarks.chaos --model default --duration-s 300 --kill-every-s 10 \
        --broker-restart-every-s 100 --poison-every-s 20 --prompts-per-s 0.1 --settle-s 900 \
        --out benchmarks/results/chaos-default-model.json

It prints a table and writes the numbers to `benchmarks/results/chaos.json` (`--out`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
STAGES = ("policy", "critique", "judge")
# where each component reads, and so where the poison written for it lands (`<topic>.dlq`)
INPUT = {"policy": "prompts", "critique": "rollouts", "judge": "rollouts", "trainer": "preferences"}


# ---- one stage as a process ----------------------------------------------------------------


async def _stage(name: str, bootstrap: str, prefix: str, mark: Path, model: str) -> None:
    from cai.backends.base import Backend
    from cai.backends.fake import FakeBackend
    from services.server import start_service
    from services.settings import load_settings

    backend: Backend
    if model == "fake":
        backend, limits = FakeBackend(delay_s=0.002), {"max_prompt_tokens": 400}
    else:
        from cai.backends.transformers import TransformersBackend
        from cai.models import resolve_model

        backend, limits = TransformersBackend(resolve_model(model), device="cpu"), {}
    settings = load_settings(
        name,  # type: ignore[arg-type]
        None,
        port=0,
        metrics_port=0,
        kafka=bootstrap,
        kafka_prefix=prefix,
        kafka_commit_interval_s=0.2,
        **limits,
    )
    service = await start_service(name, settings, backend)  # type: ignore[arg-type]
    stream = service.stream(settings)
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)

    async def first_record() -> None:  # recovery: the first record this process handled
        while not stopping.is_set():
            if stream.counts["processed"] or stream.counts["dead_lettered"]:
                mark.write_text(str(time.time()))
                return
            await asyncio.sleep(0.02)

    watcher = asyncio.ensure_future(first_record())
    await stream.run(stopping)
    watcher.cancel()
    await service.stop(0)


# ---- the soak ------------------------------------------------------------------------------


@dataclass
class Component:
    name: str
    command: list[str]
    log: Path
    mark: Path | None = None  # stages write the time of their first record here
    proc: subprocess.Popen[bytes] | None = None
    kills: int = 0
    restarts: int = 0
    recoveries: list[float] = field(default_factory=list)
    started_at: float = 0.0
    steps_at_start: int = 0

    def start(self, env: dict[str, str], steps: int = 0) -> None:
        if self.mark is not None:
            self.mark.unlink(missing_ok=True)
        with self.log.open("ab") as sink:
            self.proc = subprocess.Popen(self.command, env=env, stdout=subprocess.DEVNULL, stderr=sink)
        self.started_at = time.time()
        self.steps_at_start = steps

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.kills += 1

    def stop(self, timeout: float = 60) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
            return None


def tiny_model(folder: Path) -> str:
    """A randomly initialised two-layer model with the default model's tokenizer: training steps
    take milliseconds, and what it learns does not matter here, which samples it trains on does."""
    if (folder / "config.json").is_file():
        return str(folder)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from cai.models import setup_default_model

    base = setup_default_model(progress=lambda _: None)
    config = AutoConfig.from_pretrained(base)
    config.update({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2})
    config.update({"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    return str(folder)


def read_all(bootstrap: str, topic: str) -> list[Any]:
    """Every record on `topic` now, read without a consumer group (a deadline of 60 s)."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "chaos-reader", "enable.auto.commit": False}
    )
    try:
        ends, start = {}, []
        for partition in consumer.list_topics(topic, timeout=20).topics[topic].partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=20)
            if high > low:
                ends[partition] = high
                start.append(TopicPartition(topic, partition, low))
        consumer.assign(start)
        items: list[Any] = []
        deadline = time.monotonic() + 60
        while ends:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}: could not read to the end of partitions {sorted(ends)} in 60 s")
            for item in consumer.consume(500, 0.5):
                if item.error() is None:
                    items.append(item)
                    if item.offset() + 1 >= ends.get(item.partition(), 0):
                        ends.pop(item.partition(), None)
        return items
    finally:
        consumer.close()


def trained_rows(out: Path) -> list[dict[str, Any]]:
    path = out / "log.jsonl"
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):  # a line cut short by a kill
                rows.append(json.loads(line))
    return rows


def soak(args: argparse.Namespace) -> dict[str, Any]:
    from cai.devbroker import Broker
    from cai.kafka import records
    from cai.kafka.topics import TopicSpec, create_topics, dlq
    from cai.v1 import common_pb2, records_pb2

    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="cai-chaos-"))
    model = tiny_model(Path(args.model_cache)) if args.model == "fake" else args.model
    broker = Broker(work / "broker", detach=False)
    broker.start()
    bootstrap = broker.bootstrap
    prefix = f"chaos{uuid.uuid4().hex[:6]}."
    create_topics(bootstrap, TopicSpec(partitions=3), prefix=prefix)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = work / "trainer"
    components = {
        name: Component(
            name,
            [
                sys.executable,
                "-m",
                "benchmarks.chaos",
                "stage",
                name,
                bootstrap,
                prefix,
                str(work / f"{name}.mark"),
                args.model,
            ],
            work / f"{name}.log",
            work / f"{name}.mark",
        )
        for name in STAGES
    }
    train = (
        f"train --source kafka --kafka {bootstrap} --kafka-prefix {prefix} --mode dpo --model {model} "
        f"--output-dir {out} --max-steps 1000000 --micro-batch-size 2 --checkpoint-every 1 "
        f"--keep-checkpoints 2 --device cpu --dtype {'float32' if args.model == 'fake' else 'auto'} "
        "--lora-target-modules q_proj,v_proj "
        "--stream-idle-timeout-s 600"
    )
    components["trainer"] = Component(
        "trainer", [sys.executable, "-m", "cli.main", *train.split()], work / "trainer.log"
    )
    for component in components.values():
        component.start(env)

    # quiet: the broker restarts would fill the terminal with connection errors
    producer = Producer(
        {"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all", "log_level": 0}
    )
    pushed: list[str] = []
    poison: Counter[str] = Counter()  # input topic -> poison records written to it
    broker_restarts = 0
    events: list[tuple[float, str]] = []
    started = time.time()
    next_push = next_kill = started
    next_kill += args.kill_every_s
    next_poison = started + args.poison_every_s
    next_broker = started + args.broker_restart_every_s

    def push_prompt() -> None:
        i = len(pushed)
        prompt = records_pb2.PromptRecord(
            prompt_id=f"c{i:06d}",
            conversation=common_pb2.Conversation(
                messages=[
                    common_pb2.Message(role=common_pb2.ROLE_USER, content=f"Explain tides simply, #{i}.")
                ]
            ),
            seed=i,
        )
        value, headers = records.encode(prompt)
        producer.produce(prefix + "prompts", key=prompt.prompt_id.encode(), value=value, headers=headers)
        pushed.append(prompt.prompt_id)

    def poll_recoveries() -> None:
        for c in components.values():
            if c.restarts > len(c.recoveries) and c.proc is not None:
                if c.mark is not None and c.mark.is_file():
                    c.recoveries.append(float(c.mark.read_text()) - c.started_at)
                elif c.mark is None and len(trained_rows(out)) > c.steps_at_start:
                    c.recoveries.append(time.time() - c.started_at)

    while time.time() - started < args.duration_s:
        now = time.time()
        while next_push <= now:
            push_prompt()
            next_push += 1 / args.prompts_per_s
        if now >= next_poison:
            name = rng.choice(sorted(INPUT))
            topic = INPUT[name]
            poison[topic] += 1
            key = f"poison-{topic}-{poison[topic]}".encode()
            kind = records.RECORD_TYPES[topic]
            producer.produce(
                prefix + topic,
                key=key,
                value=b"\x00not a record",
                headers=[(records.SCHEMA_HEADER, records.schema_of(kind))],
            )
            next_poison += args.poison_every_s
        if now >= next_broker:
            events.append((now - started, "broker restart"))
            producer.flush(30)
            broker.restart()
            broker_restarts += 1
            next_broker += args.broker_restart_every_s
        if now >= next_kill:
            victim = components[rng.choice(sorted(components))]
            # a component killed before it recovered counts, but gets no recovery time
            if victim.restarts > len(victim.recoveries):
                victim.recoveries.append(float("nan"))
            victim.kill()
            victim.start(env, len(trained_rows(out)) if victim.name == "trainer" else 0)
            victim.restarts += 1
            events.append((now - started, f"kill {victim.name}"))
            next_kill += args.kill_every_s
        for c in components.values():  # one that died by itself is restarted too, and counted
            if c.proc is not None and c.proc.poll() is not None:
                events.append((now - started, f"{c.name} exited {c.proc.returncode}"))
                c.start(env, len(trained_rows(out)) if c.name == "trainer" else 0)
                c.restarts += 1
        producer.poll(0)
        poll_recoveries()
        time.sleep(0.02)
    if producer.flush(60) > 0:
        raise TimeoutError("chaos: prompts still unacknowledged 60 s after the last one")

    # a poison record on rollouts is read by two stages: each dead-letters it
    readers = {topic: [n for n, source in INPUT.items() if source == topic] for topic in set(INPUT.values())}

    def dead_letters(topic: str) -> list[Any]:
        letters = read_all(bootstrap, dlq(prefix + topic))
        return [m for m in letters if (m.key() or b"").startswith(b"poison-")]

    def dead_lettered(letters: list[Any]) -> Counter[tuple[bytes, str]]:
        return Counter((m.key(), dict(m.headers() or [])["stage"]) for m in letters)

    # Settle: no more faults; wait until every prompt has a preference, every preference is
    # trained and every poison record is in its dead-letter topic (a stage killed near the end
    # may still be catching up), or until --settle-s.
    deadline = time.time() + args.settle_s
    preferences: dict[str, str] = {}
    while time.time() < deadline:
        poll_recoveries()
        with contextlib.suppress(KafkaException, TimeoutError):
            preferences = {}
            for item in read_all(bootstrap, prefix + "preferences"):
                with contextlib.suppress(Exception):
                    message = records.decode(records_pb2.PreferenceRecord, item.value(), item.headers())
                    preferences[message.metadata.sample_id] = message.prompt.prompt_id
            trained = {s for row in trained_rows(out) for s in row["sample_ids"]}
            lettered = all(
                len(dead_lettered(dead_letters(topic))) >= poison[topic] * len(readers[topic])
                for topic in readers
            )
            if set(pushed) <= set(preferences.values()) and set(preferences) <= trained and lettered:
                break
        time.sleep(2)
    poll_recoveries()
    exits = {name: c.stop() for name, c in components.items()}

    # Reconcile.
    produced: dict[str, dict[str, int]] = {}
    for topic, kind in (
        ("rollouts", records_pb2.RolloutRecord),
        ("revisions", records_pb2.RevisionRecord),
        ("preferences", records_pb2.PreferenceRecord),
    ):
        ids: Counter[str] = Counter()
        for item in read_all(bootstrap, prefix + topic):
            with contextlib.suppress(Exception):
                ids[records.decode(kind, item.value(), item.headers()).metadata.sample_id] += 1
        produced[topic] = {
            "records": sum(ids.values()),
            "distinct": len(ids),
            "duplicates": sum(ids.values()) - len(ids),
        }
    rows = trained_rows(out)
    trained_ids = Counter(s for row in rows for s in row["sample_ids"])
    dropped = sum(
        c.log.read_text(errors="replace").count("sample id already trained") for c in [components["trainer"]]
    )
    dead: dict[str, Any] = {}
    for topic in sorted(readers):
        letters = dead_letters(topic)
        by_record = dead_lettered(letters)
        with_headers = all(
            {"error", "stage", "original-offset"} <= set(dict(m.headers() or [])) for m in letters
        )
        dead[topic] = {
            "expected": poison[topic] * len(readers[topic]),
            "got": len(by_record),
            "written_twice": sum(n - 1 for n in by_record.values()),
            "headers_complete": with_headers,
        }
    broker.stop()
    shutil.rmtree(work / "broker", ignore_errors=True)  # the records; the logs stay in `workdir`
    with_preference = set(preferences.values()) & set(pushed)
    result = {
        "duration_s": args.duration_s,
        "model": args.model,
        "seed": args.seed,
        "prompts_pushed": len(pushed),
        "prompts_with_preference": len(with_preference),
        "prompts_lost": len(set(pushed) - with_preference),
        "preferences": len(preferences),
        "preferences_trained": len(set(trained_ids) & set(preferences)),
        "preferences_trained_twice": sum(1 for n in trained_ids.values() if n > 1),
        "preferences_not_trained": len(set(preferences) - set(trained_ids)),
        "trainer_steps": len(rows),
        "duplicates_produced": {topic: p["duplicates"] for topic, p in produced.items()},
        "duplicates_dropped_by_trainer": dropped,
        "dead_letters": dead,
        "broker_restarts": broker_restarts,
        "components": {
            name: {
                "kills": c.kills,
                "restarts": c.restarts,
                "recovery_s": _summary([r for r in c.recoveries if r == r]),  # NaN: killed again first
                "killed_before_recovery": sum(1 for r in c.recoveries if r != r),
                "exit_on_sigterm": exits[name],
            }
            for name, c in components.items()
        },
        "workdir": str(work),
    }
    return result


def _summary(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    return {
        "n": len(values),
        "median": round(statistics.median(ordered), 2),
        "p90": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 2),
        "max": round(ordered[-1], 2),
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        f"chaos soak: {result['duration_s']:.0f} s, model {result['model']}, seed {result['seed']}, "
        f"{result['broker_restarts']} broker restarts",
        "",
        f"{'prompts pushed':32} {result['prompts_pushed']}",
        f"{'  with a preference':32} {result['prompts_with_preference']}",
        f"{'  lost':32} {result['prompts_lost']}",
        f"{'preferences':32} {result['preferences']}",
        f"{'  trained':32} {result['preferences_trained']}",
        f"{'  trained twice':32} {result['preferences_trained_twice']}",
        f"{'  not trained (yet)':32} {result['preferences_not_trained']}",
        f"{'duplicates produced':32} {result['duplicates_produced']}",
        f"{'duplicates dropped by trainer':32} {result['duplicates_dropped_by_trainer']}",
        "",
        f"{'dead-letter topic':24} {'expected':>9} {'got':>5} {'twice':>6} headers",
    ]
    for topic, d in result["dead_letters"].items():
        counts = f"{d['expected']:>9} {d['got']:>5} {d['written_twice']:>6}"
        lines.append(f"{topic + '.dlq':24} {counts} {d['headers_complete']}")
    lines += ["", f"{'component':10} {'kills':>6} {'restarts':>9} {'recovery median / p90 / max (s)':>34}"]
    for name, c in result["components"].items():
        r = c["recovery_s"]
        shown = f"{r['median']} / {r['p90']} / {r['max']} (n={r['n']})" if r["n"] else "-"
        lines.append(f"{name:10} {c['kills']:>6} {c['restarts']:>9} {shown:>34}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    found = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    found.add_argument("--duration-s", type=float, default=600, help="seconds of faults")
    found.add_argument("--kill-every-s", type=float, default=5, help="seconds between SIGKILLs")
    found.add_argument(
        "--broker-restart-every-s", type=float, default=100, help="seconds between broker restarts"
    )
    found.add_argument("--poison-every-s", type=float, default=10, help="seconds between poison records")
    found.add_argument("--prompts-per-s", type=float, default=4, help="prompts pushed per second")
    found.add_argument("--settle-s", type=float, default=240, help="most seconds to finish after the faults")
    found.add_argument("--seed", type=int, default=1, help="the scheduler's seed")
    found.add_argument(
        "--model",
        default="fake",
        help="fake: FakeBackend stages and a tiny random trainer model; default (or a model folder): "
        "that model everywhere",
    )
    found.add_argument("--model-cache", default=str(Path(tempfile.gettempdir()) / "cai-chaos-tiny-model"))
    found.add_argument("--out", type=Path, default=RESULTS / "chaos.json")
    return found


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["stage"]:
        name, bootstrap, prefix, mark, model = argv[1:6]
        asyncio.run(_stage(name, bootstrap, prefix, Path(mark), model))
        return 0
    args = parser().parse_args(argv)
    result = soak(args)
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
