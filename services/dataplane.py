"""What the policy, critique and judge services do, whichever transport asked: the gRPC servicers
and the Kafka stream stages both call these, so a request gets the same limits, the same checks,
the same errors (naming the same fields) and the same metric (`cai_operations_total`) on both."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace

from cai import records
from cai.backends.base import Backend, Completion, SamplingParams
from cai.constitution import Conversation
from cai.engine import CAIEngine, ComparisonResult, CritiqueChain, CritiqueOptions, CritiqueStep, JudgeOptions
from cai.errors import CAIError, InvalidArgument
from cai.records import Preference, Prompt, Revision, Rollout
from cai.v1 import policy_pb2
from services.settings import ServiceSettings


@dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int
    max_new_tokens: int
    max_n: int
    max_rounds: int
    max_batch: int

    @classmethod
    def of(cls, settings: ServiceSettings) -> Limits:
        return cls(
            settings.max_prompt_tokens,
            settings.max_new_tokens,
            settings.max_n,
            settings.max_rounds,
            settings.max_batch,
        )

    def to_proto(self) -> policy_pb2.Limits:
        return policy_pb2.Limits(
            max_prompt_tokens=self.max_prompt_tokens,
            max_new_tokens=self.max_new_tokens,
            max_n=self.max_n,
            max_rounds=self.max_rounds,
            max_batch=self.max_batch,
        )


async def check_length(backend: Backend, text: str, limits: Limits, field: str) -> None:
    tokens = await backend.count_tokens(text)
    if tokens is not None and tokens > limits.max_prompt_tokens:
        raise InvalidArgument(
            f"{field}: {tokens} tokens is above this service's limit of {limits.max_prompt_tokens}"
        )


def check_sampling(params: SamplingParams, limits: Limits, field: str = "parameters") -> None:
    if params.max_new_tokens > limits.max_new_tokens:
        raise InvalidArgument(
            f"{field}.max_new_tokens: {params.max_new_tokens} is above this service's limit "
            f"of {limits.max_new_tokens}"
        )
    if params.n > limits.max_n:
        raise InvalidArgument(f"n: {params.n} is above this service's limit of {limits.max_n}")


class _Plane:
    """Counts each operation by its outcome: ok, cancelled, or the name of the error that ended it."""

    def __init__(self, count: Callable[[str, str], None] | None):
        self.count = count or (lambda operation, outcome: None)

    @contextlib.contextmanager
    def counted(self, operation: str) -> Iterator[None]:
        outcome = "ok"
        try:
            yield
        except CAIError as exc:
            outcome = type(exc).__name__
            raise
        except (asyncio.CancelledError, GeneratorExit):  # the caller went away
            outcome = "cancelled"
            raise
        except BaseException:
            outcome = "error"
            raise
        finally:
            self.count(operation, outcome)


def _ends_with(conversation: Conversation, role: str, field: str, why: str) -> None:
    if not conversation or conversation[-1]["role"] != role:
        raise InvalidArgument(f"{field}: must end with {why}")


class PolicyPlane(_Plane):
    def __init__(self, backend: Backend, limits: Limits, count: Callable[[str, str], None] | None = None):
        super().__init__(count)
        self.backend = backend
        self.limits = limits

    async def checked(self, text: str, field: str) -> str:
        await check_length(self.backend, text, self.limits, field)
        return text

    async def render(self, conversation: Conversation, field: str) -> str:
        """The conversation under the chat template, within the prompt limit."""
        return await self.checked(await self.backend.render(conversation), field)

    async def generate(self, text: str, params: SamplingParams) -> list[Completion]:
        with self.counted("generate"):
            check_sampling(params, self.limits)
            return await self.backend.generate(text, params)

    async def generate_stream(self, text: str, params: SamplingParams) -> AsyncIterator[str]:
        with self.counted("generate_stream"):
            check_sampling(params, self.limits)
            async for piece in self.backend.generate_stream(text, params):
                yield piece

    async def score_options(self, text: str, options: list[str]) -> list[float]:
        with self.counted("score_options"):
            if not options:
                raise InvalidArgument("options: give at least one option")
            if any(not o for o in options):
                raise InvalidArgument("options: an option is empty")
            return await self.backend.score_options(text, options)

    async def rollout(self, prompt: Prompt, params: SamplingParams) -> Rollout:
        """The prompt answered `params.n` times with its own seed: the policy stage's record."""
        text = await self.render(prompt.conversation, "prompt.conversation")
        completions = await self.generate(text, replace(params, seed=prompt.seed))
        return records.rollout_of(prompt, completions, self.backend.model_id)


