"""online-dpo on the in-process source: staleness filtering and policy-version publishing, on a
tiny random model (what it learns does not matter here, which samples it learns from does)."""

from __future__ import annotations

import json
import logging
import queue
from dataclasses import replace
from pathlib import Path

import pytest

from cai.errors import InvalidArgument
from cai.policy_versions import fetch_adapter, version_index
from cai.records import PolicyVersion, TrainingSample
from trainer.checkpoint import checkpoints
from trainer.config import TrainConfig
from trainer.streams import MemorySource
from trainer.train import Trainer


def sample(i: int, version: str) -> TrainingSample:
    prompt = [{"role": "user", "content": f"Question {i}?"}]
    chosen = [{"role": "assistant", "content": f"Answer {i}."}]
    rejected = [{"role": "assistant", "content": "No."}]
    return TrainingSample(f"s{i}", f"test:{i}", prompt, (chosen, rejected), 0.8, version)


class Recorder:
    """A publisher that keeps what it is told."""

    def __init__(self) -> None:
        self.published: list[PolicyVersion] = []
        self.closed = False

    def publish(self, version: PolicyVersion) -> None:
        self.published.append(version)

    def close(self) -> None:
        self.closed = True


def online_config(model: str, out: Path, **overrides) -> TrainConfig:
    values = {
        "model": model,
        "mode": "online-dpo",
        "source": "memory",
        "output_dir": str(out),
        "device": "cpu",
        "dtype": "float32",
        "micro_batch_size": 2,
        "publish_every": 1,
        "max_staleness": 0,
        "lr_scheduler": "constant",
        "lora_target_modules": ["q_proj", "v_proj"],
        **overrides,
    }
    return TrainConfig.from_dict(values)


def test_stale_samples_are_dropped_and_each_step_publishes_a_version(tiny_model, tmp_path):
    # publish_every 1: after step k the newest version is v<k>, and max_staleness 0 keeps only
    # samples of exactly that version.
    feed: queue.Queue[TrainingSample | None] = queue.Queue()
    plan = [
        (0, "base"), (1, "base"),  # step 1 (current: base)
        (2, "base"), (3, "v1"), (4, "v1"),  # step 2 (current: v1): s2 is one version old
        (5, "v1"), (6, "v2"), (7, "v9"),  # step 3 (current: v2): s5 is old
        (8, "base"), (9, "v3"),  # step 4 (current: v3): s8 is old
    ]  # fmt: skip
    for i, version in plan:
        feed.put(sample(i, version))
    feed.put(None)
    recorder = Recorder()
    trainer = Trainer(
        online_config(tiny_model, tmp_path / "out", max_steps=5),
        MemorySource(feed, lambda: trainer.stop_requested),
        [recorder],
    )
    trained: list[list[str]] = []
    result = trainer.train(lambda step: trained.append(step.sample_ids))
    trainer.close()
    assert recorder.closed
    published = recorder.published
    # s7 claims a version newer than any published: counted as fresh. The source ends after s9.
    assert trained == [["s0", "s1"], ["s3", "s4"], ["s6", "s7"], ["s9"]]
    assert result.stale == 3 and result.steps == 4
    assert [v.version for v in published] == ["v1", "v2", "v3", "v4"]
    assert [v.step for v in published] == [1, 2, 3, 4]
    # each archive kept (the newest three) is what its record says: it unpacks into an adapter
    assert sorted(p.name for p in (tmp_path / "out" / "policies").iterdir()) == ["v2.tar", "v3.tar", "v4.tar"]
    for version in published[1:]:
        folder = fetch_adapter(version, tmp_path / "cache")
        assert (folder / "adapter_model.safetensors").is_file()
    tampered = PolicyVersion("v9", published[-1].uri, "0" * 64, 9)
    with pytest.raises(InvalidArgument, match="sha256"):
        fetch_adapter(tampered, tmp_path / "cache")


def test_without_a_limit_every_sample_is_trained(tiny_model, tmp_path):
    feed: queue.Queue[TrainingSample | None] = queue.Queue()
    for i, version in enumerate(["base", "base", "base", "v1"]):
        feed.put(sample(i, version))
    feed.put(None)
    trainer = Trainer(
        online_config(tiny_model, tmp_path / "out", max_steps=2, max_staleness=None, publish_every=5),
        MemorySource(feed, lambda: False),
    )
    result = trainer.train()
    trainer.close()
    assert result.stale == 0 and result.samples == 4


def test_version_names():
    assert [version_index(v) for v in ("base", "", "v3", "v12", "latest", "v")] == [0, 0, 3, 12, None, None]


def test_online_dpo_needs_a_stream_and_lora(tmp_path):
    with pytest.raises(InvalidArgument, match="source: online-dpo"):
        TrainConfig.from_dict({"mode": "online-dpo", "data": str(tmp_path)})
    with pytest.raises(InvalidArgument, match="lora: online-dpo"):
        TrainConfig.from_dict({"mode": "online-dpo", "source": "memory", "lora": False, "max_steps": 1})
    with pytest.raises(InvalidArgument, match="data: a run folder is read by source 'file' only"):
        TrainConfig.from_dict(
            {"source": "kafka", "kafka": "127.0.0.1:9092", "max_steps": 1, "data": "runs/x"}
        )
    with pytest.raises(InvalidArgument, match="max_steps: a stream"):
        TrainConfig.from_dict({"source": "kafka", "kafka": "127.0.0.1:9092"})
    with pytest.raises(InvalidArgument, match="max_staleness"):
        TrainConfig.from_dict({"max_staleness": -1})


