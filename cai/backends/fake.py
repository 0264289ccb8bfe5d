"""A deterministic stand-in for a model, for protocol tests and service-overhead benchmarks.

It answers instantly (or after `delay_s`) with text derived from a hash of the prompt, so tests
of the gRPC layer and benchmarks of its overhead do not measure a model. It is not selectable
with `--backend`: nothing user-facing runs on it.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

from cai.backends.base import Backend, Completion, FinishReason, SamplingParams, plain_chat
from cai.constitution import Conversation
from cai.errors import ResourceExhausted

WORDS = [
    "the",
    "a",
    "response",
    "is",
    "clear",
    "kind",
    "helpful",
    "careful",
    "safe",
    "honest",
    "brief",
    "and",
    "more",
    "less",
]


class FakeBackend(Backend):
    kind = "fake"

    def __init__(self, delay_s: float = 0.0, max_queue: int = 1024):
        self.model_id = "fake"
        self.delay_s = delay_s
        self.max_queue = max_queue
        self.active = 0

    @property
    def queue_depth(self) -> int:
        return self.active

    async def render(self, messages: Conversation) -> str:
        return plain_chat(messages)

    async def count_tokens(self, text: str) -> int | None:
        return len(text.split())

    def _words(self, prompt: str, seed: int, count: int) -> list[str]:
        digest = hashlib.sha256(f"{seed}:{prompt}".encode()).digest()
        return [WORDS[digest[i % len(digest)] % len(WORDS)] for i in range(count)]

    async def _wait(self) -> None:
        if self.active >= self.max_queue:
            raise ResourceExhausted(
                f"queue full: {self.active} requests running (max_queue={self.max_queue})"
            )
        self.active += 1
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)  # cancellation (deadline, client gone) lands here
        finally:
            self.active -= 1

    async def generate(self, prompt: str, params: SamplingParams) -> list[Completion]:
        params.validate()
        await self._wait()
        seed = params.seed or 0
        out = []
        for i in range(params.n):
            # Shorter than the limit for most prompts, so both finish reasons occur.
            length = min(params.max_new_tokens, 4 + (seed + i + len(prompt)) % 12)
            text = " ".join(self._words(prompt, seed + i, length))
            finish: FinishReason = "length" if length == params.max_new_tokens else "stop"
            out.append(Completion(text, length, finish, self.policy_version))
        return out

    async def generate_stream(self, prompt: str, params: SamplingParams) -> AsyncIterator[str]:
        [completion] = await self.generate(prompt, params)
        for i, word in enumerate(completion.text.split()):
            yield word if i == 0 else " " + word

    async def score_options(self, prompt: str, options: list[str]) -> list[float]:
        await self._wait()
        return [-(hashlib.sha256(f"{prompt}|{o}".encode()).digest()[0] / 64.0) - 0.01 for o in options]
