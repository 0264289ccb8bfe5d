"""The CAI engine: critique/revision chains (SL-CAI) and soft preference labels (RL-CAI).

Backend-agnostic and async: every model call goes through `Backend`, so the same engine runs
on the in-process model, a TGI server or a policy service.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from cai import labels, prompting
from cai.backends.base import Backend, SamplingParams
from cai.constitution import Constitution, Conversation, Principle
from cai.errors import InvalidArgument


@dataclass(frozen=True)
class CritiqueStep:
    principle_id: str
    critique: str
    revision: str


@dataclass(frozen=True)
class CritiqueChain:
    initial: str
    steps: list[CritiqueStep]

    @property
    def final(self) -> str:
        return self.steps[-1].revision if self.steps else self.initial

    @property
    def principle_ids(self) -> list[str]:
        return [s.principle_id for s in self.steps]


@dataclass(frozen=True)
class PrincipleLabel:
    """One principle's verdict. p_first_* is the judge's p(first option) in each ordering."""

    principle_id: str
    p_a: float
    p_first_ab: float
    p_first_ba: float | None = None
    reasoning: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ComparisonResult:
    p_a: float  # probability that response A is the better one under the constitution
    labels: list[PrincipleLabel]

    @property
    def principle_ids(self) -> list[str]:
        return [label.principle_id for label in self.labels]


RESPONSE_PARAMS = SamplingParams(max_new_tokens=96, temperature=0.7, top_p=0.95)  # the policy's answers


@dataclass(frozen=True)
class JudgeOptions:
    """How a pair is judged: k principles drawn (or the ones named), both orderings or one,
    with or without reasoning first."""

    k_principles: int = 1
    debias: bool = True
    cot: bool = False
    principles: tuple[str, ...] = ()  # named principles instead of k drawn ones


@dataclass(frozen=True)
class CritiqueOptions:
    """How a response is critiqued: `rounds` of critique and revision, each under a principle drawn
    at random or, with `principles`, the one named for that round."""

    rounds: int = 1
    principles: tuple[str, ...] = ()


@dataclass(frozen=True)
class EngineConfig:
    critique_params: SamplingParams = SamplingParams(max_new_tokens=96, temperature=0.7, top_p=0.95)
    revision_params: SamplingParams = SamplingParams(max_new_tokens=128, temperature=0.7, top_p=0.95)
    cot_params: SamplingParams = SamplingParams(max_new_tokens=64, temperature=0.0, stop=("The answer is",))
    few_shot_critique: int = 1  # examples shown before each critique; more cost prefill time
    few_shot_comparison: int = 1
    cot_clamp: tuple[float, float] = (0.4, 0.6)


class CAIEngine:
    def __init__(self, backend: Backend, constitution: Constitution, config: EngineConfig | None = None):
        self.backend = backend
        self.constitution = constitution
        self.config = config or EngineConfig()

    def _named(self, principle_ids: list[str], kind: str) -> list[Principle]:
        chosen = [self.constitution.principle(pid) for pid in principle_ids]
        missing = [p.id for p in chosen if not (p.comparison if kind == "comparison" else p.critique)]
        if missing:
            raise InvalidArgument(f"principles: {', '.join(missing)} have no {kind} request")
        return chosen

    def _draw_critique_principle(self, principle_id: str | None, rng: random.Random) -> Principle:
        if principle_id:
            return self._named([principle_id], "critique")[0]
        return self.constitution.sample(rng, 1, "critique")[0]

    @staticmethod
    def _check_critiquable(conversation: Conversation) -> None:
        if not conversation or conversation[-1]["role"] != "assistant":
            raise InvalidArgument("conversation: must end with the assistant response to critique")

    def _critique_turns(self, conversation: Conversation, principle: Principle) -> Conversation:
        examples = self.constitution.critique_examples[: self.config.few_shot_critique]
        request = principle.critique or ""
        return prompting.critique_messages(self.constitution, examples, conversation, request)

    async def critique(
        self,
        conversation: Conversation,
        principle_id: str | None = None,
        seed: int | None = None,
        params: SamplingParams | None = None,
    ) -> tuple[str, str]:
        """(principle id, critique) of the conversation's last (assistant) message under one principle,
        drawn by weight unless named."""
        self._check_critiquable(conversation)
        principle = self._draw_critique_principle(principle_id, random.Random(seed))
        turns = self._critique_turns(conversation, principle)
        return principle.id, await self._generate(turns, params or self.config.critique_params, seed)

    async def revise(
        self,
        conversation: Conversation,
        principle_id: str,
        critique: str,
        seed: int | None = None,
        params: SamplingParams | None = None,
    ) -> str:
        """The last (assistant) message rewritten to answer `critique` under the principle."""
        self._check_critiquable(conversation)
        if not critique.strip():
            raise InvalidArgument("critique: must not be empty")
        principle = self._named([principle_id], "critique")[0]
        turns = prompting.revision_messages(
            self._critique_turns(conversation, principle), critique, principle.revision or ""
        )
        revision = await self._generate(turns, params or self.config.revision_params, seed)
        return revision or conversation[-1]["content"]

    async def critique_revise_steps(
        self,
        conversation: Conversation,
        options: CritiqueOptions = CritiqueOptions(),
        seed: int | None = None,
    ) -> AsyncIterator[CritiqueStep]:
        """Critique and revise the conversation's last (assistant) message `options.rounds` times,
        yielding each round as it completes. Each round draws one principle (weighted, seeded)
        unless `options.principles` names one per round."""
        self._check_critiquable(conversation)
        rounds, principles = options.rounds, list(options.principles)
        if rounds < 1:
            raise InvalidArgument(f"rounds: must be >= 1, got {rounds}")
        if principles and len(principles) != rounds:
            raise InvalidArgument(f"principles: give one per round ({rounds}), got {len(principles)}")
        rng = random.Random(seed)
        chosen = (
            self._named(principles, "critique")
            if principles
            else [self.constitution.sample(rng, 1, "critique")[0] for _ in range(rounds)]
        )
        history = conversation[:-1]
        response = conversation[-1]["content"]
        for i, principle in enumerate(chosen):
            current = [*history, {"role": "assistant", "content": response}]
            step_seed = None if seed is None else seed * 1000 + 2 * i
            turns = self._critique_turns(current, principle)
            critique = await self._generate(turns, self.config.critique_params, step_seed)
            turns = prompting.revision_messages(turns, critique, principle.revision or "")
            revision = await self._generate(
                turns, self.config.revision_params, None if step_seed is None else step_seed + 1
            )
            response = revision or response
            yield CritiqueStep(principle.id, critique, response)

    async def critique_revise(
        self,
        conversation: Conversation,
        options: CritiqueOptions = CritiqueOptions(),
        seed: int | None = None,
    ) -> CritiqueChain:
        """All rounds of `critique_revise_steps` as one chain."""
        steps = [s async for s in self.critique_revise_steps(conversation, options, seed)]
        return CritiqueChain(conversation[-1]["content"], steps)

    async def _generate(self, turns: Conversation, params: SamplingParams, seed: int | None) -> str:
        prompt = await self.backend.render(turns)
        params = replace(params, seed=seed, n=1)
        [completion] = await self.backend.generate(prompt, params)
        return prompting.clean_output(completion.text)

    async def compare(
        self,
        conversation: Conversation,
        a: str,
        b: str,
        options: JudgeOptions = JudgeOptions(),
        seed: int | None = None,
    ) -> ComparisonResult:
        """p(A better than B) from the option tokens' log-probs, averaged over k principles.

        With `debias`, every principle also judges the swapped order and the two are averaged.
        With `cot`, the judge first writes its reasoning; the label is then clamped.
        """
        k_principles, debias, cot = options.k_principles, options.debias, options.cot
        principles = list(options.principles)
        if not conversation or conversation[-1]["role"] != "user":
            raise InvalidArgument("conversation: must end with the user turn both responses answer")
        if not a.strip() or not b.strip():
            raise InvalidArgument("responses: both responses must be non-empty")
        rng = random.Random(seed)
        chosen = (
            self._named(principles, "comparison")
            if principles
            else self.constitution.sample(rng, k_principles, "comparison")
        )
        orderings = [(a, b), (b, a)] if debias else [(a, b)]
        jobs = [
            self._judge(conversation, p.comparison or "", first, second, cot)
            for p in chosen
            for first, second in orderings
        ]
        results = await asyncio.gather(*jobs)
        per_principle = []
        for i, principle in enumerate(chosen):
            (p_ab, why_ab), *swapped = results[i * len(orderings) : (i + 1) * len(orderings)]
            if swapped:
                p_ba, why_ba = swapped[0]
                p_a = labels.debias(p_ab, p_ba)
                per_principle.append(PrincipleLabel(principle.id, p_a, p_ab, p_ba, [why_ab, why_ba]))
            else:
                per_principle.append(PrincipleLabel(principle.id, p_ab, p_ab, None, [why_ab]))
        p_a = labels.ensemble([label.p_a for label in per_principle])
        return ComparisonResult(p_a, per_principle)

    async def _judge(
        self, conversation: Conversation, question: str, first: str, second: str, cot: bool
    ) -> tuple[float, str]:
        examples = self.constitution.comparison_examples[: self.config.few_shot_comparison]
        turns = prompting.comparison_messages(
            self.constitution, examples, conversation, question, first, second, cot
        )
        prompt = await self.backend.render(turns)
        reasoning = ""
        if cot:
            prompt += prompting.COT_PREFIX
            [completion] = await self.backend.generate(prompt, self.config.cot_params)
            reasoning = completion.text.strip()
            prompt += f" {reasoning}\n"
        logp = await self.backend.score_options(prompt + prompting.ANSWER_PREFIX, list(prompting.OPTIONS))
        p_first = labels.option_probability(logp[0], logp[1])
        if cot:
            p_first = labels.clamp(p_first, *self.config.cot_clamp)
        return p_first, reasoning
