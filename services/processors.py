"""What each service's stream stage does with one input record (see cai/kafka/stream.py)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from cai.backends.base import Backend, SamplingParams
from cai.engine import CAIEngine
from cai.errors import InvalidArgument
from cai.kafka.admin import stage_group
from cai.kafka.records import sample_id
from cai.kafka.stream import Output, Processor, StreamSettings, StreamStage
from cai.pipeline import RESPONSE_PARAMS
from cai.v1 import common_pb2, records_pb2
from services import convert
from services.convert import Limits, limits_of
from services.server import RunningService
from services.settings import ServiceSettings


def _metadata(
    kind: str, source_id: str, prompt: records_pb2.PromptRecord, **fields: Any
) -> common_pb2.SampleMetadata:
    created = Timestamp()
    created.GetCurrentTime()
    # The id depends only on the input, so replaying a record after a crash repeats its id.
    return common_pb2.SampleMetadata(
        sample_id=sample_id(kind, source_id),
        prompt_id=prompt.prompt_id,
        seed=prompt.seed,
        created_at=created,
        **fields,
    )


def _conversation(prompt: records_pb2.PromptRecord) -> list[dict[str, str]]:
    turns = convert.conversation(prompt.conversation, "prompt.conversation")
    if turns[-1]["role"] != "user":
        raise InvalidArgument("prompt.conversation: must end with the user turn to answer")
    return turns


def policy_processor(backend: Backend, limits: Limits, params: SamplingParams, topic: str) -> Processor:
    """prompts -> rollouts: `params.n` sampled responses per prompt, seeded by the prompt."""

    async def process(prompt: records_pb2.PromptRecord) -> list[Output]:
        if not prompt.prompt_id:
            raise InvalidArgument("prompt_id: must not be empty")
        text = await backend.render(_conversation(prompt))
        await convert.check_prompt_length(backend, text, limits, "prompt.conversation")
        completions = await backend.generate(text, replace(params, seed=prompt.seed))
        rollout = records_pb2.RolloutRecord(
            metadata=_metadata(
                "rollout",
                f"{prompt.prompt_id}|{prompt.seed}",
                prompt,
                policy_version=completions[0].policy_version,
                model_ids=[backend.model_id],
            ),
            prompt=prompt,
            responses=[c.text.strip() or "(empty response)" for c in completions],
        )
        return [(topic, prompt.prompt_id, rollout)]

    return process


async def _checked(
    engine: CAIEngine, limits: Limits, rollout: records_pb2.RolloutRecord
) -> list[dict[str, str]]:
    turns = _conversation(rollout.prompt)
    if not rollout.responses:
        raise InvalidArgument("responses: the rollout has no response")
    text = await engine.backend.render(turns) + "\n".join(rollout.responses)
    await convert.check_prompt_length(engine.backend, text, limits, "prompt.conversation")
    return turns


def critique_processor(engine: CAIEngine, limits: Limits, rounds: int, topic: str) -> Processor:
    """rollouts -> revisions: critique and revise the first response `rounds` times."""

    async def process(rollout: records_pb2.RolloutRecord) -> list[Output]:
        turns = await _checked(engine, limits, rollout)
        answered = [*turns, {"role": "assistant", "content": rollout.responses[0]}]
        chain = await engine.critique_revise(answered, rounds, seed=rollout.prompt.seed)
        c = engine.constitution
        revision = records_pb2.RevisionRecord(
            metadata=_metadata(
                "revision",
                rollout.metadata.sample_id,
                rollout.prompt,
                policy_version=rollout.metadata.policy_version,
                constitution_id=c.id,
                constitution_hash=c.hash,
                principle_ids=chain.principle_ids,
                model_ids=[*rollout.metadata.model_ids, engine.backend.model_id],
            ),
            prompt=rollout.prompt,
            initial=chain.initial,
            steps=[records_pb2.RevisionStep(**vars(step)) for step in chain.steps],
            final=chain.final,
        )
        return [(topic, rollout.prompt.prompt_id, revision)]

    return process


def judge_processor(
    engine: CAIEngine, limits: Limits, options: dict[str, Any], source: str, topic: str
) -> Processor:
    """rollouts -> preferences (two sampled responses), or revisions -> preferences (revision vs
    the response it revised)."""

    async def process(record: records_pb2.RolloutRecord | records_pb2.RevisionRecord) -> list[Output]:
        if isinstance(record, records_pb2.RevisionRecord):
            prompt, pair, model_ids = record.prompt, (record.final, record.initial), record.metadata.model_ids
            turns = _conversation(prompt)
        else:
            if len(record.responses) < 2:
                raise InvalidArgument(
                    f"responses: judging needs two responses, the rollout has {len(record.responses)}"
                )
            turns = await _checked(engine, limits, record)
            prompt, pair, model_ids = (
                record.prompt,
                (record.responses[0], record.responses[1]),
                record.metadata.model_ids,
            )
        result = await engine.compare(turns, *pair, **options, seed=prompt.seed)
        a_wins = result.p_a >= 0.5
        chosen, rejected = pair if a_wins else pair[::-1]
        c = engine.constitution
        preference = records_pb2.PreferenceRecord(
            metadata=_metadata(
                "preference",
                record.metadata.sample_id,
                prompt,
                policy_version=record.metadata.policy_version,
                constitution_id=c.id,
                constitution_hash=c.hash,
                principle_ids=result.principle_ids,
                model_ids=[*model_ids, engine.backend.model_id],
            ),
            prompt=prompt,
            chosen=chosen,
            rejected=rejected,
            p_chosen=result.p_a if a_wins else 1 - result.p_a,
            labels=convert.labels_proto(result.labels),
            chosen_is_revision=source == "revisions" and a_wins,
        )
        return [(topic, prompt.prompt_id, preference)]

    return process


def stream_stage(service: RunningService, settings: ServiceSettings) -> StreamStage:
    """The stream stage of a running service, on the topics named by its settings; it feeds the
    same backend (and batches) as the service's gRPC callers."""
    assert settings.kafka is not None
    name, backend, engine = service.name, service.backend, service.engine
    prefix = settings.kafka_prefix
    limits = limits_of(settings)
    source: str
    record_type: type[Message]
    if name == "policy":
        source, record_type = "prompts", records_pb2.PromptRecord
        params = replace(
            RESPONSE_PARAMS, n=settings.responses_per_prompt, max_new_tokens=settings.response_max_new_tokens
        )
        process = policy_processor(backend, limits, params, prefix + "rollouts")
    elif name == "critique":
        assert engine is not None
        source, record_type = "rollouts", records_pb2.RolloutRecord
        process = critique_processor(engine, limits, settings.rounds, prefix + "revisions")
    else:
        assert engine is not None
        source = settings.judge_input
        record_type = records_pb2.RevisionRecord if source == "revisions" else records_pb2.RolloutRecord
        options = {
            "k_principles": settings.k_principles,
            "debias": settings.debias,
            "cot": settings.chain_of_thought,
        }
        process = judge_processor(engine, limits, options, source, prefix + "preferences")
    stream = StreamSettings(
        bootstrap=settings.kafka,
        group=settings.kafka_group or stage_group(name, prefix),
        input_topic=prefix + source,
        max_in_flight=settings.kafka_max_in_flight,
        max_attempts=settings.kafka_max_attempts,
        drain_s=settings.grace_s,
        commit_interval_s=settings.kafka_commit_interval_s,
    )
    return StreamStage(stream, name, record_type, process, service.metrics.stream)
