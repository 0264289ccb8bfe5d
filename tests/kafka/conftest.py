"""A real Apache Kafka broker (KRaft, single node) for the session, on a free loopback port."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cai.devbroker import Broker


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A started broker: `.bootstrap` ("127.0.0.1:PORT"), `.restart()` (same data dir and port),
    `.stop()`, `.start()`, `.status()`. Fetches the jars first if `make kafka` has not."""
    broker = Broker(tmp_path_factory.mktemp("kafka-broker"), detach=False)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
