"""The record model: conversions, the preference decision, and the same sample ids on every path."""

from __future__ import annotations

import pytest

from cai import constitution, pipeline, records
from cai.backends.base import Completion
from cai.backends.fake import FakeBackend
from cai.engine import CAIEngine, ComparisonResult, CritiqueChain, CritiqueStep, PrincipleLabel
from cai.errors import InvalidArgument
from cai.v1 import records_pb2
from cli.loopback import loopback_stages
from services.dataplane import CritiquePlane, JudgePlane, Limits, PolicyPlane
from services.processors import critique_processor, judge_processor, policy_processor
from services.settings import load_settings

CONSTITUTION = constitution.load("default")
PROMPT = records.Prompt("q1", "How do I keep basil fresh?", "benign", seed=11)


def _preference(p_a: float, revision_text: str = "Trim the stems.") -> records.Preference:
    rollout = records.rollout_of(PROMPT, [Completion("Put it in water.", 4, "stop")], "m")
    chain = CritiqueChain("Put it in water.", [CritiqueStep("honesty", "Vague.", revision_text)])
    revision = records.revision_of(rollout, chain, CONSTITUTION, "m")
    return records.preference_of(
        revision, ComparisonResult(p_a, [PrincipleLabel("x", p_a, p_a)]), CONSTITUTION, "j"
    )


def test_every_record_survives_its_protobuf():
    rollout = records.rollout_of(PROMPT, [Completion("a", 1, "stop"), Completion("b", 1, "stop")], "m")
    assert records.Rollout.of_proto(rollout.to_proto()) == rollout
    preference = _preference(0.3)
    again = records.Preference.of_proto(preference.to_proto())
    assert again == preference
    revision = records.revision_of(
        rollout, CritiqueChain("a", [CritiqueStep("x", "c", "r")]), CONSTITUTION, "m"
    )
    assert records.Revision.of_proto(revision.to_proto()) == revision
    version = records.PolicyVersion("v2", "file:///a.tar", "ab" * 32, 8, {"loss": 0.5})
    assert records.PolicyVersion.of_proto(version.to_proto()) == version


def test_the_preference_decision_is_made_once():
    won = _preference(0.8)
    assert (won.chosen, won.rejected, won.chosen_is_revision) == ("Trim the stems.", "Put it in water.", True)
    assert won.p_chosen == pytest.approx(0.8)
    lost = _preference(0.2)
    assert (lost.chosen, lost.chosen_is_revision) == ("Put it in water.", False)
    assert lost.p_chosen == pytest.approx(0.8)
    # a revision identical to the answer it revised is still "the revision" only when it wins
    same = _preference(0.2, revision_text="Put it in water.")
    assert same.chosen_is_revision is False
    row = lost.to_row("run", CONSTITUTION.version)
    assert (row["p_a"], row["chosen_is_revision"], row["critique_principle_ids"]) == (0.2, False, ["honesty"])


def test_a_training_sample_is_the_same_from_the_row_and_from_the_record():
    preference = _preference(0.3)
    from_row = records.TrainingSample.of_row(preference.to_row("run", "1"), "dpo", "here")
    assert from_row == records.TrainingSample.of(preference, "here")
    revision = records.Revision.of_proto(
        records_pb2.RevisionRecord.FromString(
            records.revision_of(
                records.rollout_of(PROMPT, [Completion("a", 1, "stop")], "m"),
                CritiqueChain("a", [CritiqueStep("x", "c", "r")]),
                CONSTITUTION,
                "m",
            )
            .to_proto()
            .SerializeToString()
        )
    )
    sft = records.TrainingSample.of_row(revision.to_sft_row("run", "1"), "sft", "here")
    assert sft == records.TrainingSample.of(revision, "here")
    assert sft.sample_id == revision.meta.sample_id  # sft.jsonl and the revisions topic share the id


def test_records_that_cannot_be_read_name_the_field():
    bad = _preference(0.3).to_proto()
    bad.p_a = 1.5
    with pytest.raises(InvalidArgument, match="p_a"):
        records.Preference.of_proto(bad)
    no_id = records_pb2.PromptRecord(conversation=PROMPT.to_proto().conversation)
    with pytest.raises(InvalidArgument, match=r"prompt\.prompt_id"):
        records.Prompt.of_proto(no_id)


@pytest.mark.parametrize("pairs", ["revision", "samples"])
async def test_the_same_inputs_give_the_same_ids_on_every_path(tmp_path, pairs):
    """In process, through the gRPC services and through the stream stages' processors, the same
    prompt, seed, constitution and model give the same records, ids included."""
    backend = FakeBackend()
    config = pipeline.RunConfig(out=tmp_path / "local", seed=3, pairs=pairs)
    [local] = [
        await pipeline.process_prompt(
            pipeline.LocalStages(CAIEngine(backend, CONSTITUTION)), config, PROMPT, print
        )
    ]
    async with loopback_stages(backend, CONSTITUTION) as stages:
        served = await pipeline.process_prompt(stages, config, PROMPT, print)

    limits = Limits(8192, 1024, 16, 4, 64)
    engine = CAIEngine(backend, CONSTITUTION)
    policy = load_settings("policy", None, responses_per_prompt=2 if pairs == "samples" else 1)
    judge = load_settings("judge", None, judge_input="revisions" if pairs == "revision" else "rollouts")
    [(_, _, rollout)] = await policy_processor(PolicyPlane(backend, limits), policy, "r")(
        PROMPT.seeded(config.seed).to_proto()
    )
    [(_, _, revision)] = await critique_processor(
        CritiquePlane(engine, limits), load_settings("critique"), "v"
    )(rollout)
    source = revision if pairs == "revision" else rollout
    [(_, _, preference)] = await judge_processor(JudgePlane(engine, limits), judge, "p")(source)
    streamed = pipeline.PromptResult(
        records.Rollout.of_proto(rollout),
        records.Revision.of_proto(revision),
        records.Preference.of_proto(preference),
    )

    for result in (served, streamed):
        for mine, theirs in zip(
            (local.rollout, local.revision, local.preference),
            (result.rollout, result.revision, result.preference),
            strict=True,
        ):
            assert theirs.meta.sample_id == mine.meta.sample_id
            assert theirs.meta.principle_ids == mine.meta.principle_ids
        assert (result.preference.chosen, result.preference.rejected) == (
            local.preference.chosen,
            local.preference.rejected,
        )
        assert result.preference.judgment.p_a == pytest.approx(local.preference.judgment.p_a, abs=1e-6)
    assert (
        len({local.rollout.meta.sample_id, local.revision.meta.sample_id, local.preference.meta.sample_id})
        == 3
    )
