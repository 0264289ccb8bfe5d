"""The trainer under torchrun (2 ranks, gloo) on a real broker: SIGKILL one rank or the other at
random moments, restart the job, and every preference on the topic is trained exactly once.
Rank 0 alone reads the topic and writes the checkpoints with its offsets, so a kill on either
rank rolls the whole job back to the same step."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from cai.kafka import records
from cai.kafka.topics import TopicSpec, create_topics
from tests.kafka.test_stream import push
from tests.kafka.test_trainer import preference, trained_steps

pytestmark = pytest.mark.integration

STEPS = 40  # room for three kills a few steps apart however fast the steps run
GLOBAL_BATCH = 2  # 1 pair on each of 2 ranks
KILLS = 3


def worker(launcher: subprocess.Popen[bytes], rank: int) -> psutil.Process | None:
    """The process torchrun started for `rank`, by the RANK in its environment."""
    try:
        children = psutil.Process(launcher.pid).children()
    except psutil.NoSuchProcess:
        return None
    for child in children:
        try:
            if child.environ().get("RANK") == str(rank):
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


@pytest.mark.timeout(900)
def test_sigkilled_ranks_train_every_preference_exactly_once(kafka_broker, tiny_model, tmp_path):
    bootstrap = kafka_broker.bootstrap
    prefix = f"t{uuid.uuid4().hex[:8]}."
    create_topics(bootstrap, TopicSpec(partitions=3), prefix=prefix)
    count = STEPS * GLOBAL_BATCH
    ids = [f"pref-{i:03d}" for i in range(count)]
    items = [(f"p{i}".encode(), *records.encode(preference(i))) for i in range(count)]
    items[6:6] = [items[2], items[5]]  # written twice by an at-least-once stage: trained once
    push(bootstrap, prefix + "preferences", items)

    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "-m", "cli.main", "train", "--source", "kafka", "--kafka", bootstrap,
        "--kafka-prefix", prefix, "--mode", "dpo", "--model", tiny_model, "--output-dir", str(out),
        "--max-steps", str(STEPS), "--micro-batch-size", "1", "--checkpoint-every", "1",
        "--keep-checkpoints", "2", "--device", "cpu", "--dtype", "float32",
        "--lora-target-modules", "q_proj,v_proj", "--stream-idle-timeout-s", "60",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd())}
    rng = random.Random(11)
    killed_ranks = []
    for kill in range(KILLS):
        before = len(trained_steps(out))
        errors = tmp_path / f"stderr-{kill}.txt"
        with errors.open("wb") as sink:
            launcher = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=sink)
        try:
            # a random moment: 1 to 3 steps after the restart, somewhere inside the next step
            due = before + rng.randint(1, 3)
            deadline = time.monotonic() + 180
            while len(trained_steps(out)) < due and launcher.poll() is None:
                assert time.monotonic() < deadline, f"no step trained: {errors.read_text()[-2000:]}"
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.02))
            assert launcher.poll() is None, f"the job ended before its kill: {errors.read_text()[-2000:]}"
            rank = kill % 2 if kill < 2 else rng.randrange(2)  # each rank at least once
            target = worker(launcher, rank)
            assert target is not None, f"no rank {rank} to kill: {errors.read_text()[-2000:]}"
            target.send_signal(signal.SIGKILL)
            killed_ranks.append(rank)
            # torchrun sees the dead rank and ends the other; the job fails as a whole
            assert launcher.wait(timeout=120) != 0
        finally:
            if launcher.poll() is None:
                launcher.kill()
                launcher.wait()
    assert set(killed_ranks) == {0, 1}
    final = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "resumed at step" in " ".join(final.stdout.split())

    steps = trained_steps(out)
    assert [row["step"] for row in steps] == list(range(1, STEPS + 1))
    trained = [sample_id for row in steps for sample_id in row["sample_ids"]]
    assert len(trained) == len(set(trained)), "a preference was trained twice"
    assert sorted(trained) == ids, "a preference was skipped"
