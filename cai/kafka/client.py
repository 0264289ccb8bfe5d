"""The librdkafka settings of every Kafka client of the project, in one place.

Every client names itself (`client.id`, shown in the broker's logs and metrics) and logs through
the `cai.kafka.client` logger. Producers are idempotent and wait for every in-sync replica
(acks=all, DESIGN.md section 4): a retry never writes a record twice. Consumers commit only what
their owner says is done (no auto-commit) and start from the beginning of a partition their group
has no offset for.

`quiet=True` is for the short-lived clients of the CLI (and the dev broker's readiness check):
no librdkafka log lines, whose connection retries would bury a one-line CLI error, and no topic
created by asking for it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from confluent_kafka import Consumer, Producer
    from confluent_kafka.admin import AdminClient

LOGGER = "cai.kafka.client"

Config = dict[str, Any]


def client_config(bootstrap: str, client_id: str, *, quiet: bool = False) -> Config:
    """What every client has: where the cluster is, who is asking, where librdkafka logs go."""
    config: Config = {
        "bootstrap.servers": bootstrap,
        "client.id": client_id,
        "logger": logging.getLogger(LOGGER),
    }
    if quiet:
        # librdkafka logs every failed connection attempt; the errors that matter reach us as
        # exceptions or delivery reports. Admin clients and producers default to creating a
        # missing topic they are asked about, with the broker's default partitions.
        config |= {"log_level": 0, "allow.auto.create.topics": False}
    return config


def producer_config(
    bootstrap: str, client_id: str, extra: Mapping[str, Any] | None = None, *, quiet: bool = False
) -> Config:
    """An idempotent producer with acks=all; `extra` adds or overrides settings (linger.ms, ...)."""
    return {
        **client_config(bootstrap, client_id, quiet=quiet),
        "enable.idempotence": True,
        "acks": "all",
        **(extra or {}),
    }


def consumer_config(
    bootstrap: str, client_id: str, group: str, extra: Mapping[str, Any] | None = None
) -> Config:
    """A consumer in `group` that commits only explicitly and starts at the earliest record.

    A member that dies without leaving (SIGKILL, a lost node) keeps its partitions until its
    session times out, so the session is 10 s, not librdkafka's 45 s: a killed stage's partitions
    move to its replacement about that much sooner. Heartbeats come from librdkafka's own thread,
    so a slow record does not end a session."""
    return {
        **client_config(bootstrap, client_id),
        "group.id": group,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": 10_000,
        "heartbeat.interval.ms": 3_000,
        **(extra or {}),
    }


def producer(
    bootstrap: str, client_id: str, extra: Mapping[str, Any] | None = None, *, quiet: bool = False
) -> Producer:
    from confluent_kafka import Producer

    return Producer(producer_config(bootstrap, client_id, extra, quiet=quiet))


def consumer(bootstrap: str, client_id: str, group: str, extra: Mapping[str, Any] | None = None) -> Consumer:
    from confluent_kafka import Consumer

    return Consumer(consumer_config(bootstrap, client_id, group, extra))


def admin(bootstrap: str, client_id: str) -> AdminClient:
    """An admin client for one command: quiet, and never creating topics by asking about them."""
    from confluent_kafka.admin import AdminClient

    return AdminClient(client_config(bootstrap, client_id, quiet=True))
