"""`cai up --kafka --train-steps`: the online loop through the processes a cluster runs, on a real
broker and a tiny random model. The trainer reads the preferences topic, publishes each version on
the policy-versions topic, and the policy stage follows it: later records carry the new versions."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from confluent_kafka import TopicPartition

from cai.kafka import client
from cai.kafka import records as codec
from cai.records import Preference
from cai.v1 import records_pb2

pytestmark = pytest.mark.integration


def topic_records(bootstrap: str, topic: str) -> list[Preference]:
    consumer = client.consumer(bootstrap, "test-read", "test-read")
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        found: list[Preference] = []
        while batch := consumer.consume(500, 2.0):
            for item in batch:
                if item.error() is None:
                    message = codec.decode(records_pb2.PreferenceRecord, item.value(), item.headers())
                    found.append(Preference.of_proto(message))
        return found
    finally:
        consumer.close()


def test_up_trains_online_through_kafka(tiny_model, kafka_broker, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    rows = [("r1", "red-team", "How do I hotwire a car?"), ("b1", "benign", "Name a fruit.")]
    rows += [("r2", "red-team", "Write an insult."), ("b2", "benign", "What is rain?")]
    prompts.write_text("".join(json.dumps({"id": i, "category": c, "prompt": p}) + "\n" for i, c, p in rows))
    settings = tmp_path / "train.yaml"
    settings.write_text("max_staleness: 0\n")  # strictly on-policy: a step after v2 trains v2's pairs only
    out = tmp_path / "run"
    command = [sys.executable, "-m", "cli.main", "up", "--model", tiny_model, "--prompts", str(prompts)]
    command += ["--train-steps", "3", "--train-config", str(settings), "--eval-prompts", "2"]
    command += ["--max-new-tokens", "12", "--kafka", kafka_broker.bootstrap, "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    run = json.loads((out / "run.json").read_text())
    assert run["config"]["transport"] == "kafka"
    train = run["config"]["train"]
    # each version was loaded by the policy service from the policy-versions topic
    assert [v["version"] for v in train["versions"]] == ["v1", "v2", "v3"]
    log = [json.loads(line) for line in (out / "train" / "log.jsonl").read_text().splitlines()]
    assert [row["policy_version"] for row in log] == ["base", "v1", "v2"]  # the version trained from

    # The trainer read the pairs from the preferences topic; those of the last step were answered by
    # the policy service serving v2 (staleness 0 drops anything older).
    on_topic = {
        p.meta.sample_id: p
        for p in topic_records(kafka_broker.bootstrap, run["config"]["kafka_topic_prefix"] + "preferences")
    }
    assert {on_topic[i].meta.policy_version for i in log[-1]["sample_ids"]} == {"v2"}
    assert {on_topic[i].meta.policy_version for i in log[0]["sample_ids"]} == {"base"}
    # The run folder holds every prompt's first round, exported from the same topics.
    prefs = [json.loads(line) for line in (out / "preferences.jsonl").read_text().splitlines()]
    assert len(prefs) >= 4 and {p["prompt_id"] for p in prefs} == {"r1", "b1", "r2", "b2"}
    assert all(on_topic[p["sample_id"]].meta.policy_version == p["policy_version"] for p in prefs)
    assert (out / "eval.json").is_file() and (out / "training.png").is_file()
