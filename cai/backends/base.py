"""The backend interface every model runtime implements (in-process transformers, TGI, ...)."""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Literal

from cai.constitution import Conversation
from cai.errors import InvalidArgument

FinishReason = Literal["stop", "length", "cancelled"]
BASE_VERSION = "base"  # the policy version of samples from the untrained policy


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.7  # 0 means greedy decoding
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    n: int = 1
    seed: int | None = None  # per request: the same seed gives the same samples

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise InvalidArgument(f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise InvalidArgument(f"temperature: must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidArgument(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.n < 1:
            raise InvalidArgument(f"n: must be >= 1, got {self.n}")
        if any(not s for s in self.stop):
            raise InvalidArgument("stop: stop strings must not be empty")


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: int
    finish_reason: FinishReason
    policy_version: str = ""


def plain_chat(messages: Conversation) -> str:
    """A chat rendering for base models without a chat template."""
    names = {"system": "System", "user": "User", "assistant": "Assistant"}
    text = "".join(f"{names[m['role']]}: {m['content'].strip()}\n\n" for m in messages)
    return text + "Assistant:"


class Backend(ABC):
    model_id: str
    kind: str  # transformers, tgi, openai or policy
    policy_version: str = BASE_VERSION
    on_batch: Callable[[int], object] | None = None  # told its batch's rows whenever requests join (metrics)

    @property
    def queue_depth(self) -> int:
        """Rows waiting or running in this process; 0 where the queue is on a server."""
        return 0

    @abstractmethod
    async def render(self, messages: Conversation) -> str:
        """Conversation -> prompt text ending in the assistant's turn, through the model's chat template
        when it has one.

        Async because a remote backend may ask its server for the template.
        """

    @abstractmethod
    async def count_tokens(self, text: str) -> int | None:
        """Tokens in `text`, or None when the backend cannot tell (its server then enforces limits)."""

    @abstractmethod
    async def generate(self, prompt: str, params: SamplingParams) -> list[Completion]:
        """`params.n` completions of `prompt`."""

    @abstractmethod
    def generate_stream(self, prompt: str, params: SamplingParams) -> AsyncIterator[str]:
        """Text pieces of one completion as they are decoded."""

    @abstractmethod
    async def score_options(self, prompt: str, options: list[str]) -> list[float]:
        """Log-probability of each option as the continuation of `prompt`, without generating."""

    def base_weights(self) -> Backend:
        """This backend on the model's weights without any policy version's adapter, sharing its
        engine: what a feedback model asks for, so that it stays fixed while the policy trains.
        A backend that never loads policy versions is its own base."""
        return self

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect or load before serving; a server calls it once before it reports SERVING."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""


class WrappedBackend(Backend):
    """Passes every call to `inner`; subclasses override what they observe (metrics, recording)."""

    def __init__(self, inner: Backend):
        self.inner = inner
        self.kind = inner.kind

    @property
    def model_id(self) -> str:  # type: ignore[override]
        return self.inner.model_id

    @property
    def policy_version(self) -> str:  # type: ignore[override]
        return self.inner.policy_version

    @property
    def queue_depth(self) -> int:
        return self.inner.queue_depth

    def base_weights(self) -> Backend:
        view = copy.copy(self)  # the same observers, around the inner backend's base
        view.inner = self.inner.base_weights()
        return view

    async def start(self) -> None:
        await self.inner.start()

    async def render(self, messages: Conversation) -> str:
        return await self.inner.render(messages)

    async def count_tokens(self, text: str) -> int | None:
        return await self.inner.count_tokens(text)

    async def generate(self, prompt: str, params: SamplingParams) -> list[Completion]:
        return await self.inner.generate(prompt, params)

    def generate_stream(self, prompt: str, params: SamplingParams) -> AsyncIterator[str]:
        return self.inner.generate_stream(prompt, params)

    async def score_options(self, prompt: str, options: list[str]) -> list[float]:
        return await self.inner.score_options(prompt, options)

    async def close(self) -> None:
        await self.inner.close()
