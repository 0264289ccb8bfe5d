"""trainer/io.py: the source and publishers a config names, built by the entry points and owned by
the trainer they are handed to."""

from __future__ import annotations

import queue
import urllib.request
from pathlib import Path

import pytest

from cai.errors import InvalidArgument, NotFound, Unavailable
from cai.records import PolicyVersion
from trainer.config import TrainConfig
from trainer.data import FileSource
from trainer.io import ArchiveServer, build_publishers, build_source
from trainer.streams import MemorySource
from trainer.train import Trainer, file_uri


class Recorder:
    def __init__(self) -> None:
        self.published: list[PolicyVersion] = []
        self.closed = 0

    def publish(self, version: PolicyVersion) -> None:
        self.published.append(version)

    def close(self) -> None:
        self.closed += 1


def online(tmp_path: Path, **values) -> TrainConfig:
    base = {"mode": "online-dpo", "source": "memory", "max_steps": 1, "output_dir": str(tmp_path / "out")}
    return TrainConfig.from_dict(base | values)


def test_the_config_names_the_source(run_dir, tmp_path):
    source = build_source(TrainConfig(data=str(run_dir)), lambda: False)
    assert isinstance(source, FileSource) and source.size == 5 and source.epochs == 1
    cycling = build_source(TrainConfig(data=str(run_dir), max_steps=9), lambda: False)
    assert isinstance(cycling, FileSource) and cycling.epochs is None  # until max_steps
    feed: queue.Queue = queue.Queue()
    memory = build_source(online(tmp_path), lambda: False, feed)
    assert isinstance(memory, MemorySource) and memory.queue is feed and memory.size is None
    with pytest.raises(InvalidArgument, match="source: 'memory' is fed by the process"):
        build_source(online(tmp_path), lambda: False)
    with pytest.raises(NotFound, match=r"has no sft\.jsonl"):
        build_source(TrainConfig(mode="sft", data=str(tmp_path)), lambda: False)
    with pytest.raises(InvalidArgument, match="kafka: give the broker"):
        build_source(TrainConfig(source="kafka", max_steps=1), lambda: False)


def test_only_online_dpo_publishes(tmp_path):
    offline = build_publishers(TrainConfig(serve_policies_port=0, kafka="127.0.0.1:1"))
    assert offline.publishers == [] and offline.archive_uri is file_uri
    plain = build_publishers(online(tmp_path))
    assert plain.publishers == [] and plain.archive_uri is file_uri


def test_the_archive_server_gives_the_uri_the_records_carry(tmp_path):
    publishing = build_publishers(online(tmp_path, serve_policies_port=0, policy_url_host="127.0.0.1"))
    try:
        (server,) = publishing.publishers
        assert isinstance(server, ArchiveServer)
        archive = tmp_path / "out" / "policies" / "v1.tar"
        archive.write_bytes(b"weights")
        uri = publishing.archive_uri(archive)
        assert uri == f"http://127.0.0.1:{server.server.port}/v1.tar"
        with urllib.request.urlopen(uri, timeout=10) as response:
            assert response.read() == b"weights"
    finally:
        publishing.close()


def test_a_trainer_that_cannot_start_closes_what_it_was_given(tmp_path):
    recorder = Recorder()
    source = MemorySource(queue.Queue(), lambda: True)
    config = online(tmp_path, model=str(tmp_path / "no-such-model"))
    with pytest.raises(NotFound):
        Trainer(config, source, [recorder])
    assert recorder.closed == 1


def test_publishers_started_before_one_that_fails_are_closed(monkeypatch, tmp_path):
    # the archive server starts, then the rollout finds no Kubernetes credentials
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)
    monkeypatch.setattr("kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION", str(tmp_path / "none"))
    closed: list[ArchiveServer] = []
    real_close = ArchiveServer.close
    monkeypatch.setattr(ArchiveServer, "close", lambda self: (closed.append(self), real_close(self)))
    config = online(tmp_path, serve_policies_port=0, rollout_deployment="cai/policy")
    with pytest.raises(Unavailable, match="no Kubernetes credentials for rollout_deployment"):
        build_publishers(config)
    assert len(closed) == 1
