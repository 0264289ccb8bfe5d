"""`cai serve` and the client commands `cai generate`, `cai critique`, `cai compare`."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import click
import grpc
from google.protobuf.json_format import MessageToDict
from rich.table import Table

from cli.common import console, critique_flags, judge_flags
from services.settings import SERVICES, SETTINGS, ServiceName, all_fields


def _takers(name: str) -> str:
    """'judge: ' for a setting only the judge takes; '' for one every service takes."""
    takers = [service for service, cls in SETTINGS.items() if name in cls.model_fields]
    return "" if len(takers) == len(SETTINGS) else " and ".join(takers) + ": "


def _setting_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """One --flag per service setting, generated from the settings model so the two cannot drift."""
    fields = all_fields()
    for name in reversed(list(fields)):
        field = fields[name]
        kind: Any = {int: int, float: float, bool: click.BOOL}.get(cast(Any, field.annotation), str)
        command = click.option(
            f"--{name.replace('_', '-')}",
            name,
            type=kind,
            default=None,
            help=f"{_takers(name)}{field.description or name} [env: CAI_<SERVICE>_{name.upper()}]",
        )(command)
    return command


@click.command("serve")
@click.argument("service", type=click.Choice(SERVICES))
@click.option(
    "--config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="YAML file of settings (same names as the flags, with underscores).",
)
@_setting_options
def serve(service: ServiceName, config: Path | None, **flags: Any) -> None:
    """Run the policy, critique or judge gRPC service until SIGTERM.

    Settings come from these flags, else CAI_<SERVICE>_* environment variables (e.g.
    CAI_CRITIQUE_PORT), else --config, else the defaults (policy 50051, critique 50052,
    judge 50053; metrics on 9091, 9092, 9093). Logs are JSON lines on stderr.
    """
    from cli.common import quiet_transformers
    from services.observability import setup_logging
    from services.server import serve as run_service
    from services.settings import load_settings

    settings = load_settings(service, config, **flags)
    setup_logging(settings.log_level)
    quiet_transformers()
    asyncio.run(run_service(service, settings))


# ---- client commands -------------------------------------------------------------------------


def _client_options(default_port: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def wrap(command: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(
            [
                click.option("--address", default=f"localhost:{default_port}", show_default=True),
                click.option("--token", envvar="CAI_TOKEN", help="Bearer token [env: CAI_TOKEN]."),
                click.option(
                    "--tls-ca", type=click.Path(exists=True, path_type=Path), help="CA to trust (TLS)."
                ),
                click.option(
                    "--tls-cert", type=click.Path(exists=True, path_type=Path), help="Client cert (mTLS)."
                ),
                click.option(
                    "--tls-key", type=click.Path(exists=True, path_type=Path), help="Client key (mTLS)."
                ),
                click.option("--timeout", type=float, default=120.0, show_default=True, help="Deadline (s)."),
                click.option("--json", "as_json", is_flag=True, help="Print the responses as JSON lines."),
            ]
        ):
            command = option(command)
        return command

    return wrap


def _connect(options: dict[str, Any]) -> Any:
    from services.client import TLS, AsyncClient

    tls_paths = (options.pop("tls_ca"), options.pop("tls_cert"), options.pop("tls_key"))
    return AsyncClient(
        options.pop("address"),
        token=options.pop("token"),
        tls=TLS(*tls_paths) if any(tls_paths) else None,
        timeout=options.pop("timeout"),
    )


def _run(call: Callable[[], Any]) -> None:
    """Run a client coroutine; a failed call becomes one error line and exit code 1."""
    try:
        asyncio.run(call())
    except grpc.aio.AioRpcError as exc:
        from cli.common import print_error

        print_error(f"{exc.code().name}: {exc.details()}")
        sys.exit(1)


def _as_json(message: Any) -> str:
    return json.dumps(MessageToDict(message, preserving_proto_field_name=True), ensure_ascii=False)


def _conversation(prompt: str, system: str | None, response: str | None = None) -> list[dict[str, str]]:
    turns = [{"role": "system", "content": system}] if system else []
    turns.append({"role": "user", "content": prompt})
    if response is not None:
        turns.append({"role": "assistant", "content": response})
    return turns


@click.command("generate")
@click.argument("prompt")
@click.option("--system", help="A system message before the prompt.")
@click.option("-n", type=click.IntRange(min=1), default=1, show_default=True, help="Completions to sample.")
@click.option("--max-new-tokens", type=click.IntRange(min=0), default=0, help="0: the service's default.")
@click.option("--temperature", type=click.FloatRange(min=0), default=None, help="0: greedy.")
@click.option("--seed", type=int, default=None)
@click.option("--stream", is_flag=True, help="Print the text as it is generated (n = 1).")
@_client_options(50051)
def generate(**options: Any) -> None:
    """Sample completions of PROMPT from a running policy service."""
    from services.client import parameters

    as_json, stream = options.pop("as_json"), options.pop("stream")
    turns = _conversation(options.pop("prompt"), options.pop("system"))
    params = parameters(options.pop("max_new_tokens"), options.pop("temperature"), seed=options.pop("seed"))
    n = options.pop("n")

    async def call() -> None:
        async with _connect(options) as client:
            if stream:
                async for piece in client.generate_stream(turns, params):
                    if as_json:
                        click.echo(_as_json(piece))
                    else:
                        click.echo(piece.text, nl=False)
                if not as_json:
                    click.echo()
                return
            response = await client.generate(turns, n=n, params=params)
            if as_json:
                click.echo(_as_json(response))
                return
            for i, c in enumerate(response.completions):
                console.rule(
                    f"completion {i + 1} · {c.token_count} tokens · policy {response.policy_version}"
                )
                console.print(c.text, highlight=False, markup=False)

    _run(call)


@click.command("critique")
@click.argument("prompt")
@click.argument("response")
@click.option("--system", help="A system message before the prompt.")
@click.option(
    "--principle", "principles", multiple=True, help="Principle id per round (repeat); default: drawn."
)
@critique_flags
@click.option("--seed", type=int, default=None)
@_client_options(50052)
def critique(**options: Any) -> None:
    """Critique and revise RESPONSE (the answer to PROMPT) with a running critique service."""
    as_json = options.pop("as_json")
    turns = _conversation(options.pop("prompt"), options.pop("system"), options.pop("response"))
    principles, seed = options.pop("principles"), options.pop("seed")
    rounds = options.pop("critique_options").rounds

    async def call() -> None:
        async with _connect(options) as client:
            async for step in client.critique_revise(turns, rounds, principles, seed):
                if as_json:
                    click.echo(_as_json(step))
                    continue
                console.rule(f"round {step.round} · {step.principle_id}")
                console.print("[bold]Critique[/bold]")
                console.print(step.critique, highlight=False, markup=False)
                console.print("[bold]Revision[/bold]")
                console.print(step.revision, highlight=False, markup=False)

    _run(call)


@click.command("compare")
@click.argument("prompt")
@click.argument("response_a")
@click.argument("response_b")
@click.option("--system", help="A system message before the prompt.")
@judge_flags
@click.option("--principle", "principles", multiple=True, help="Principle id to judge by (repeat).")
@click.option("--seed", type=int, default=None)
@_client_options(50053)
def compare(**options: Any) -> None:
    """Ask a running judge service which of RESPONSE_A and RESPONSE_B better answers PROMPT."""
    from services.convert import judge_options_proto

    as_json = options.pop("as_json")
    turns = _conversation(options.pop("prompt"), options.pop("system"))
    a, b = options.pop("response_a"), options.pop("response_b")
    chosen = replace(options.pop("judge_options"), principles=tuple(options.pop("principles")))
    judge = judge_options_proto(chosen, options.pop("seed"))

    async def call() -> None:
        async with _connect(options) as client:
            result = await client.compare(turns, a, b, judge)
        if as_json:
            click.echo(_as_json(result))
            return
        table = Table("principle", "p(A)", "p(first) A first", "p(first) B first")
        for label in result.labels:
            swapped = f"{label.p_first_ba:.3f}" if label.HasField("p_first_ba") else "-"
            table.add_row(label.principle_id, f"{label.p_a:.3f}", f"{label.p_first_ab:.3f}", swapped)
        console.print(table)
        winner = "A" if result.p_a >= 0.5 else "B"
        console.print(f"p(A better) = {result.p_a:.3f} -> {winner} preferred (judge {result.model_id})")

    _run(call)


COMMANDS = [serve, generate, critique, compare]
