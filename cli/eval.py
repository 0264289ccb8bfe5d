"""`cai eval`: thin commands over `cai.evaluation.evaluate_stages` (policies against a baseline)
and `cai.judge_quality` (`cai eval judge`: the judge on labelled pairs)."""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import click
from rich.text import Text

from cai.engine import RESPONSE_PARAMS, JudgeOptions
from cai.errors import CAIError, InvalidArgument, NotFound
from cai.records import Prompt
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


@dataclass(frozen=True)
class PolicySpec:
    """One --policy: its stage name, model (or policy service) and adapter folder."""

    name: str
    model: str
    adapter: Path | None
    flag: str  # for messages: --policy, or --adapter when the adapter came from there


def parse_policies(policies: tuple[str, ...], adapter: str | None) -> list[PolicySpec]:
    """'[NAME=]MODEL[:ADAPTER]' per --policy. NAME defaults to 'policy' for one, else to the adapter
    folder's last two parts (out/dpo/model -> dpo/model) or the model."""
    if adapter and len(policies) > 1:
        raise InvalidArgument(
            "--adapter: give adapters as --policy NAME=MODEL:ADAPTER when there are several"
        )
    specs = []
    for spec in policies:
        name, sep, rest = spec.partition("=")
        if not sep or not re.fullmatch(r"[\w.+-]+", name):
            name, rest = "", spec
        model, inline = split_policy(rest)
        if inline and adapter:
            raise InvalidArgument("--adapter: the policy already names an adapter (MODEL:ADAPTER); give one")
        folder = (
            _check_adapter(adapter, "--adapter")
            if adapter
            else _check_adapter(inline, "--policy")
            if inline
            else None
        )
        if not name:
            name = (
                "policy"
                if len(policies) == 1
                else "/".join(folder.resolve().parts[-2:])
                if folder
                else Path(model).name or model
            )
        specs.append(PolicySpec(name, model, folder, "--adapter" if adapter else "--policy"))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise InvalidArgument(f"--policy: stage names repeat ({', '.join(names)}); name them as NAME=MODEL")
    return specs


def load_eval_prompts(prompts: str, limit: int | None) -> list[Prompt]:
    """A prompt file, or a built-in set by name; with `limit`, that many in turn from each category."""
    from cai import pipeline
    from cai.evaluation import builtin_heldout_file
    from cli.online import balanced_prompts

    builtin = {"heldout": builtin_heldout_file(), "training": None}
    records = pipeline.load_prompts(builtin[prompts] if prompts in builtin else Path(prompts))
    return balanced_prompts(records, limit) if limit else records


