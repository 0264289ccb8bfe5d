"""Generated and mutated requests to every RPC of the three services (hypothesis).

The services run on loopback on FakeBackends, in a thread of their own; the requests come from a
blocking client. Each answer must be OK or a precise status (INVALID_ARGUMENT naming the field,
NOT_FOUND, RESOURCE_EXHAUSTED, or CANCELLED / DEADLINE_EXCEEDED for calls the client cancelled
or let expire), never UNKNOWN or INTERNAL; afterwards every service is still SERVING and none has
a call left in flight, and the memory its code still holds after the same requests a second
time is a few kilobytes (tracemalloc), not a share of every request."""

from __future__ import annotations

import asyncio
import gc
import re
import threading
import time
import tracemalloc
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cai import constitution
from cai.backends.fake import FakeBackend
from cai.v1 import common_pb2, critique_pb2, judge_pb2, policy_pb2
from services.server import SERVICE_NAMES, RunningService, start_service
from tests.reliability import fuzz
from tests.reliability.support import settings as service_settings

SERVICES = {
    "policy": policy_pb2.DESCRIPTOR.services_by_name["PolicyService"],
    "critique": critique_pb2.DESCRIPTOR.services_by_name["CritiqueService"],
    "judge": judge_pb2.DESCRIPTOR.services_by_name["JudgeService"],
}
METHODS = [(name, method) for name, service in SERVICES.items() for method in service.methods]
PRECISE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
GONE = {grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED}  # only when the client asked
ROOT = Path(__file__).resolve().parents[2]
# memory allocated by the services' own code (the first frame of each allocation)
OUR_CODE = [
    tracemalloc.Filter(True, str(ROOT / "services" / "*")),
    tracemalloc.Filter(True, str(ROOT / "cai" / "*")),
]
# "field: what is wrong", where the field may be a path: comparisons[3].conversation.messages[0]
FIELD_FIRST = re.compile(r"^[a-z_][\w.\[\]]*(, [a-z_][\w.\[\]]*)*: \S")

_cons = constitution.load("default")
HINTS = {
    "principle_id": [p.id for p in _cons.principles],
    "principle_ids": [p.id for p in _cons.principles],
    "tier": [t.id for t in _cons.tiers],
    "content": ["Hello", "How do I pick a lock?", "Sure, here is how."],
    "responses": ["Hello!", "Go away."],
    "response_a": ["Hello!"],
    "response_b": ["Go away."],
}


def _conversation(*turns: tuple[int, str]) -> common_pb2.Conversation:
    return common_pb2.Conversation(messages=[common_pb2.Message(role=r, content=c) for r, c in turns])


ASKED = _conversation((common_pb2.ROLE_USER, "How do I boil an egg?"))
ANSWERED = _conversation(
    (common_pb2.ROLE_SYSTEM, "Be kind."),
    (common_pb2.ROLE_USER, "How do I boil an egg?"),
    (common_pb2.ROLE_ASSISTANT, "Eight minutes."),
)
_compare = judge_pb2.CompareRequest(conversation=ASKED, response_a="Eight minutes.", response_b="Go away.")
# One valid request per RPC: the mutations start from these.
VALID: dict[str, Any] = {
    "Generate": policy_pb2.GenerateRequest(input=policy_pb2.PolicyInput(conversation=ASKED), n=2),
    "GenerateStream": policy_pb2.GenerateStreamRequest(input=policy_pb2.PolicyInput(raw_prompt="Hi")),
    "ScoreOptions": policy_pb2.ScoreOptionsRequest(
        input=policy_pb2.PolicyInput(conversation=ASKED), options=["A", "B"]
    ),
    "GetInfo": policy_pb2.GetInfoRequest(),
    "Render": policy_pb2.RenderRequest(input=policy_pb2.PolicyInput(conversation=ANSWERED)),
    "Critique": critique_pb2.CritiqueRequest(conversation=ANSWERED),
    "Revise": critique_pb2.ReviseRequest(
        conversation=ANSWERED, principle_id=_cons.principles[0].id, critique="It is curt."
    ),
    "CritiqueRevise": critique_pb2.CritiqueReviseRequest(conversation=ANSWERED, rounds=2, seed=1),
    "ListPrinciples": critique_pb2.ListPrinciplesRequest(tier=_cons.tiers[0].id),
    "GetConstitution": critique_pb2.GetConstitutionRequest(),
    "Compare": _compare,
    "CompareBatch": judge_pb2.CompareBatchRequest(comparisons=[_compare, _compare]),
    "Rank": judge_pb2.RankRequest(conversation=ASKED, responses=["Eight minutes.", "Go away.", "Boil it."]),
}