def test_stream_records_become_samples():
    # revisions feed sft (prompt -> final revision), preferences feed dpo; bad ones are refused
    from cai.records import Preference, Revision
    from cai.v1 import common_pb2, records_pb2

    prompt = records_pb2.PromptRecord(
        prompt_id="p1",
        conversation=common_pb2.Conversation(
            messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content="Hi?")]
        ),
    )
    meta = common_pb2.SampleMetadata(sample_id="s1", policy_version="v2")
    step = records_pb2.RevisionStep(principle_id="p", critique="Rude.", revision="Hello!")
    chain = records_pb2.RevisionRecord(
        metadata=meta, prompt=prompt, initial="Go.", steps=[step], final="Hello!"
    )
    revision = TrainingSample.of(Revision.of_proto(chain), "t@1")
    assert revision.prompt == [{"role": "user", "content": "Hi?"}]
    assert revision.completions == ([{"role": "assistant", "content": "Hello!"}],)
    assert revision.policy_version == "v2" and revision.where == "t@1"
    # p_a: the judge's p(the first response is better); the chosen one is first when p_a >= 0.5
    for p_a in (0.7, 0.3):
        pair = records_pb2.PreferenceRecord(
            metadata=meta, prompt=prompt, chosen="A.", rejected="B.", p_chosen=0.7, p_a=p_a
        )
        preference = TrainingSample.of(Preference.of_proto(pair), "t@2")
        assert [c[0]["content"] for c in preference.completions] == ["A.", "B."]
        assert preference.p_chosen == pytest.approx(0.7)
    with pytest.raises(InvalidArgument, match="p_a"):
        Preference.of_proto(
            records_pb2.PreferenceRecord(metadata=meta, prompt=prompt, chosen="A", rejected="B", p_a=1.5)
        )
    with pytest.raises(InvalidArgument, match="sample_id"):
        Revision.of_proto(records_pb2.RevisionRecord(prompt=prompt, initial="x", final="x"))


class SmallWindow(Trainer):
    dedupe_window = 6  # samples: small, so a short run fills it


def test_a_long_stream_keeps_a_flat_checkpoint_and_still_drops_recent_replays(tiny_model, tmp_path):
    feed: queue.Queue[TrainingSample | None] = queue.Queue()
    order = [*range(12), 10, *range(12, 40), 0]  # s10 replayed soon after, s0 long after
    for i in order:
        feed.put(replace(sample(i, "base"), sample_id=f"s{i:04d}"))
    feed.put(None)
    config = online_config(
        tiny_model,
        tmp_path / "out",
        max_steps=100,
        max_staleness=None,
        publish_every=1000,
        checkpoint_every=1,
        keep_checkpoints=100,
    )
    trainer = SmallWindow(config, MemorySource(feed, lambda: False))
    trained: list[str] = []
    result = trainer.train(lambda step: trained.extend(step.sample_ids))
    trainer.close()
    # the replay inside the window is dropped; s0, seen 40 samples earlier, is trained again
    assert result.duplicates == 1 and trained.count("s0010") == 1 and trained.count("s0000") == 2
    folders = [folder for _, folder in sorted(checkpoints(Path(config.output_dir)))]
    states = [json.loads((folder / "state.json").read_text()) for folder in folders]
    assert [len(s["trained_ids"]) for s in states[:3]] == [2, 4, 6]
    assert all(len(s["trained_ids"]) == 6 for s in states[3:])
    assert states[-1]["trained_ids"][-1] == "s0000"  # oldest first, the newest last
    sizes = {len(json.dumps(s["trained_ids"])) for s in states[3:]}
    assert len(sizes) == 1  # flat once the window is full, however long the run


class FewWarnings(Trainer):
    unknown_versions_logged = 2


def test_unknown_policy_versions_are_warned_about_once_each_and_not_kept_without_limit(
    tiny_model, tmp_path, caplog
):
    feed: queue.Queue[TrainingSample | None] = queue.Queue()
    for i, version in enumerate(["odd-1", "odd-1", "odd-2", "odd-3", "odd-4", "odd-3"]):
        feed.put(sample(i, version))
    feed.put(None)
    config = online_config(tiny_model, tmp_path / "out", max_steps=3, max_staleness=0, publish_every=10)
    trainer = FewWarnings(config, MemorySource(feed, lambda: False))
    with caplog.at_level(logging.WARNING, logger="cai.trainer"):
        result = trainer.train()
    trainer.close()
    assert result.samples == 6 and result.stale == 0  # unknown versions count as fresh
    warned = [r.getMessage() for r in caplog.records if "is not one of this trainer's" in r.getMessage()]
    assert warned == [
        "policy version 'odd-1' is not one of this trainer's: counted as fresh",
        "policy version 'odd-2' is not one of this trainer's: counted as fresh",
    ]
    assert trainer._unknown_versions == {"odd-1", "odd-2"}