@click.group("eval", cls=CAIGroup, invoke_without_command=True)
@click.option(
    "--policy",
    "policies",
    multiple=True,
    metavar="[NAME=]MODEL[:ADAPTER]",
    help="A model to evaluate: 'default' or a model folder, optionally with ':' and a LoRA adapter "
    "folder (what `cai train` writes to OUTPUT_DIR/model/), or policy:HOST:PORT, a running policy "
    "service (whatever version it serves). Repeat it to compare stages, each against the baseline: "
    "--policy sft=default:out/sft/model --policy dpo=default:out/dpo/model. "
    "--baseline, --judge and --check-judge take the model forms.",
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
    help="The model to compare against (default: the first policy's model without an adapter).",
)
@click.option("--judge", default="default", show_default=True, metavar="MODEL", help="The judge model.")
@click.option(
    "--prompts",
    default="heldout",
    show_default=True,
    metavar="FILE|heldout|training",
    help="JSONL prompt file with a `category` per line (red-team, benign, borderline, or your own), "
    "or a built-in set: heldout (24 red-team, 24 benign, 52 borderline prompts that no built-in "
    "training run uses) or training (the prompts `cai up` trains on).",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=None,
    help="Use only N prompts, taken in turn from each category.",
)
@click.option(
    "--constitution",
    "constitution_path",
    default="default",
    show_default=True,
    help="Constitution file or built-in name: its comparison principles guide the judge.",
)
@click.option(
    "--check-constitution",
    default=None,
    metavar="FILE|NAME",
    help="The independent check's constitution (default: harmlessness, or default when --constitution "
    "is harmlessness): a second set of principles that training did not use.",
)
@click.option(
    "--check-judge",
    default=None,
    metavar="MODEL",
    help="The independent check's feedback model (default: --judge).",
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
    help="JSON report to write; the stage plot goes beside it as a PNG of the same name.",
)
@device_option
@dtype_option
@judge_flags
@click.pass_context
def eval_command(
    ctx: click.Context,
    policies: tuple[str, ...],
    adapter: str | None,
    baseline: str | None,
    judge: str,
    prompts: str,
    limit: int | None,
    constitution_path: str,
    check_constitution: str | None,
    check_judge: str | None,
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
    """Win-rates of policies over a baseline on held-out prompts (harmlessness on red-team prompts,
    helpfulness on benign ones) with confidence intervals, refusal rates on harmful and on
    harmless-but-sensitive prompts, and an independent check (`cai eval --policy ...`);
    `cai eval judge` measures the judge itself on labelled pairs."""
    if ctx.invoked_subcommand is not None:
        return
    if not policies:
        raise click.UsageError("give --policy MODEL[:ADAPTER] (or a command such as `cai eval judge`)")
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from cai import constitution as constitution_mod
    from cai import evaluation
    from cai.models import DEFAULT_MODEL, is_ready, setup_default_model
    from cai.paths import default_model_dir
    from cli.common import console, err_console, quiet_transformers

    specs = parse_policies(policies, adapter)
    for spec in specs:
        if spec.model.startswith(SERVICE) and (spec.adapter or not baseline):
            raise InvalidArgument(
                "--policy: a policy service serves its own version; give --baseline (and no adapter)"
            )
    baseline_spec = baseline or specs[0].model
    records = load_eval_prompts(prompts, limit)
    cons = constitution_mod.load(constitution_path)
    check_cons = constitution_mod.load(
        check_constitution or ("default" if cons.id == "harmlessness" else "harmlessness")
    )
    config = evaluation.EvalConfig(
        seed=seed,
        response_params=replace(RESPONSE_PARAMS, max_new_tokens=max_new_tokens),
        judge=judge_options,
        ci_method=ci_method,  # type: ignore[arg-type]
        bootstrap_samples=bootstrap_samples,
        refusal_threshold=refusal_threshold,
    )
    config.validate()

    quiet_transformers()
    roles = [(f"--policy {s.name}", s.model) for s in specs] + [
        ("--baseline", baseline_spec),
        ("--judge", judge),
        ("--check-judge", check_judge or judge),
    ]
    if any(spec == DEFAULT_MODEL for _, spec in roles) and not is_ready(default_model_dir()):
        setup_default_model(progress=console.print)
    paths = {role: _resolve(spec, role.split()[0]) for role, spec in roles}

    from cai.backends.base import Backend
    from cai.backends.transformers import TransformersBackend

    loaded: dict[str, Backend] = {}  # one backend per model, whatever roles it plays
    for role, path in paths.items():
        if path not in loaded and not path.startswith(SERVICE):
            with console.status(f"loading {path}"):
                try:
                    loaded[path] = TransformersBackend(path, device=device, dtype=dtype)
                except NotFound as exc:
                    raise NotFound(f"{role.split()[0]}: {str(exc).removeprefix('--model: ')}") from exc
    columns = (TextColumn("{task.description:<18}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())

    async def run(progress: Progress) -> list[tuple[str, evaluation.EvalReport]]:
        from services.backends import PolicyServiceBackend

        totals = {"baseline answers": len(records)}
        tasks = {
            stage: progress.add_task(stage, total=totals.get(stage, len(records) * len(specs)))
            for stage in evaluation.STAGES
        }
        current: PolicySpec | None = None
        try:
            for path in paths.values():
                if path not in loaded:  # a policy service: its channel lives in this event loop
                    loaded[path] = PolicyServiceBackend(path.removeprefix(SERVICE))
                    await loaded[path].start()  # its model and version, or a clear error
            baseline_b, judge_b, check_b = (
                loaded[paths[r]] for r in ("--baseline", "--judge", "--check-judge")
            )
            progress.console.print(
                f"baseline {baseline_b.model_id}, judge {judge_b.model_id}, constitution {cons.id} "
                f"{cons.version}; check: judge {check_b.model_id}, constitution {check_cons.id}; "
                f"{len(records)} prompts",
                highlight=False,
            )
            reports: list[tuple[str, evaluation.EvalReport]] = []
            for spec in specs:
                current = spec
                [(name, report)] = await evaluation.evaluate_stages(
                    [evaluation.PolicyStage(spec.name, loaded[paths[f"--policy {spec.name}"]], spec.adapter)],
                    baseline_b,
                    judge_b,
                    cons,
                    records,
                    config,
                    advance=lambda stage: progress.advance(tasks[stage]),
                    check=evaluation.IndependentCheck(check_b, check_cons),
                    baseline_answers=[i.baseline_answer for i in reports[0][1].items] if reports else None,
                )
                reports.append((name, report))
            return reports
        except (OSError, ValueError) as exc:  # peft could not read or apply the adapter
            if current is None or current.adapter is None or isinstance(exc, CAIError):
                raise
            raise InvalidArgument(f"{current.flag}: cannot load adapter {current.adapter}: {exc}") from exc
        finally:
            for backend in loaded.values():
                await backend.close()

    with Progress(*columns, console=console) as progress:
        reports = asyncio.run(run(progress))
    if len(reports) == 1:
        console.print(evaluation.report_table(reports[0][1]))
    console.print(evaluation.stage_table(reports))
    warnings = evaluation.stage_warnings(reports)
    for warning in warnings:
        err_console.print(Text.assemble(("warning: ", "yellow"), warning), highlight=False, soft_wrap=True)
    stages = {"stages": evaluation.stage_rows(reports), "warnings": warnings}
    if len(reports) == 1:  # one policy: the report itself, as before, with the stage summary
        data = reports[0][1].to_dict() | stages
    else:
        data = stages | {"reports": {name: report.to_dict() for name, report in reports}}
    write_report(data, out)
    plot = out.with_suffix(".png")
    evaluation.plot_stages(reports, plot)
    duration = sum(report.duration_s for _, report in reports)
    console.print(f"wrote {out} and {plot} in {duration:.0f} s", highlight=False)


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
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=None,
    help="Use only N pairs, taken in turn from each category.",
)
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
