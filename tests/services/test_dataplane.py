"""gRPC and the stream stage go through one data plane: a request refused on one is refused on the
other with the same message, and both count in the same metric."""

from __future__ import annotations

import grpc
import pytest

from cai.backends.base import Completion
from cai.backends.fake import FakeBackend
from cai.engine import CritiqueChain, CritiqueStep
from cai.errors import InvalidArgument
from cai.records import Prompt, revision_of, rollout_of
from services.client import AsyncClient
from services.processors import critique_processor, judge_processor
from services.server import start_service

PROMPT = Prompt("q", "How do I boil an egg?", seed=3)


def count(service, operation: str, outcome: str) -> float:
    return (
        service.metrics.registry.get_sample_value(
            "cai_operations_total", {"service": service.name, "operation": operation, "outcome": outcome}
        )
        or 0.0
    )


async def test_an_empty_response_is_refused_alike_on_both_transports(make_settings):
    settings = make_settings("judge", judge_input="revisions")
    service = await start_service("judge", settings, FakeBackend())
    try:
        rollout = rollout_of(PROMPT, [Completion("Boil it.", 2, "stop")], "fake")
        empty = CritiqueChain("Boil it.", [CritiqueStep("honesty", "Vague.", " ")])
        record = revision_of(rollout, empty, service.plane.engine.constitution, "fake").to_proto()
        with pytest.raises(InvalidArgument) as streamed:
            await judge_processor(service.plane, settings, "preferences")(record)
        async with AsyncClient(service.address, timeout=10, retries=0) as client:
            with pytest.raises(grpc.aio.AioRpcError) as called:
                await client.compare(PROMPT.conversation, " ", "Boil it.")
        assert called.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert str(streamed.value) == called.value.details() == "response_a: must not be empty"
        assert count(service, "compare", "InvalidArgument") == 2
        async with AsyncClient(service.address, timeout=10, retries=0) as client:
            await client.compare(PROMPT.conversation, "Boil it for nine minutes.", "Boil it.")
        assert count(service, "compare", "ok") == 1
    finally:
        await service.stop(0)


async def test_the_round_limit_holds_for_the_stream_stage_too(make_settings):
    settings = make_settings("critique", rounds=5)  # above max_rounds (3): refused per record
    service = await start_service("critique", settings, FakeBackend())
    try:
        rollout = rollout_of(PROMPT, [Completion("Boil it.", 2, "stop")], "fake")
        with pytest.raises(InvalidArgument, match="rounds: 5"):
            await critique_processor(service.plane, settings, "revisions")(rollout.to_proto())
        assert count(service, "critique_revise", "InvalidArgument") == 1
    finally:
        await service.stop(0)
