"""The development Kafka broker, for real: records in and out with confluent-kafka, a restart that
loses nothing, status from another process, and `cai kafka` as a user runs it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from cai.devbroker import Broker, BrokerNotReady, PortInUse

CAI = [sys.executable, "-m", "cli.main"]


def new_topic(bootstrap: str) -> str:
    name = f"test-{uuid.uuid4().hex[:12]}"
    with AdminClient({"bootstrap.servers": bootstrap}) as admin:
        admin.create_topics([NewTopic(name, num_partitions=1, replication_factor=1)])[name].result()
    return name


def producer(bootstrap: str) -> Producer:
    # What the stages will use (DESIGN.md section 4): acks from every in-sync replica, no duplicates
    # on retry.
    return Producer(
        {"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True, "retries": 10}
    )


def send(producer: Producer, topic: str, key: bytes, value: bytes, timeout: float) -> Message:
    """Produce one record and wait for its delivery report; the record as the broker stored it."""
    reports: list[Message] = []
    producer.produce(topic, key=key, value=value, on_delivery=lambda _, message: reports.append(message))
    assert producer.flush(timeout) == 0, f"not delivered in {timeout} s"
    [report] = reports
    assert report.error() is None, report.error()
    return report


def read_all(bootstrap: str, topic: str, expected: int, timeout: float = 30) -> list[tuple[bytes, bytes]]:
    """Every record of partition 0 from the start. librdkafka wants a group id even so; assign()
    never joins the group."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "unused", "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    records: list[tuple[bytes, bytes]] = []
    deadline = time.monotonic() + timeout
    try:
        while len(records) < expected and time.monotonic() < deadline:
            for r in consumer.consume(expected - len(records), timeout=0.5):
                assert r.error() is None, r.error()
                records.append((r.key(), r.value()))
    finally:
        consumer.close()
    return records


def cai(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CAI, *args], capture_output=True, text=True, timeout=timeout, check=False)


def test_a_record_goes_in_and_comes_out(kafka_broker: Broker) -> None:
    topic = new_topic(kafka_broker.bootstrap)
    stored = send(producer(kafka_broker.bootstrap), topic, b"k1", b"hello kafka", timeout=30)
    assert (stored.topic(), stored.partition(), stored.offset()) == (topic, 0, 0)
    assert read_all(kafka_broker.bootstrap, topic, 1) == [(b"k1", b"hello kafka")]


def test_a_restart_keeps_address_topics_records_and_committed_offsets(kafka_broker: Broker) -> None:
    bootstrap = kafka_broker.bootstrap
    topic = new_topic(bootstrap)
    before = producer(bootstrap)
    group = f"group-{uuid.uuid4().hex[:8]}"
    for i in range(5):
        before.produce(topic, key=str(i).encode(), value=f"before {i}".encode())
    assert before.flush(30) == 0
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    consumer.commit(offsets=[TopicPartition(topic, 0, 3)], asynchronous=False)
    consumer.close()
    pid = kafka_broker.status().pid

    status = kafka_broker.restart()

    assert status.running and status.pid != pid
    assert kafka_broker.bootstrap == bootstrap  # clients reconnect to the address they have
    # The producer made before the restart reconnects on its own and goes on.
    send(before, topic, b"5", b"after", timeout=60)
    expected = [(str(i).encode(), f"before {i}".encode()) for i in range(5)] + [(b"5", b"after")]
    assert read_all(bootstrap, topic, 6) == expected
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        [committed] = consumer.committed([TopicPartition(topic, 0)], timeout=10)
        assert committed.offset == 3
    finally:
        consumer.close()


def test_status_from_another_object_follows_stop_and_start(kafka_broker: Broker) -> None:
    # A second Broker on the same data dir stands for another process: it knows only broker.json.
    other = Broker(kafka_broker.data_dir)
    running = other.status()
    assert running.running and running.pid and running.bootstrap == kafka_broker.bootstrap
    assert kafka_broker.start().pid == running.pid  # starting a running broker changes nothing
    try:
        assert other.stop() is True
        stopped = kafka_broker.status()
        assert not stopped.running and stopped.pid is None
        assert stopped.port == running.port  # remembered for the next start
        assert other.stop() is False
    finally:
        again = kafka_broker.start()
    assert again.running and again.bootstrap == running.bootstrap


def test_a_busy_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(PortInUse, match=f"port {port} on 127.0.0.1 is in use"):
            Broker(tmp_path / "data").start(port=port)


def test_a_broker_that_dies_at_start_points_to_its_log(kafka_broker: Broker, tmp_path: Path) -> None:
    # Storage that belongs to another node id: Kafka refuses it and exits.
    broker = Broker(tmp_path / "data", detach=False)
    broker.storage_dir.mkdir(parents=True)
    meta = kafka_broker.storage_dir / "meta.properties"
    (broker.storage_dir / "meta.properties").write_text(meta.read_text().replace("node.id=1", "node.id=7"))
    with pytest.raises(BrokerNotReady) as error:
        broker.start(timeout=60)
    message = str(error.value)
    assert message.startswith("the Kafka broker exited with code 1 while starting: Stored node id 7 ")
    assert message.endswith(f"; see {broker.log_file}")
    assert "\n" not in message
    assert not broker.status().running


@pytest.fixture
def cli_data_dir(tmp_path: Path) -> Iterator[Path]:
    data = tmp_path / "cli-broker"
    yield data
    Broker(data).stop()  # whatever the test did


@pytest.mark.slow
def test_cai_kafka_start_status_stop(cli_data_dir: Path) -> None:
    data = str(cli_data_dir)
    started = cai("kafka", "start", "--data-dir", data)
    assert started.returncode == 0, started.stderr
    bootstrap = started.stdout.strip()
    host, port = bootstrap.split(":")
    assert host == "127.0.0.1" and int(port) > 0
    assert "ready" in started.stderr

    status = cai("kafka", "status", "--data-dir", data, "--json")
    assert status.returncode == 0
    info = json.loads(status.stdout)
    assert info["running"] and info["bootstrap"] == bootstrap
    assert Path(info["log_file"]).is_file()
    with AdminClient({"bootstrap.servers": bootstrap}) as admin:
        assert admin.describe_cluster(request_timeout=10).result().nodes[0].port == int(port)

    assert cai("kafka", "start", "--data-dir", data).stdout.strip() == bootstrap  # already running
    stopped = cai("kafka", "stop", "--data-dir", data)
    assert stopped.returncode == 0 and f"pid {info['pid']}" in stopped.stdout
    status = cai("kafka", "status", "--data-dir", data)
    assert status.returncode == 1 and status.stdout.startswith("stopped")
    with pytest.raises(ProcessLookupError):
        os.kill(info["pid"], 0)

    restarted = cai("kafka", "start", "--data-dir", data)
    assert restarted.returncode == 0 and restarted.stdout.strip() == bootstrap  # same port again
    assert cai("kafka", "stop", "--data-dir", data).returncode == 0


def test_cai_kafka_start_on_a_busy_port_fails_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = cai("kafka", "start", "--data-dir", str(tmp_path / "data"), "--port", str(port))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: port {port} on 127.0.0.1 is in use; choose another with --port"