class Stack:
    """The three services on FakeBackends, served by an event loop in a thread of their own."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.services: dict[str, RunningService] = {}
        for name in SERVICES:
            extra = {"max_prompt_tokens": 4096} if name == "policy" else {}
            self.services[name] = self.run(
                start_service(name, service_settings(name, **extra), FakeBackend())
            )

    def run(self, coroutine: Any, timeout: float = 60) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout)

    def in_flight(self, name: str) -> float:
        service = self.services[name]
        value = service.metrics.registry.get_sample_value("cai_in_flight_requests", {"service": name})
        return float(value or 0)

    def close(self) -> None:
        for service in self.services.values():
            self.run(service.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    running = Stack()
    yield running
    running.close()


@pytest.fixture(scope="module")
def channels(stack: Stack) -> Iterator[dict[str, grpc.Channel]]:
    opened = {name: grpc.insecure_channel(s.address) for name, s in stack.services.items()}
    yield opened
    for channel in opened.values():
        channel.close()


How = tuple[str, float]  # (plain | deadline | cancel, seconds)
hows = st.one_of(
    st.just(("plain", 0.0)),
    st.tuples(st.just("deadline"), st.sampled_from([1e-6, 1e-3, 0.02])),
    st.tuples(st.just("cancel"), st.sampled_from([0.0, 0.001, 0.01])),
)


def call(channel: grpc.Channel, method: MethodDescriptor, request: Any, how: How) -> grpc.StatusCode:
    """Send `request`; the status the call ended with."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    response = GetMessageClass(method.output_type)
    kind, seconds = how
    timeout = seconds if kind == "deadline" else 30.0
    serialize = type(request).SerializeToString
    try:
        if method.server_streaming:
            stream = channel.unary_stream(path, serialize, response.FromString)(request, timeout=timeout)
            if kind == "cancel":
                time.sleep(seconds)
                stream.cancel()
            for _ in stream:
                pass
            return stream.code()
        unary = channel.unary_unary(path, serialize, response.FromString)
        if kind == "cancel":
            future = unary.future(request, timeout=timeout)
            time.sleep(seconds)
            future.cancel()
            try:
                future.result()
            except grpc.FutureCancelledError:
                return grpc.StatusCode.CANCELLED
            return grpc.StatusCode.OK
        unary(request, timeout=timeout)
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        code = exc.code()
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            assert FIELD_FIRST.match(exc.details() or ""), f"{method.name}: {exc.details()!r} names no field"
        return code


def check_still_healthy(stack: Stack, channel: grpc.Channel, name: str) -> None:
    reply = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=SERVICE_NAMES[name]), timeout=10
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    deadline = time.monotonic() + 30
    while stack.in_flight(name) != 0:
        assert time.monotonic() < deadline, f"{name}: calls still in flight after 30 s"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "method"), METHODS, ids=[f"{n}.{m.name}" for n, m in METHODS])
def test_every_rpc_answers_generated_requests_with_a_precise_status(stack, channels, name, method):
    valid = VALID[method.name]
    # generated from scratch (most fail a first check), or a valid request with a few fields
    # changed (these reach the deeper ones), twice as often
    requests = st.one_of(
        fuzz.message(method.input_type, HINTS), fuzz.mutated(valid, HINTS), fuzz.mutated(valid, HINTS)
    )

    @settings(
        max_examples=60,
        deadline=None,
        derandomize=True,  # the same requests on every run: a failure reproduces
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(request=requests, how=hows)
    def sends(request: Any, how: How) -> None:
        code = call(channels[name], method, request, how)
        allowed = PRECISE | (GONE if how[0] != "plain" else set())
        assert code in allowed, f"{method.name} answered {code.name} to {request!r:.400}"

    assert call(channels[name], method, valid, ("plain", 0)) == grpc.StatusCode.OK
    sends()  # warms up what is built once (stubs, the constitution's prompts, ...)
    tracemalloc.start()
    try:
        sends()  # the same requests again: what the services' code keeps of them stays small
        check_still_healthy(stack, channels[name], name)
        gc.collect()
        kept = tracemalloc.take_snapshot().filter_traces(OUR_CODE).statistics("lineno")
    finally:
        tracemalloc.stop()
    assert sum(s.size for s in kept) < 64 * 1024, [str(s) for s in kept[:5]]
