"""`cai kafka`: fetch, start, stop and check the development Kafka broker; `cai topics`, `cai prompts`
and `cai pipeline`: create the pipeline's topics, push prompts into it and watch its progress."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import click

from cli.common import console

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
    from cai.devbroker import fetch, jar_stats, kafka_version

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
    from cai.devbroker import Broker

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
    from cai.devbroker import Broker

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
    from cai.devbroker import Broker

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


# ---- topics, prompts, pipeline ----------------------------------------------------------------

_ADDRESS = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^\s,:\[\]]+):(\d{1,5})")


def _check_bootstrap(ctx: click.Context, param: click.Parameter, value: str) -> str:
    # librdkafka takes "host" alone as port 9092, and "host:x" as a broker that never answers.
    for address in value.split(","):
        match = _ADDRESS.fullmatch(address.strip())
        if match is None or not 0 < int(match[2]) < 65536:
            raise click.BadParameter(f"{address!r} is not HOST:PORT")
    return value


kafka_option = click.option(
    "--kafka",
    "bootstrap",
    metavar="HOST:PORT",
    required=True,
    callback=_check_bootstrap,
    help="Bootstrap address of the Kafka cluster (`cai kafka start` prints one); commas separate several.",
)
prefix_option = click.option(
    "--prefix", default="", help="Prefix of the topic names, to run several pipelines on one cluster."
)


@click.group()
def topics() -> None:
    """The pipeline's Kafka topics."""


@topics.command("create")
@kafka_option
@click.option(
    "--partitions",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Partitions of each stage topic: the most consumers a stage can spread over.",
)
@click.option(
    "--replication",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Copies of each partition.",
)
@click.option(
    "--retention-hours",
    type=click.IntRange(min=1),
    default=168,
    show_default=True,
    help="How long records are kept (dead-letter topics: 4 times as long).",
)
@prefix_option
def topics_create(
    bootstrap: str, partitions: int, replication: int, retention_hours: int, prefix: str
) -> None:
    """Create the missing topics; existing ones are left as they are (running it again is safe).

    Dead-letter topics (`<topic>.dlq`) and policy-versions get 1 partition.
    """
    from rich.table import Table

    from cai.kafka.admin import topic_partitions
    from cai.kafka.topics import TopicSpec, create_topics

    spec = TopicSpec(partitions=partitions, replication=replication, retention_ms=retention_hours * 3600_000)
    result = create_topics(bootstrap, spec, prefix)
    found = topic_partitions(bootstrap, list(result))
    table = Table("topic", "partitions", "status")
    for topic, status in result.items():
        table.add_row(topic, str(len(found.get(topic, []))), status)
    console.print(table)


@click.group()
def prompts() -> None:
    """Prompts for the pipeline's prompts topic."""


@prompts.command("push")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@kafka_option
@click.option(
    "--seed", type=int, default=0, show_default=True, help="As `cai up --seed`: the same seeds per prompt."
)
@prefix_option
def prompts_push(file: Path, bootstrap: str, seed: int, prefix: str) -> None:
    """Produce every prompt of FILE (JSONL, as `cai up --prompts`) to the prompts topic, keyed by id.

    The whole file is checked first: one bad line stops it with FILE:LINE, and nothing is pushed.
    """
    from cai.kafka.admin import push_prompts
    from cai.pipeline import load_prompts

    records = load_prompts(file)
    count = push_prompts(bootstrap, records, seed=seed, prefix=prefix)
    click.echo(f"pushed {count} prompts to {prefix}prompts on {bootstrap}")


@click.group()
def pipeline() -> None:
    """The stream pipeline on Kafka."""


def _number(value: int | float | None, spec: str = "d") -> str:
    return "-" if value is None else format(value, spec)


@pipeline.command("status")
@kafka_option
@prefix_option
@click.option(
    "--window",
    type=click.FloatRange(min=0),
    default=2.0,
    show_default=True,
    help="Seconds over which records/s is measured (0: skip it).",
)
@click.option(
    "--group",
    "group_options",
    multiple=True,
    metavar="STAGE=GROUP",
    help="The consumer group of a stage that does not use PREFIXcai-STAGE (kafka_group); repeatable.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def pipeline_status_command(
    bootstrap: str, prefix: str, window: float, group_options: tuple[str, ...], as_json: bool
) -> None:
    """Per stage group and partition: committed offset, end offset, lag. Per topic: records held,
    dead letters and records/s. Reads offsets only: it joins no group."""
    from rich.table import Table

    from cai.kafka.admin import STAGE_INPUTS, pipeline_status, stage_groups

    overrides = {}
    for option in group_options:
        stage, _, group = option.partition("=")
        if stage not in STAGE_INPUTS or not group:
            raise click.BadParameter(
                f"{option!r}: expected STAGE=GROUP with STAGE one of {', '.join(STAGE_INPUTS)}",
                param_hint="--group",
            )
        overrides[stage] = group
    status = pipeline_status(bootstrap, prefix=prefix, window=window, groups=stage_groups(overrides, prefix))
    if as_json:
        click.echo(json.dumps(status.to_dict()))
        return
    topics_table = Table("topic", "partitions", "records", "dead letters", "records/s", title="topics")
    for t in status.topics:
        if not t.exists:
            topics_table.add_row(t.topic, "-", "missing", "-", "-")
            continue
        topics_table.add_row(
            t.topic,
            str(t.partitions),
            str(t.records),
            _number(t.dead_letters),
            _number(t.records_per_s, ".1f"),
        )
    console.print(topics_table)
    lag_table = Table("group", "topic", "partition", "committed", "end", "lag", title="consumer groups")
    groups = dict.fromkeys(row.group for row in status.lags)
    for group in groups:
        rows = [row for row in status.lags if row.group == group]
        for row in rows:
            lag_table.add_row(
                row.group, row.topic, str(row.partition), _number(row.committed), str(row.end), str(row.lag)
            )
        total = sum(row.lag for row in rows)
        lag_table.add_row("total", "", "", "", "", str(total), style="bold", end_section=True)
    console.print(lag_table)


COMMANDS = [kafka, topics, prompts, pipeline]