class CritiquePlane(_Plane):
    def __init__(self, engine: CAIEngine, limits: Limits, count: Callable[[str, str], None] | None = None):
        super().__init__(count)
        self.engine = engine
        self.limits = limits

    async def checked(self, conversation: Conversation, field: str = "conversation") -> Conversation:
        _ends_with(conversation, "assistant", field, "the assistant response to critique")
        await check_length(
            self.engine.backend, await self.engine.backend.render(conversation), self.limits, field
        )
        return conversation

    def check_options(self, options: CritiqueOptions) -> None:
        if not 1 <= options.rounds <= self.limits.max_rounds:
            raise InvalidArgument(
                f"rounds: {options.rounds} is outside this service's range of 1 to {self.limits.max_rounds}"
            )

    async def critique(
        self, conversation: Conversation, principle_id: str | None, params: SamplingParams
    ) -> tuple[str, str]:
        with self.counted("critique"):
            turns = await self.checked(conversation)
            return await self.engine.critique(turns, principle_id, params.seed, params)

    async def revise(
        self, conversation: Conversation, principle_id: str, critique: str, params: SamplingParams
    ) -> str:
        with self.counted("revise"):
            if not principle_id:
                raise InvalidArgument("principle_id: name the principle the critique was made under")
            turns = await self.checked(conversation)
            return await self.engine.revise(turns, principle_id, critique, params.seed, params)

    async def steps(
        self, conversation: Conversation, options: CritiqueOptions, seed: int | None
    ) -> AsyncIterator[CritiqueStep]:
        with self.counted("critique_revise"):
            self.check_options(options)
            turns = await self.checked(conversation)
            async for step in self.engine.critique_revise_steps(turns, options, seed):
                yield step

    async def revision(self, rollout: Rollout, options: CritiqueOptions) -> Revision:
        """The chain of the rollout's first answer: the critique stage's record."""
        answered = [*rollout.prompt.conversation, {"role": "assistant", "content": rollout.responses[0]}]
        chain = [step async for step in self.steps(answered, options, rollout.prompt.seed)]
        return records.revision_of(
            rollout,
            CritiqueChain(rollout.responses[0], chain),
            self.engine.constitution,
            self.engine.backend.model_id,
        )


class JudgePlane(_Plane):
    def __init__(self, engine: CAIEngine, limits: Limits, count: Callable[[str, str], None] | None = None):
        super().__init__(count)
        self.engine = engine
        self.limits = limits

    async def checked(
        self, conversation: Conversation, responses: list[str], field: str = ""
    ) -> Conversation:
        """The conversation the responses answer; the judge reads both in one prompt, so the limit
        counts them too."""
        _ends_with(conversation, "user", f"{field}conversation", "the user turn the responses answer")
        text = await self.engine.backend.render(conversation) + "\n".join(responses)
        await check_length(self.engine.backend, text, self.limits, f"{field}conversation")
        return conversation

    async def compare(
        self,
        conversation: Conversation,
        a: str,
        b: str,
        options: JudgeOptions,
        seed: int | None,
        field: str = "",
    ) -> ComparisonResult:
        with self.counted("compare"):
            for name, text in (("response_a", a), ("response_b", b)):
                if not text.strip():
                    raise InvalidArgument(f"{field}{name}: must not be empty")
            turns = await self.checked(conversation, [a, b], field)
            return await self.engine.compare(turns, a, b, options, seed)

    async def preference(self, source: Rollout | Revision, options: JudgeOptions) -> Preference:
        """The judged pair of a rollout or revision: the judge stage's record."""
        a, b = records.pair_of(source)
        judgment = await self.compare(source.prompt.conversation, a, b, options, source.prompt.seed)
        return records.preference_of(source, judgment, self.engine.constitution, self.engine.backend.model_id)
