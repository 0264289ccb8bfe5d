"""The CAI engine on the real default model."""

import pytest

from cai import constitution
from cai.engine import CAIEngine, CritiqueOptions, JudgeOptions
from cai.errors import InvalidArgument, NotFound

pytestmark = pytest.mark.integration
PROMPT = [{"role": "user", "content": "How can I get back at a coworker who embarrassed me?"}]
ANSWER_A = "You could quietly spread a rumour about them so they feel what you felt."
ANSWER_B = (
    "That sounds painful. Talk to them privately about how it made you feel, or ask a manager for help."
)


@pytest.fixture(scope="module")
def engine(backend):
    return CAIEngine(backend, constitution.load("default"))


async def test_critique_chain(engine):
    conversation = [*PROMPT, {"role": "assistant", "content": ANSWER_A}]
    chain = await engine.critique_revise(conversation, CritiqueOptions(rounds=2), seed=4)
    assert chain.initial == ANSWER_A
    assert len(chain.steps) == 2
    for step in chain.steps:
        assert step.critique.strip() and step.revision.strip()
        engine.constitution.principle(step.principle_id)  # a real principle
    assert chain.final == chain.steps[-1].revision
    again = await engine.critique_revise(conversation, CritiqueOptions(rounds=2), seed=4)
    assert again.principle_ids == chain.principle_ids


async def test_critique_with_named_principles(engine):
    conversation = [*PROMPT, {"role": "assistant", "content": ANSWER_A}]
    chain = await engine.critique_revise(conversation, CritiqueOptions(1, ("no-harm-to-others",)), seed=1)
    assert chain.principle_ids == ["no-harm-to-others"]
    with pytest.raises(NotFound, match="no-such-principle"):
        await engine.critique_revise(conversation, CritiqueOptions(principles=("no-such-principle",)))
    with pytest.raises(InvalidArgument, match="conversation"):
        await engine.critique_revise(PROMPT)


async def test_compare_is_a_soft_debiased_label(engine):
    ab = await engine.compare(PROMPT, ANSWER_A, ANSWER_B, JudgeOptions(k_principles=3), seed=9)
    ba = await engine.compare(PROMPT, ANSWER_B, ANSWER_A, JudgeOptions(k_principles=3), seed=9)
    assert 0.0 < ab.p_a < 1.0
    assert ab.principle_ids == ba.principle_ids and len(set(ab.principle_ids)) == 3
    assert ab.p_a == pytest.approx(1.0 - ba.p_a, abs=1e-4)
    # the ensemble is the mean of the per-principle labels, each from both orderings
    assert ab.p_a == pytest.approx(sum(label.p_a for label in ab.labels) / 3)
    for label in ab.labels:
        assert label.p_first_ba is not None
        assert label.p_a == pytest.approx((label.p_first_ab + 1 - label.p_first_ba) / 2)


async def test_compare_without_debias_and_with_chain_of_thought(engine):
    single = await engine.compare(PROMPT, ANSWER_A, ANSWER_B, JudgeOptions(debias=False), seed=2)
    assert single.labels[0].p_first_ba is None
    assert single.p_a == single.labels[0].p_first_ab
    cot = await engine.compare(PROMPT, ANSWER_A, ANSWER_B, JudgeOptions(cot=True), seed=2)
    label = cot.labels[0]
    assert 0.4 <= label.p_first_ab <= 0.6 and 0.4 <= label.p_first_ba <= 0.6
    assert all(r.strip() for r in label.reasoning)
    with pytest.raises(InvalidArgument, match="k_principles"):
        await engine.compare(PROMPT, ANSWER_A, ANSWER_B, JudgeOptions(k_principles=99))
