"""`cai up`: the whole pipeline on one machine, in process, through the services or through Kafka."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from rich.table import Table
from rich.text import Text

from cai.engine import CritiqueOptions, JudgeOptions
from cai.errors import InvalidArgument
from cli.common import console, critique_flags, device_option, dtype_option, judge_flags, quiet_transformers


@click.command()
@critique_flags
@judge_flags
@click.option(
    "--prompts",
    type=click.Path(path_type=Path),
    default=None,
    help="JSONL prompt file (default: the built-in 40 red-team + 40 benign prompts).",
)
@click.option(
    "--constitution",
    "constitution_path",
    default="default",
    show_default=True,
    help="Constitution file or built-in name.",
)
@click.option(
    "--model",
    default="default",
    show_default=True,
    help="'default', a local Hugging Face model folder, or a hub id.",
)
@click.option(
    "--judge-model",
    default=None,
    metavar="FOLDER|HUB_ID",
    help="Feedback model for critique, revision and judging, with its own tokenizer and chat "
    "template (default: the policy's base weights).",
)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N prompts.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--out", type=click.Path(path_type=Path), default=None, help="Run folder (default: runs/<timestamp>)."
)
@click.option(
    "--pairs",
    type=click.Choice(["revision", "samples"]),
    default="revision",
    show_default=True,
    help="revision: judge the final revision against the initial answer; "
    "samples: judge two sampled answers (RL-CAI).",
)
@click.option(
    "--max-new-tokens",
    type=click.IntRange(min=1),
    default=96,
    show_default=True,
    help="Length limit of the initial answers.",
)
@device_option
@dtype_option
@click.option(
    "--services",
    is_flag=True,
    help="Start the policy, critique and judge gRPC services on loopback and run through them.",
)
@click.option(
    "--kafka",
    metavar="HOST:PORT",
    default=None,
    help="Run the stages as stream stages on this Kafka broker (topics cai-up.<run id>.<random>.*) "
    "and export their records into the run folder.",
)
@click.option(
    "--train-steps",
    type=click.IntRange(min=0),
    default=16,
    show_default=True,
    help="Also train the policy online for N DPO steps while the pipeline runs, serving each "
    "published version, and evaluate it before and after (0: data only). With --kafka the trainer "
    "reads the preferences topic and the policy service follows the policy-versions topic.",
)
@click.option(
    "--train-config",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="YAML of trainer settings for --train-steps (see `cai train`), e.g. learning_rate, "
    "publish_every (default: about 4 versions per run, the last at the last step), max_staleness.",
)
@click.option(
    "--eval-prompts",
    type=click.IntRange(min=0),
    default=16,
    show_default=True,
    help="With --train-steps: prompts for the before/after evaluation, taken in turn from each "
    "category of the prompt file (whatever --limit says).",
)
def up(
    prompts: Path | None,
    constitution_path: str,
    model: str,
    judge_model: str | None,
    limit: int | None,
    seed: int,
    out: Path | None,
    pairs: str,
    max_new_tokens: int,
    device: str | None,
    dtype: str,
    services: bool,
    kafka: str | None,
    train_steps: int,
    train_config: Path | None,
    eval_prompts: int,
    critique_options: CritiqueOptions,
    judge_options: JudgeOptions,
) -> None:
    """Run SL-CAI and RL-CAI data generation on one machine and write runs/<id>/; with
    --train-steps (the default) also train the policy online and evaluate it before and after."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from cai import constitution as constitution_mod
    from cai import pipeline
    from cai.backends.base import SamplingParams
    from cai.models import DEFAULT_MODEL, is_ready, resolve_model, setup_default_model
    from cai.paths import default_model_dir

    if services and kafka:
        raise InvalidArgument("--services and --kafka: choose one transport")
    if out is not None and out.is_dir() and any(out.iterdir()):
        raise InvalidArgument(
            f"--out: {out} is not empty; choose a new folder so no earlier run is overwritten"
        )
    records = pipeline.load_prompts(prompts, limit)
    cons = constitution_mod.load(constitution_path)
    quiet_transformers()
    if model == DEFAULT_MODEL and not is_ready(default_model_dir()):
        setup_default_model(progress=console.print)
    from cai.backends.transformers import TransformersBackend
    from cai.engine import CAIEngine

    with console.status(f"loading {model}"):
        backend = TransformersBackend(resolve_model(model), device=device, dtype=dtype)
    feedback = None
    if judge_model is not None:
        if judge_model == DEFAULT_MODEL and not is_ready(default_model_dir()):
            setup_default_model(progress=console.print)
        with console.status(f"loading the feedback model {judge_model}"):
            feedback = TransformersBackend(resolve_judge_model(judge_model), device=device, dtype=dtype)
    config = pipeline.RunConfig(
        out=out or pipeline.new_run_dir(),
        prompts=prompts,
        limit=limit,
        critique=critique_options,
        seed=seed,
        judge=judge_options,
        pairs=pairs,  # type: ignore[arg-type]
        response_params=SamplingParams(max_new_tokens=max_new_tokens, temperature=0.7, top_p=0.95),
    )
    console.print(
        f"constitution {cons.id} {cons.version} (sha256 {cons.hash[:12]}), model {backend.model_id}, "
        f"{backend.device} {str(backend.dtype).removeprefix('torch.')}, {len(records)} prompts"
        + (f", feedback model {feedback.model_id}" if feedback else "")
        + (", through the gRPC services on loopback" if services else "")
        + (f", through Kafka at {kafka}" if kafka else ""),
        highlight=False,
    )
    columns = (TextColumn("{task.description:<18}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())

    async def run(progress: Progress) -> dict[str, Any]:
        tasks = {
            stage: progress.add_task(stage, total=len(records))
            for stage in ("responses", "critiques", "judgments")
        }
        advance = lambda stage: progress.advance(tasks[stage])  # noqa: E731
        if kafka:
            from cli.kafka_run import run_through_kafka

            return await run_through_kafka(backend, cons, config, records, kafka, advance, feedback)
        if not services:
            engine = CAIEngine(feedback or backend, cons)
            return await pipeline.run(pipeline.LocalStages(engine, policy=backend), config, records, advance)
        from cli.loopback import loopback_stages

        async with loopback_stages(backend, cons, feedback) as stages:
            return await pipeline.run(stages, config, records, advance)

    if train_steps:
        # The evaluation draws from the whole prompt file, so a --limit run still sees every category.
        from cli.online import balanced_prompts

        eval_set = balanced_prompts(pipeline.load_prompts(prompts), eval_prompts)
        transport = Transport(services, kafka)
        _up_with_training(
            backend, feedback, cons, config, records, train_steps, train_config, eval_set, dtype, transport
        )
        return
    with Progress(*columns, console=console) as progress:
        info = asyncio.run(run(progress))
    _print_summary(info, pairs, config.out)


def resolve_judge_model(spec: str) -> str:
    from cai.errors import NotFound
    from cai.models import resolve_model

    try:
        return resolve_model(spec)
    except NotFound as exc:  # its message names --model
        raise NotFound(str(exc).replace("--model:", "--judge-model:")) from None


@dataclass(frozen=True)
class Transport:
    services: bool = False
    kafka: str | None = None


def _up_with_training(
    policy: Any,
    judge: Any,
    cons: Any,
    config: Any,
    records: list[Any],
    steps: int,
    train_config_file: Path | None,
    eval_set: list[Any],
    dtype: str,
    transport: Transport,
) -> None:
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from cai import pipeline
    from cai.backends.transformers import TransformersBackend
    from cai.engine import EngineConfig
    from cai.evaluation import STAGES, comparison_table
    from cli.online import write_outputs
    from trainer.config import TrainConfig

    # About four versions per run, the last one at the last step (it is the one evaluated).
    every = next(d for d in range(max(1, steps // 4), 0, -1) if steps % d == 0)
    defaults = {"publish_every": every}
    run = {
        "model": policy.model_id,
        "mode": "online-dpo",
        "source": "memory",
        "output_dir": str(config.out / "train"),
        "max_steps": steps,
        "device": str(policy.device),
        "dtype": dtype,
    }
    extra: dict[str, Any] = {}
    if transport.kafka:
        from cli.kafka_run import topic_prefix

        prefix = topic_prefix(config.out)
        run |= {"source": "kafka", "kafka": transport.kafka, "kafka_prefix": prefix}
        extra = {"transport": "kafka", "kafka_topic_prefix": prefix}
    elif transport.services:
        extra = {"transport": "services"}
    if train_config_file is not None:
        train = TrainConfig.from_yaml(train_config_file, run, defaults)
    else:
        train = TrainConfig.from_dict(defaults | run)
    # The feedback model and the evaluation's baseline are the base weights, never trained: a copy
    # of its own, since the policy's weights change.
    with console.status("loading the base weights (feedback model and baseline, not trained)"):
        base = TransformersBackend(policy.model_id, device=policy.device, dtype=dtype)
    feedback = judge or base
    console.print(
        f"online DPO: {steps} steps of {train.samples_per_step} pairs, a new policy version every "
        f"{train.publish_every} steps, max staleness {train.max_staleness}; "
        f"evaluation on {len(eval_set)} prompts before and after",
        highlight=False,
    )
    columns = (TextColumn("{task.description:<18}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    started = time.time()
    config.out.mkdir(parents=True, exist_ok=True)
    with Progress(*columns, console=console) as progress:
        tasks = {
            # before and after: each prompt passes every evaluation stage
            "eval": progress.add_task("evaluation", total=2 * len(STAGES) * len(eval_set)),
            "pairs": progress.add_task("pairs generated", total=None),
            "steps": progress.add_task("training steps", total=steps),
        }

        def advance(task: str, amount: float) -> None:
            progress.advance(tasks[task], amount)

        online = asyncio.run(
            _train_online(policy, feedback, base, cons, config, records, train, eval_set, advance, transport)
        )
    loop_info = write_outputs(config.out, online)
    info = pipeline.write_run_info(
        config,
        online.results,
        started,
        cons,
        policy.model_id,
        EngineConfig(),
        train=loop_info,
        **extra,
    )
    _print_summary(info, config.pairs, config.out)
    if online.before and online.after:
        console.print(comparison_table([("before", online.before), ("after", online.after)]))
    latencies = ", ".join(f"{v['version']} {v['publish_to_serve_s']:.2f} s" for v in online.versions)
    console.print(
        f"trained {len(online.steps)} steps ({online.stale} stale pairs dropped); policy versions "
        f"served (publish to serve): {latencies or 'none'}; plot: {config.out / 'training.png'}, "
        f"evaluation: {config.out / 'eval.json'}",
        highlight=False,
    )


async def _train_online(
    policy: Any,
    feedback: Any,
    base: Any,
    cons: Any,
    config: Any,
    records: list[Any],
    train: Any,
    eval_set: list[Any],
    advance: Any,
    transport: Transport,
) -> Any:
    """The loop through the transport `cai up` was given: in process, the services or Kafka."""
    from cli.online import LocalPairs, run_online

    def loop(pairs: Any = None) -> Any:
        return run_online(
            policy, feedback, cons, config, records, train, eval_set, advance, pairs=pairs, baseline=base
        )

    if transport.kafka:
        from cli.kafka_run import KafkaPipeline

        pipeline = KafkaPipeline(
            policy, cons, config, transport.kafka, train.kafka_prefix, feedback, follow=True
        )
        async with pipeline:
            return await loop(pipeline)
    if transport.services:
        from cli.loopback import loopback_stages

        async with loopback_stages(policy, cons, feedback) as stages:
            return await loop(LocalPairs(stages, config, policy, Path(train.output_dir) / "served"))
    return await loop()


def _print_summary(info: dict[str, Any], pairs: str, out: Path) -> None:
    first = "revision" if pairs == "revision" else "sample A"
    table = Table(
        "category",
        "prompts",
        f"mean p({first} better)",
        f"{first} preferred",
        "initial chars",
        "final chars",
        title="cai up summary",
    )
    for row in info["summary"]:
        table.add_row(
            row["category"],
            str(row["prompts"]),
            f"{row['mean_p_first']:.3f}",
            f"{row['first_preferred']:.0%}",
            f"{row['mean_initial_chars']:.0f}",
            f"{row['mean_final_chars']:.0f}",
        )
    console.print(table)
    signals = info["signals"]
    consistency = signals["position_consistency"]
    console.print(
        f"label signal: {signals['uninformative_share']:.0%} of {signals['labels']} labels within "
        f"{signals['uninformative_margin']} of 0.5, mean |p - 0.5| {signals['mean_margin']:.3f}, "
        f"{signals['no_signal_share']:.0%} without signal; position consistency "
        + (
            f"{consistency:.0%} of {signals['both_orders']} verdicts"
            if consistency is not None
            else "n/a (--no-debias)"
        ),
        highlight=False,
    )
    if signals["warning"]:
        console.print(Text.assemble(("warning: ", "bold yellow"), signals["warning"]), soft_wrap=True)
    console.print(
        f"wrote {info['counts']['sft']} SFT examples, {info['counts']['preferences']} preference pairs "
        f"and {info['counts']['revisions']} revision chains to {out}/ in {info['duration_s']:.0f} s",
        highlight=False,
    )


COMMANDS = [up]
