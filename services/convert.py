"""Proto messages <-> core types. Every check names the request field it rejects."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cai.backends.base import Backend, Completion, FinishReason, SamplingParams
from cai.constitution import Conversation
from cai.engine import PrincipleLabel
from cai.errors import InvalidArgument
from cai.v1 import common_pb2, judge_pb2, policy_pb2
from services.settings import ServiceSettings

ROLES = {
    common_pb2.ROLE_SYSTEM: "system",
    common_pb2.ROLE_USER: "user",
    common_pb2.ROLE_ASSISTANT: "assistant",
}
ROLE_VALUES = {name: value for value, name in ROLES.items()}
FINISH_REASONS: dict[FinishReason, common_pb2.FinishReason] = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "cancelled": common_pb2.FINISH_REASON_CANCELLED,
}
FINISH_NAMES: dict[int, FinishReason] = {value: name for name, value in FINISH_REASONS.items()}


@dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int
    max_new_tokens: int
    max_n: int
    max_rounds: int
    max_batch: int

    def to_proto(self) -> policy_pb2.Limits:
        return policy_pb2.Limits(
            max_prompt_tokens=self.max_prompt_tokens,
            max_new_tokens=self.max_new_tokens,
            max_n=self.max_n,
            max_rounds=self.max_rounds,
            max_batch=self.max_batch,
        )


def limits_of(settings: ServiceSettings) -> Limits:
    return Limits(
        settings.max_prompt_tokens,
        settings.max_new_tokens,
        settings.max_n,
        settings.max_rounds,
        settings.max_batch,
    )


def conversation(message: common_pb2.Conversation, field: str = "conversation") -> Conversation:
    if not message.messages:
        raise InvalidArgument(f"{field}: must have at least one message")
    turns: Conversation = []
    for i, m in enumerate(message.messages):
        if m.role not in ROLES:
            raise InvalidArgument(
                f"{field}.messages[{i}].role: must be ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT, got {m.role}"
            )
        if not m.content.strip():
            raise InvalidArgument(f"{field}.messages[{i}].content: must not be empty")
        turns.append({"role": ROLES[m.role], "content": m.content})
    return turns


def conversation_proto(turns: Conversation) -> common_pb2.Conversation:
    return common_pb2.Conversation(
        messages=[common_pb2.Message(role=ROLE_VALUES[t["role"]], content=t["content"]) for t in turns]
    )


def sampling(
    message: common_pb2.GenerationParameters,
    limits: Limits,
    default: SamplingParams,
    n: int = 1,
    field: str = "parameters",
) -> SamplingParams:
    """Request parameters over `default`; zero values mean the default, as the protos document."""
    if message.max_new_tokens > limits.max_new_tokens:
        raise InvalidArgument(
            f"{field}.max_new_tokens: {message.max_new_tokens} is above this service's limit "
            f"of {limits.max_new_tokens}"
        )
    if n > limits.max_n:
        raise InvalidArgument(f"n: {n} is above this service's limit of {limits.max_n}")
    if message.temperature < 0:
        raise InvalidArgument(f"{field}.temperature: must be >= 0, got {message.temperature:g}")
    if not 0 <= message.top_p <= 1:
        raise InvalidArgument(f"{field}.top_p: must be in (0, 1], got {message.top_p:g}")
    if any(not s for s in message.stop):
        raise InvalidArgument(f"{field}.stop: stop strings must not be empty")
    return SamplingParams(
        max_new_tokens=message.max_new_tokens or min(default.max_new_tokens, limits.max_new_tokens),
        temperature=message.temperature if message.HasField("temperature") else default.temperature,
        top_p=message.top_p or default.top_p,
        stop=tuple(message.stop) or default.stop,
        n=max(n, 1),
        seed=message.seed if message.HasField("seed") else default.seed,
    )


def parameters_proto(params: SamplingParams) -> common_pb2.GenerationParameters:
    return common_pb2.GenerationParameters(
        max_new_tokens=params.max_new_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        stop=list(params.stop),
        seed=params.seed,
    )


async def check_prompt_length(backend: Backend, text: str, limits: Limits, field: str) -> None:
    tokens = await backend.count_tokens(text)
    if tokens is not None and tokens > limits.max_prompt_tokens:
        raise InvalidArgument(
            f"{field}: {tokens} tokens is above this service's limit of {limits.max_prompt_tokens}"
        )


async def prompt_text(backend: Backend, message: policy_pb2.PolicyInput, field: str = "input") -> str:
    kind = message.WhichOneof("input")
    if kind == "conversation":
        return await backend.render(conversation(message.conversation, f"{field}.conversation"))
    if kind == "raw_prompt" and message.raw_prompt:
        return message.raw_prompt
    raise InvalidArgument(f"{field}: set conversation or a non-empty raw_prompt")


def completion_proto(c: Completion) -> policy_pb2.Completion:
    return policy_pb2.Completion(
        text=c.text, token_count=c.tokens, finish_reason=FINISH_REASONS[c.finish_reason]
    )


def check_count(field: str, values: Sequence[object], low: int, high: int) -> None:
    if not low <= len(values) <= high:
        raise InvalidArgument(f"{field}: give between {low} and {high} items, got {len(values)}")


def labels_proto(labels: Sequence[PrincipleLabel]) -> list[judge_pb2.PrincipleLabel]:
    return [
        judge_pb2.PrincipleLabel(
            principle_id=label.principle_id,
            p_a=label.p_a,
            p_first_ab=label.p_first_ab,
            p_first_ba=label.p_first_ba,
            reasoning=[r for r in label.reasoning if r],
        )
        for label in labels
    ]


def labels_of(labels: Sequence[judge_pb2.PrincipleLabel]) -> list[PrincipleLabel]:
    return [
        PrincipleLabel(
            label.principle_id,
            label.p_a,
            label.p_first_ab,
            label.p_first_ba if label.HasField("p_first_ba") else None,
            list(label.reasoning),
        )
        for label in labels
    ]
