"""`cai eval`: a thin command over `cai.evaluation.evaluate`."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from cai.engine import RESPONSE_PARAMS, JudgeOptions
from cai.errors import CAIError, InvalidArgument, NotFound
from cli.common import CAIGroup, device_option, dtype_option, judge_flags

SERVICE = "policy:"  # a running policy service, e.g. policy:127.0.0.1:50051


def split_policy(spec: str) -> tuple[str, str | None]:
    """'MODEL[:ADAPTER]' -> (model, adapter or None). A spec that is an existing folder is a model."""
    if spec == "default" or spec.startswith(SERVICE) or Path(spec).expanduser().is_dir():
        return spec, None
    model, sep, adapter = spec.rpartition(":")
    if not sep or not model or not adapter:
        return spec, None
    return model, adapter


def _resolve(spec: str, flag: str) -> str:
    from cai.models import resolve_model

    if spec.startswith(SERVICE):
        return spec
    try:
        return resolve_model(spec)
    except NotFound as exc:
        raise NotFound(f"{flag}: {str(exc).removeprefix('--model: ')}") from exc


def _check_adapter(path: str, flag: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise NotFound(f"{flag}: adapter folder {path} does not exist")
    if not (folder / "adapter_config.json").is_file():
        raise NotFound(
            f"{flag}: {path} is not a peft adapter folder (no adapter_config.json); "
            "`cai train` writes one to OUTPUT_DIR/model/"
        )
    return folder


@click.group("eval", cls=CAIGroup, invoke_without_command=True)
@click.option(
    "--policy",
    default=None,
    metavar="MODEL[:ADAPTER]",
    help="The model to evaluate: 'default' or a model folder, optionally with ':' and a LoRA adapter "
    "folder (what `cai train` writes to OUTPUT_DIR/model/), or policy:HOST:PORT, a running policy "
    "service (whatever version it serves). --baseline and --judge take the same forms.",
)
@click.option(
    "--adapter",
    default=None,
    metavar="DIR",
    help="A LoRA adapter folder for the policy (instead of MODEL:ADAPTER).",
)
@click.option(
    "--baseline",
    default=None,
    metavar="MODEL",
    help="The model to compare against (default: the policy's model without the adapter).",
)
@click.option("--judge", default="default", show_default=True, metavar="MODEL", help="The judge model.")
@click.option(
    "--prompts",
    type=click.Path(path_type=Path),
    default=None,
    help="JSONL prompt file with a `category` per line (default: the built-in red-team and benign prompts).",
)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N prompts.")
@click.option(
    "--constitution",
    "constitution_path",
    default="default",
    show_default=True,
    help="Constitution file or built-in name: its comparison principles guide the judge.",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Sampling, principle and bootstrap seed."
)
@click.option(
    "--max-new-tokens",
    type=click.IntRange(min=1),
    default=96,
    show_default=True,
    help="Length limit of each answer.",
)
@click.option(
    "--ci",
    "ci_method",
    type=click.Choice(["bootstrap", "normal"]),
    default="bootstrap",
    show_default=True,
    help="95% confidence interval of the win-rate: percentile bootstrap or normal approximation.",
)
@click.option(
    "--bootstrap-samples", type=click.IntRange(min=1), default=2000, show_default=True, help="Resamples."
)
@click.option(
    "--refusal-threshold",
    type=click.FloatRange(0, 1, max_open=True),
    default=0.4,
    show_default=True,
    help="An answer counts as a refusal when the judge's p(refusal) is above this (see docs/training.md).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("eval.json"),
    show_default=True,
    help="JSON report to write.",
)
@device_option
@dtype_option
@judge_flags
@click.pass_context
def eval_command(
    ctx: click.Context,
    policy: str | None,
    adapter: str | None,
    baseline: str | None,
    judge: str,
    prompts: Path | None,
    limit: int | None,
    constitution_path: str,
    seed: int,
    max_new_tokens: int,
    ci_method: str,
    bootstrap_samples: int,
    refusal_threshold: float,
    out: Path,
    device: str | None,
    dtype: str,
    judge_options: JudgeOptions,
) -> None:
    """Judge's win-rate of a policy over a baseline per prompt category, with a confidence interval,
    and the refusal rate on benign prompts (`cai eval --policy ...`); `cai eval judge` measures the
    judge itself on labelled pairs."""
    if ctx.invoked_subcommand is not None:
        return
    if policy is None:
        raise click.UsageError("give --policy MODEL[:ADAPTER] (or a command such as `cai eval judge`)")
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from cai import constitution as constitution_mod
    from cai import evaluation, pipeline
    from cai.models import DEFAULT_MODEL, is_ready, setup_default_model
    from cai.paths import default_model_dir
    from cli.common import console, quiet_transformers

    model_spec, inline_adapter = split_policy(policy)
    if inline_adapter and adapter:
        raise InvalidArgument("--adapter: the policy already names an adapter (MODEL:ADAPTER); give one")
    adapter_dir = (
        _check_adapter(adapter, "--adapter")
        if adapter
        else _check_adapter(inline_adapter, "--policy")
        if inline_adapter
        else None
    )
    if model_spec.startswith(SERVICE) and (adapter_dir or not baseline):
        raise InvalidArgument(
            "--policy: a policy service serves its own version; give --baseline (and no adapter)"
        )
    baseline_spec = baseline or model_spec
    records = pipeline.load_prompts(prompts, limit)
    cons = constitution_mod.load(constitution_path)
    config = evaluation.EvalConfig(
        seed=seed,
        response_params=replace(RESPONSE_PARAMS, max_new_tokens=max_new_tokens),
        judge=judge_options,
        ci_method=ci_method,  # type: ignore[arg-type]
        bootstrap_samples=bootstrap_samples,
        refusal_threshold=refusal_threshold,
    )
    config.validate()
    if out.is_dir():
        raise InvalidArgument(f"--out: {out} is a folder; give a file name such as eval.json")

    quiet_transformers()
    specs = {"--policy": model_spec, "--baseline": baseline_spec, "--judge": judge}
    if DEFAULT_MODEL in specs.values() and not is_ready(default_model_dir()):
        setup_default_model(progress=console.print)
    paths = {flag: _resolve(spec, flag) for flag, spec in specs.items()}

    from cai.backends.base import Backend
    from cai.backends.transformers import TransformersBackend

    loaded: dict[str, Backend] = {}  # one backend per model, whatever roles it plays
    for flag, path in paths.items():
        if path not in loaded and not path.startswith(SERVICE):
            with console.status(f"loading {path}"):
                try:
                    loaded[path] = TransformersBackend(path, device=device, dtype=dtype)
                except NotFound as exc:
                    raise NotFound(f"{flag}: {str(exc).removeprefix('--model: ')}") from exc
    columns = (TextColumn("{task.description:<18}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())

    async def run(progress: Progress) -> evaluation.EvalReport:
        from services.backends import PolicyServiceBackend

        tasks = {stage: progress.add_task(stage, total=len(records)) for stage in evaluation.STAGES}
        try:
            for path in paths.values():
                if path not in loaded:  # a policy service: its channel lives in this event loop
                    loaded[path] = PolicyServiceBackend(path.removeprefix(SERVICE))
                    await loaded[path].start()  # its model and version, or a clear error
            policy_b, baseline_b, judge_b = (loaded[paths[f]] for f in ("--policy", "--baseline", "--judge"))
            progress.console.print(
                f"policy {policy_b.model_id}@{policy_b.policy_version}"
                f"{f' + adapter {adapter_dir}' if adapter_dir else ''}, baseline {baseline_b.model_id}, "
                f"judge {judge_b.model_id}, constitution {cons.id} {cons.version}, {len(records)} prompts",
                highlight=False,
            )
            return await evaluation.evaluate(
                policy_b,
                baseline_b,
                judge_b,
                cons,
                records,
                config,
                adapter=adapter_dir,
                advance=lambda stage: progress.advance(tasks[stage]),
            )
        except (OSError, ValueError) as exc:  # peft could not read or apply the adapter
            if adapter_dir is None or isinstance(exc, CAIError):
                raise
            flag = "--adapter" if adapter else "--policy"
            raise InvalidArgument(f"{flag}: cannot load adapter {adapter_dir}: {exc}") from exc
        finally:
            for backend in loaded.values():
                await backend.close()

    with Progress(*columns, console=console) as progress:
        report = asyncio.run(run(progress))
    console.print(evaluation.report_table(report))
    write_report(report.to_dict(), out)
    console.print(f"wrote {out} in {report.duration_s:.0f} s", highlight=False)


def write_report(data: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(out)


@eval_command.command("judge")
@click.option(
    "--pairs",
    type=click.Path(path_type=Path),
    default=None,
    help="JSONL of labelled pairs: ours (prompt, better, worse, category) or the CAI paper's HHH "
    "comparison format (prompt with Options: (A) ... (B) ..., corrects, incorrects). "
    "Default: the built-in 64 pairs.",
)
@click.option("--judge", default="default", show_default=True, metavar="MODEL", help="The judge model.")
@click.option(
    "--constitution",
    "constitution_path",
    default="default",
    show_default=True,
    help="Constitution file or built-in name: its comparison principles guide the judge.",
)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N pairs.")
@click.option(
    "--all-principles",
    is_flag=True,
    help="Judge every pair under every comparison principle (per-principle figures on every pair; "
    "as many times slower as there are principles) instead of drawing principles as training does.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the principle draws.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("judge-quality.json"),
    show_default=True,
    help="JSON report to write; the reliability diagram goes beside it as a PNG of the same name.",
)
@device_option
@dtype_option
@judge_flags
def judge_command(
    pairs: Path | None,
    judge: str,
    constitution_path: str,
    limit: int | None,
    all_principles: bool,
    seed: int,
    out: Path,
    device: str | None,
    dtype: str,
    judge_options: JudgeOptions,
) -> None:
    """How well the judge tells the better answer of a labelled pair from the worse one: accuracy,
    mean p(right), position consistency, labels at 0.5 and calibration, per category and principle."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.text import Text

    from cai import constitution as constitution_mod
    from cai import judge_quality
    from cai.models import DEFAULT_MODEL, is_ready, setup_default_model
    from cai.paths import default_model_dir
    from cli.common import console, err_console, quiet_transformers

    records = judge_quality.load_pairs(pairs, limit)
    cons = constitution_mod.load(constitution_path)
    if all_principles:
        judge_options = replace(judge_options, principles=tuple(p.id for p in cons.comparison_principles))
    elif judge_options.k_principles > len(cons.comparison_principles):
        raise InvalidArgument(
            f"--k-principles: {judge_options.k_principles} is more than the "
            f"{len(cons.comparison_principles)} comparison principles of {cons.id}"
        )
    quiet_transformers()
    if judge == DEFAULT_MODEL and not is_ready(default_model_dir()):
        setup_default_model(progress=console.print)
    path = _resolve(judge, "--judge")
    if path.startswith(SERVICE):
        raise InvalidArgument("--judge: give a model folder or 'default'; a policy service cannot judge")
    from cai.backends.transformers import TransformersBackend

    with console.status(f"loading {path}"):
        backend = TransformersBackend(path, device=device, dtype=dtype)
    console.print(
        f"judge {backend.model_id} ({dtype}), constitution {cons.id} {cons.version}, {len(records)} pairs"
        f"{', every principle' if all_principles else ''}",
        highlight=False,
    )
    columns = (TextColumn("{task.description:<18}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())

    async def run(progress: Progress) -> judge_quality.JudgeQualityReport:
        task = progress.add_task("judgments", total=len(records))
        try:
            return await judge_quality.judge_quality(
                backend,
                cons,
                records,
                judge_options,
                seed,
                str(pairs or judge_quality.builtin_pairs_file()),
                advance=lambda: progress.advance(task),
            )
        finally:
            await backend.close()

    with Progress(*columns, console=console) as progress:
        report = asyncio.run(run(progress))
    console.print(judge_quality.report_table(report))
    for warning in report.warnings():
        err_console.print(Text.assemble(("warning: ", "yellow"), warning), highlight=False, soft_wrap=True)
    write_report(report.to_dict(), out)
    plot = out.with_suffix(".png")
    judge_quality.plot_reliability(report, plot)
    console.print(f"wrote {out} and {plot} in {report.duration_s:.0f} s", highlight=False)


COMMANDS = [eval_command]
