"""What each service's stream stage does with one input record (see cai/kafka/stream.py): decode
it into the record model, call the same data plane as the gRPC servicers, and produce the record
the plane returns."""

from __future__ import annotations

from dataclasses import replace

from google.protobuf.message import Message

from cai.engine import RESPONSE_PARAMS
from cai.kafka.admin import stage_group
from cai.kafka.stream import Output, Processor, StreamMetrics, StreamSettings, StreamStage
from cai.records import Prompt, Revision, Rollout
from cai.v1 import records_pb2
from services.dataplane import CritiquePlane, JudgePlane, PolicyPlane
from services.settings import CritiqueSettings, JudgeSettings, PolicySettings, ServiceSettings


def policy_processor(plane: PolicyPlane, settings: PolicySettings, topic: str) -> Processor:
    """prompts -> rollouts: `responses_per_prompt` sampled responses per prompt, seeded by the prompt."""
    params = replace(
        RESPONSE_PARAMS, n=settings.responses_per_prompt, max_new_tokens=settings.response_max_new_tokens
    )

    async def process(message: records_pb2.PromptRecord) -> list[Output]:
        rollout = await plane.rollout(Prompt.of_proto(message), params)
        return [(topic, rollout.prompt.id, rollout.to_proto())]

    return process


def critique_processor(plane: CritiquePlane, settings: CritiqueSettings, topic: str) -> Processor:
    """rollouts -> revisions: critique and revise the first response."""

    async def process(message: records_pb2.RolloutRecord) -> list[Output]:
        revision = await plane.revision(Rollout.of_proto(message), settings.critique_options)
        return [(topic, revision.prompt.id, revision.to_proto())]

    return process


def judge_processor(plane: JudgePlane, settings: JudgeSettings, topic: str) -> Processor:
    """rollouts -> preferences (two sampled responses), or revisions -> preferences (revision vs
    the response it revised)."""

    async def process(message: records_pb2.RolloutRecord | records_pb2.RevisionRecord) -> list[Output]:
        source = (
            Revision.of_proto(message)
            if isinstance(message, records_pb2.RevisionRecord)
            else Rollout.of_proto(message)
        )
        preference = await plane.preference(source, settings.judge_options)
        return [(topic, preference.prompt.id, preference.to_proto())]

    return process


def stream_stage(
    plane: PolicyPlane | CritiquePlane | JudgePlane,
    name: str,
    settings: ServiceSettings,
    metrics: StreamMetrics | None,
) -> StreamStage:
    """A service's stream stage, on the topics named by its settings; it feeds the same data plane
    (and backend batches) as the service's gRPC callers."""
    assert settings.kafka is not None
    prefix = settings.kafka_prefix
    source: str
    record_type: type[Message]
    if isinstance(plane, PolicyPlane):
        assert isinstance(settings, PolicySettings)
        source, record_type = "prompts", records_pb2.PromptRecord
        process = policy_processor(plane, settings, prefix + "rollouts")
    elif isinstance(plane, CritiquePlane):
        assert isinstance(settings, CritiqueSettings)
        source, record_type = "rollouts", records_pb2.RolloutRecord
        process = critique_processor(plane, settings, prefix + "revisions")
    else:
        assert isinstance(settings, JudgeSettings)
        source = settings.judge_input
        record_type = records_pb2.RevisionRecord if source == "revisions" else records_pb2.RolloutRecord
        process = judge_processor(plane, settings, prefix + "preferences")
    stream = StreamSettings(
        bootstrap=settings.kafka,
        group=settings.kafka_group or stage_group(name, prefix),
        input_topic=prefix + source,
        max_in_flight=settings.kafka_max_in_flight,
        max_attempts=settings.kafka_max_attempts,
        drain_s=settings.grace_s,
        commit_interval_s=settings.kafka_commit_interval_s,
    )
    return StreamStage(stream, name, record_type, process, metrics)
