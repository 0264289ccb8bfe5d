"""`cai kafka`: fetch, start, stop and check the development Kafka broker."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The broker's data directory (storage, state and logs) [default: $CAI_HOME/kafka/data].",
)


def _say(line: str) -> None:
    # Progress goes to stderr: stdout of `cai kafka start` is only HOST:PORT, for scripts.
    click.echo(line, err=True)


@click.group()  # `cai`'s own group turns CAIErrors raised here into one-line errors
def kafka() -> None:
    """A single-node Apache Kafka broker (KRaft) on loopback, for development and tests."""


@kafka.command("fetch")
def fetch_command() -> None:
    """Download Kafka's jars with Maven into $CAI_HOME/kafka/<version>/libs (skipped when present)."""
    from cai.kafka.broker import fetch, jar_stats, kafka_version

    libs = fetch(progress=_say)
    count, size = jar_stats(libs)
    click.echo(f"Apache Kafka {kafka_version()}: {count} jars, {size / 1e6:.0f} MB in {libs}")


@kafka.command("start")
@data_dir_option
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=None,
    help="Client port on 127.0.0.1 [default: the one this data dir used before, else a free one].",
)
@click.option(
    "--timeout", type=click.FloatRange(min=1), default=90, show_default=True, help="Seconds to wait for it."
)
def start_command(data_dir: Path | None, port: int | None, timeout: float) -> None:
    """Start the broker in the background, wait until it serves clients, print HOST:PORT.

    Formats the data dir on first use; later starts keep its topics and records. Does nothing
    (but print the address) when the broker already runs.
    """
    from cai.kafka.broker import Broker

    status = Broker(data_dir).start(port=port, timeout=timeout, progress=_say)
    _say(f"Kafka broker ready (pid {status.pid}), log: {status.log_file}")
    click.echo(status.bootstrap)


@kafka.command("stop")
@data_dir_option
@click.option(
    "--timeout", type=click.FloatRange(min=0), default=30, show_default=True, help="Seconds before SIGKILL."
)
def stop_command(data_dir: Path | None, timeout: float) -> None:
    """Stop the broker: SIGTERM (a controlled shutdown), SIGKILL if it has not exited in time."""
    from cai.kafka.broker import Broker

    broker = Broker(data_dir)
    pid = broker.status().pid
    if broker.stop(timeout=timeout):
        click.echo(f"stopped the Kafka broker (pid {pid})")
    else:
        click.echo(f"no Kafka broker runs on {broker.data_dir}")


@kafka.command("status")
@data_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
def status_command(data_dir: Path | None, as_json: bool) -> None:
    """Say whether the broker runs, and where. Exit status: 0 running, 1 not running."""
    from cai.kafka.broker import Broker

    status = Broker(data_dir).status()
    if as_json:
        click.echo(json.dumps(status.to_dict()))
    elif status.running:
        click.echo(
            f"running on {status.bootstrap} (pid {status.pid}), data dir {status.data_dir}, "
            f"log {status.log_file}"
        )
    else:
        last = f", last port {status.port}" if status.port else ""
        click.echo(f"stopped, data dir {status.data_dir}{last}")
    sys.exit(0 if status.running else 1)


COMMANDS = [kafka]
