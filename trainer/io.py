"""What a training run reads from and announces to, built from its `TrainConfig`: the one place
where the entry points (`cai train`, `cai up --train-steps`) turn settings into a sample source
and policy-version publishers, and hand them to the `Trainer`.

- the source (`source`): a run folder (`FileSource`), the revisions or preferences topic
  (`KafkaSource`, exactly once: its offsets go into every checkpoint) or a queue in this process
  (`MemorySource`, the caller's);
- the publishers (online-dpo only): the policy-versions topic (`kafka`), the policy Deployment's
  rollout (`rollout_deployment`) and an HTTP server for the archives (`serve_policies_port`),
  which also sets the uri the records carry.
"""

from __future__ import annotations

import queue
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cai.errors import InvalidArgument
from cai.policy_versions import PolicyServer
from cai.records import PolicyVersion, TrainingSample
from trainer import distributed
from trainer.config import TrainConfig
from trainer.data import FileSource, Source, load_samples
from trainer.train import Publisher, Trainer, file_uri


def build_source(
    config: TrainConfig,
    should_stop: Callable[[], bool],
    feed: queue.Queue[TrainingSample | None] | None = None,
) -> Source:
    """The source `config.source` names. `should_stop` ends a wait for a stream's next sample
    (the trainer's `stop_requested`); `feed` is the queue of the memory source."""
    config.check_ready()
    if config.source == "file":
        samples = load_samples(config.data_file, config.mode)
        # With max_steps the data cycles (new order per epoch) until the steps are done.
        return FileSource(samples, config.seed, None if config.max_steps else config.epochs)
    if config.source == "kafka":
        from trainer.streams import KafkaSource

        assert config.kafka is not None  # check_ready
        return KafkaSource(
            config.kafka, config.topic, config.group, config.stream_idle_timeout_s, should_stop
        )
    if feed is None:
        raise InvalidArgument("source: 'memory' is fed by the process that runs the trainer (cai up)")
    from trainer.streams import MemorySource

    return MemorySource(feed, should_stop)


class ArchiveServer:
    """Serves the published archives over HTTP (`serve_policies_port`), for services on other
    machines: the records then carry `http://HOST:PORT/v<N>.tar` instead of a file:// uri."""

    def __init__(self, folder: Path, port: int, host: str | None = None):
        self.server = PolicyServer(folder, port)
        self.host = host or socket.getfqdn()

    def uri(self, archive: Path) -> str:
        return f"http://{self.host}:{self.server.port}/{archive.name}"

    def publish(self, version: PolicyVersion) -> None:
        """Nothing to do: the archive is already in the served folder."""

    def close(self) -> None:
        self.server.close()


@dataclass
class Publishing:
    """A run's publishers, and the uri services fetch an archive at."""

    publishers: list[Publisher] = field(default_factory=list)
    archive_uri: Callable[[Path], str] = file_uri

    def close(self) -> None:
        for publisher in self.publishers:
            publisher.close()


def build_publishers(config: TrainConfig) -> Publishing:
    """The publishers `config` names; none unless the mode is online-dpo, which publishes."""
    publishing = Publishing()
    if config.mode != "online-dpo":
        return publishing
    try:
        if config.serve_policies_port is not None:
            folder = Path(config.output_dir) / "policies"
            server = ArchiveServer(folder, config.serve_policies_port, config.policy_url_host)
            publishing.publishers.append(server)
            publishing.archive_uri = server.uri
        if config.kafka:
            from cai.policy_versions import KafkaPublisher

            topic = config.kafka_prefix + "policy-versions"
            publishing.publishers.append(KafkaPublisher(config.kafka, topic))
        if config.rollout_deployment:
            from trainer.rollout import DeploymentRollout

            publishing.publishers.append(DeploymentRollout(config.rollout_deployment))
    except BaseException:
        publishing.close()  # those started before the one that failed
        raise
    return publishing


def build_trainer(
    config: TrainConfig,
    feed: queue.Queue[TrainingSample | None] | None = None,
    publishers: Sequence[Publisher] = (),
) -> Trainer:
    """A trainer on the source and with the publishers `config` names, then the caller's own
    `publishers`; `feed` is the memory source's queue. Whatever was built is closed if a later
    part fails; once the trainer exists, it owns them (`Trainer.close`).

    Under torchrun only rank 0 reads the source and publishes; the other ranks get their samples
    from it (trainer/distributed.py)."""
    place = distributed.from_env()
    if not place.leader:
        # The first process of every other pod answers on the archive port too (an empty
        # folder: the records name rank 0's), so that each pod has a port for its probes.
        port, folder = config.serve_policies_port, Path(config.output_dir) / "policies"
        answer = [ArchiveServer(folder, port)] if port is not None and place.local_rank == 0 else []
        return Trainer(config, distributed.FollowerSource(), answer)
    source = build_source(config, lambda: trainer.stop_requested, feed)
    try:
        publishing = build_publishers(config)
    except BaseException:
        source.close()
        raise
    trainer = Trainer(config, source, [*publishing.publishers, *publishers], publishing.archive_uri)
    return trainer
