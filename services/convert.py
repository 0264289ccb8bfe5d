"""Request and response messages <-> core types (records have theirs in cai/records.py). Every
check names the request field it rejects."""

from __future__ import annotations

from collections.abc import Sequence

from cai.backends.base import Completion, FinishReason, SamplingParams
from cai.constitution import Conversation
from cai.engine import JudgeOptions
from cai.errors import InvalidArgument
from cai.records import conversation_of
from cai.v1 import common_pb2, judge_pb2, policy_pb2
from services.dataplane import Limits, check_sampling

FINISH_REASONS: dict[FinishReason, common_pb2.FinishReason] = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "cancelled": common_pb2.FINISH_REASON_CANCELLED,
}
FINISH_NAMES: dict[int, FinishReason] = {value: name for name, value in FINISH_REASONS.items()}


def sampling(
    message: common_pb2.GenerationParameters,
    limits: Limits,
    default: SamplingParams,
    n: int = 1,
    field: str = "parameters",
) -> SamplingParams:
    """Request parameters over `default`; zero values mean the default, as the protos document."""
    if message.temperature < 0:
        raise InvalidArgument(f"{field}.temperature: must be >= 0, got {message.temperature:g}")
    if not 0 <= message.top_p <= 1:
        raise InvalidArgument(f"{field}.top_p: must be in (0, 1], got {message.top_p:g}")
    if any(not s for s in message.stop):
        raise InvalidArgument(f"{field}.stop: stop strings must not be empty")
    params = SamplingParams(
        max_new_tokens=message.max_new_tokens or min(default.max_new_tokens, limits.max_new_tokens),
        temperature=message.temperature if message.HasField("temperature") else default.temperature,
        top_p=message.top_p or default.top_p,
        stop=tuple(message.stop) or default.stop,
        n=max(n, 1),
        seed=message.seed if message.HasField("seed") else default.seed,
    )
    check_sampling(params, limits, field)
    return params


def parameters_proto(params: SamplingParams) -> common_pb2.GenerationParameters:
    return common_pb2.GenerationParameters(
        max_new_tokens=params.max_new_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        stop=list(params.stop),
        seed=params.seed,
    )


def prompt_input(message: policy_pb2.PolicyInput, field: str = "input") -> Conversation | str:
    """A conversation to render, or a raw prompt that is used as it is."""
    kind = message.WhichOneof("input")
    if kind == "conversation":
        return conversation_of(message.conversation, f"{field}.conversation")
    if kind == "raw_prompt" and message.raw_prompt:
        return message.raw_prompt
    raise InvalidArgument(f"{field}: set conversation or a non-empty raw_prompt")


def completion_proto(c: Completion) -> policy_pb2.Completion:
    return policy_pb2.Completion(
        text=c.text, token_count=c.tokens, finish_reason=FINISH_REASONS[c.finish_reason]
    )


def completions_of(response: policy_pb2.GenerateResponse) -> list[Completion]:
    return [
        Completion(c.text, c.token_count, FINISH_NAMES.get(c.finish_reason, "stop"), response.policy_version)
        for c in response.completions
    ]


def check_count(field: str, values: Sequence[object], low: int, high: int) -> None:
    if not low <= len(values) <= high:
        raise InvalidArgument(f"{field}: give between {low} and {high} items, got {len(values)}")


def judge_options_proto(options: JudgeOptions, seed: int | None = None) -> judge_pb2.JudgeOptions:
    """The one mapping of JudgeOptions to the protobuf, whose debias flag is inverted so that an
    unset field means the default (both orderings)."""
    return judge_pb2.JudgeOptions(
        k_principles=options.k_principles,
        principle_ids=list(options.principles),
        disable_debias=not options.debias,
        chain_of_thought=options.cot,
        seed=seed,
    )


def judge_options_of(message: judge_pb2.JudgeOptions) -> tuple[JudgeOptions, int | None]:
    """JudgeOptions and the seed (None: random) from the protobuf."""
    options = JudgeOptions(
        k_principles=message.k_principles or 1,
        debias=not message.disable_debias,
        cot=message.chain_of_thought,
        principles=tuple(message.principle_ids),
    )
    return options, message.seed if message.HasField("seed") else None
