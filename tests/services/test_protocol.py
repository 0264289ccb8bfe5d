"""The gRPC layer on FakeBackends: every RPC's happy path, bad input per RPC (status code and a
message naming the field), queue limits, deadlines, health and metrics."""

from __future__ import annotations

import asyncio
import socket
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cai.backends.fake import FakeBackend
from cai.errors import InvalidArgument
from cai.v1 import common_pb2, critique_pb2, policy_pb2
from services.client import AsyncClient, Client, judge_options, parameters
from services.server import start_service

CHAT = [{"role": "user", "content": "How do I boil an egg?"}]
ANSWERED = [*CHAT, {"role": "assistant", "content": "Put it in boiling water for eight minutes."}]
INVALID = grpc.StatusCode.INVALID_ARGUMENT


async def expect(call, code: grpc.StatusCode, *fragments: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        result = call()
        if hasattr(result, "__aiter__"):
            [_ async for _ in result]
        else:
            await result
    assert info.value.code() == code, info.value.details()
    for fragment in fragments:
        assert fragment in info.value.details()


async def assert_healthy(client: AsyncClient) -> None:
    health = health_pb2_grpc.HealthStub(client.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


# ---- happy paths -------------------------------------------------------------------------------


async def test_policy_rpcs(clients):
    policy = clients["policy"]
    reply = await policy.generate(CHAT, n=3, params=parameters(max_new_tokens=8, seed=1))
    assert len(reply.completions) == 3 and reply.model_id == "fake" and reply.policy_version == "base"
    assert all(1 <= c.token_count <= 8 for c in reply.completions)
    assert {c.finish_reason for c in reply.completions} <= {
        common_pb2.FINISH_REASON_STOP,
        common_pb2.FINISH_REASON_LENGTH,
    }
    again = await policy.generate(CHAT, n=3, params=parameters(max_new_tokens=8, seed=1))
    assert [c.text for c in again.completions] == [c.text for c in reply.completions]  # seeded

    pieces = [p async for p in policy.generate_stream(CHAT, parameters(max_new_tokens=8, seed=1))]
    assert "".join(p.text for p in pieces) == reply.completions[0].text
    assert pieces[-1].finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
    assert pieces[-1].token_count == reply.completions[0].token_count

    scores = await policy.score_options("Answer: (", ["A", "B"], raw=True)
    assert len(scores.logprobs) == 2 and all(lp < 0 for lp in scores.logprobs)
    rendered = await policy.render(CHAT)
    assert rendered.text.endswith("Assistant:") and rendered.token_count == len(rendered.text.split())
    info = await policy.info()
    assert info.limits.max_new_tokens == 64 and info.backend == "fake"


async def test_critique_rpcs(clients):
    critic = clients["critique"]
    reply = await critic.critique(ANSWERED, principle_id="avoid-needless-refusal")
    assert (
        reply.principle_id == "avoid-needless-refusal"
        and reply.critique
        and len(reply.constitution_hash) == 64
    )
    drawn = await critic.critique(ANSWERED)
    assert drawn.principle_id in {p.id for p in await critic.list_principles()}
    revised = await critic.revise(ANSWERED, reply.principle_id, reply.critique)
    assert revised.revision and revised.principle_id == reply.principle_id
    steps = [s async for s in critic.critique_revise(ANSWERED, rounds=3, seed=4)]
    assert [s.round for s in steps] == [1, 2, 3] and all(s.critique and s.revision for s in steps)
    again = [s async for s in critic.critique_revise(ANSWERED, rounds=3, seed=4)]
    assert [s.principle_id for s in again] == [s.principle_id for s in steps]
    constitution = await critic.constitution()
    assert constitution.hash == reply.constitution_hash and constitution.yaml.startswith("id:")
    tier = constitution.tiers[0]
    assert {p.tier for p in await critic.list_principles(tier)} == {tier}


async def test_judge_rpcs(clients):
    judge = clients["judge"]
    reply = await judge.compare(CHAT, "Eight minutes.", "No idea.", judge_options(k_principles=3, seed=2))
    assert 0 < reply.p_a < 1 and len(reply.labels) == 3
    assert all(label.HasField("p_first_ba") for label in reply.labels)
    swapped = await judge.compare(CHAT, "No idea.", "Eight minutes.", judge_options(k_principles=3, seed=2))
    assert swapped.p_a == pytest.approx(1 - reply.p_a, abs=1e-9)  # debiased labels are antisymmetric
    one_order = await judge.compare(CHAT, "a", "b", judge_options(debias=False, seed=2))
    assert not one_order.labels[0].HasField("p_first_ba")

    items = [(CHAT, f"answer {i}", "other") for i in range(5)]
    results = [r async for r in judge.compare_batch(items, judge_options(seed=1))]
    assert sorted(r.index for r in results) == list(range(5))

    ranked = await judge.rank(CHAT, ["x", "y", "z"], judge_options(seed=3))
    assert len(ranked.scores) == 3 and sorted(ranked.order) == [0, 1, 2]
    assert sum(ranked.scores) == pytest.approx(1.5)  # each of the 3 pairs hands out one unit of wins
    assert ranked.scores[ranked.order[0]] == max(ranked.scores)


# ---- bad input ----------------------------------------------------------------------------------


async def test_policy_rejects_bad_input_and_stays_healthy(clients):
    policy = clients["policy"]
    stub = policy.policy
    await expect(lambda: stub.Generate(policy_pb2.GenerateRequest()), INVALID, "input")
    empty_conversation = policy_pb2.PolicyInput(conversation=common_pb2.Conversation())
    await expect(
        lambda: stub.Generate(policy_pb2.GenerateRequest(input=empty_conversation)),
        INVALID,
        "input.conversation",
    )
    bad_role = policy_pb2.PolicyInput(
        conversation=common_pb2.Conversation(messages=[common_pb2.Message(role=7, content="hi")])  # type: ignore[arg-type]
    )
    await expect(
        lambda: stub.Generate(policy_pb2.GenerateRequest(input=bad_role)), INVALID, "messages[0].role"
    )
    await expect(lambda: policy.generate("word " * 300, raw=True), INVALID, "input", "300 tokens", "200")
    await expect(
        lambda: policy.generate(CHAT, params=parameters(max_new_tokens=65)),
        INVALID,
        "parameters.max_new_tokens",
    )
    await expect(lambda: policy.generate(CHAT, n=5), INVALID, "n:")
    await expect(
        lambda: policy.generate(CHAT, params=parameters(temperature=-1)), INVALID, "parameters.temperature"
    )
    await expect(lambda: policy.generate(CHAT, params=parameters(top_p=1.5)), INVALID, "parameters.top_p")
    await expect(
        lambda: policy.generate_stream(CHAT, parameters(max_new_tokens=1000)), INVALID, "max_new_tokens"
    )
    await expect(lambda: policy.score_options(CHAT, []), INVALID, "options")
    await expect(lambda: stub.Render(policy_pb2.RenderRequest()), INVALID, "input")
    await assert_healthy(policy)
    assert (await policy.generate(CHAT)).completions


async def test_critique_rejects_bad_input_and_stays_healthy(clients):
    critic = clients["critique"]
    stub = critic.critique_service
    await expect(lambda: stub.Critique(critique_pb2.CritiqueRequest()), INVALID, "conversation")
    await expect(lambda: critic.critique(CHAT), INVALID, "conversation", "assistant")
    await expect(
        lambda: critic.critique(ANSWERED, "no-such-principle"), grpc.StatusCode.NOT_FOUND, "no-such-principle"
    )
    await expect(
        lambda: critic.critique(ANSWERED, params=parameters(max_new_tokens=100)),
        INVALID,
        "parameters.max_new_tokens",
    )
    long_answer = [*CHAT, {"role": "assistant", "content": "word " * 300}]
    await expect(lambda: critic.critique(long_answer), INVALID, "conversation", "tokens")
    await expect(lambda: critic.revise(ANSWERED, "", "too vague"), INVALID, "principle_id")
    await expect(lambda: critic.revise(ANSWERED, "avoid-needless-refusal", " "), INVALID, "critique")
    await expect(lambda: critic.critique_revise(ANSWERED, rounds=4), INVALID, "rounds", "3")
    await expect(
        lambda: critic.critique_revise(ANSWERED, rounds=2, principle_ids=["avoid-needless-refusal"]),
        INVALID,
        "principles",
    )
    await expect(lambda: critic.list_principles("no-such-tier"), grpc.StatusCode.NOT_FOUND, "tier")
    await assert_healthy(critic)
    assert (await critic.critique(ANSWERED)).critique


async def test_judge_rejects_bad_input_and_stays_healthy(clients):
    judge = clients["judge"]
    await expect(lambda: judge.compare(CHAT, "", "b"), INVALID, "response_a")
    await expect(lambda: judge.compare(ANSWERED, "a", "b"), INVALID, "conversation", "user")
    await expect(
        lambda: judge.compare(CHAT, "a", "b", judge_options(k_principles=99)), INVALID, "k_principles", "99"
    )
    await expect(
        lambda: judge.compare(CHAT, "a", "b", judge_options(principle_ids=["nope"])),
        grpc.StatusCode.NOT_FOUND,
        "nope",
    )
    await expect(lambda: judge.compare(CHAT, "word " * 150, "word " * 150), INVALID, "conversation", "tokens")
    await expect(lambda: judge.compare_batch([]), INVALID, "comparisons")
    await expect(
        lambda: judge.compare_batch([(CHAT, "a", "b"), (CHAT, "a", "")]), INVALID, "comparisons[1].response_b"
    )
    await expect(lambda: judge.compare_batch([(CHAT, "a", "b")] * 9), INVALID, "comparisons", "8")
    await expect(lambda: judge.rank(CHAT, ["only one"]), INVALID, "responses")
    await expect(lambda: judge.rank(CHAT, ["a", " "]), INVALID, "responses[1]")
    await assert_healthy(judge)
    assert 0 < (await judge.compare(CHAT, "a", "b")).p_a < 1


# ---- limits, deadlines, metrics ----------------------------------------------------------------


async def test_full_queue_answers_resource_exhausted_and_expired_deadlines_free_the_queue(make_settings):
    backend = FakeBackend(delay_s=0.5, max_queue=2)
    service = await start_service("policy", make_settings("policy"), backend)
    try:
        async with AsyncClient(service.address, timeout=10, retries=0) as client:
            results = await asyncio.gather(*(client.generate(CHAT) for _ in range(4)), return_exceptions=True)
            codes = [r.code() for r in results if isinstance(r, grpc.aio.AioRpcError)]
            assert codes and set(codes) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
            assert sum(isinstance(r, policy_pb2.GenerateResponse) for r in results) == 2

            await expect(lambda: client.generate(CHAT, timeout=0.1), grpc.StatusCode.DEADLINE_EXCEEDED)
            for _ in range(50):  # the server cancels the handler, which leaves the queue
                if backend.active == 0:
                    break
                await asyncio.sleep(0.02)
            assert backend.active == 0
            assert (await client.generate(CHAT)).completions
    finally:
        await service.stop(0)


async def test_metrics_count_requests_by_code(fake_stack, clients):
    await expect(lambda: clients["judge"].rank(CHAT, ["one"]), INVALID)
    await clients["judge"].compare(CHAT, "a", "b")
    url = f"http://127.0.0.1:{fake_stack['judge'].metrics_port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    assert 'cai_requests_total{code="INVALID_ARGUMENT",method="Rank",service="judge"}' in text
    assert 'cai_request_seconds_bucket{le="0.005",method="Compare",service="judge"}' in text
    assert "cai_queue_depth" in text and "cai_in_flight_requests" in text


async def test_messages_above_the_size_limit_are_refused(make_settings):
    service = await start_service(
        "critique", make_settings("critique", max_message_bytes=4096), FakeBackend()
    )
    try:
        async with AsyncClient(service.address, retries=0) as client:
            huge = [*CHAT, {"role": "assistant", "content": "x" * 10_000}]
            await expect(lambda: client.critique(huge), grpc.StatusCode.RESOURCE_EXHAUSTED)
            assert (await client.critique(ANSWERED)).critique
    finally:
        await service.stop(0)


async def test_clients_retry_unavailable_until_the_server_is_up(make_settings):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with AsyncClient(f"127.0.0.1:{port}", timeout=20, retries=4) as client:
        call = asyncio.ensure_future(client.generate(CHAT))
        await asyncio.sleep(0.5)  # the first attempt has failed with UNAVAILABLE by now
        assert not call.done()
        service = await start_service("policy", make_settings("policy", port=port), FakeBackend())
        try:
            assert (await call).completions
        finally:
            await service.stop(0)
    async with AsyncClient(f"127.0.0.1:{port}", timeout=20, retries=0) as client:
        await expect(lambda: client.generate(CHAT), grpc.StatusCode.UNAVAILABLE)


async def test_blocking_client_has_the_same_methods(fake_stack):
    def use() -> tuple[int, list[int], float]:
        with Client(fake_stack["policy"].address) as policy, Client(fake_stack["judge"].address) as judge:
            n = len(policy.generate(CHAT, n=2).completions)
            pieces = [p.token_count for p in policy.generate_stream(CHAT, parameters(max_new_tokens=6))]
            return n, pieces, judge.compare(CHAT, "a", "b").p_a

    n, pieces, p_a = await asyncio.to_thread(use)
    assert n == 2 and pieces[-1] <= 6 and len(pieces) >= 2 and 0 < p_a < 1


async def test_health_watch_and_busy_ports(fake_stack, clients, make_settings):
    health = health_pb2_grpc.HealthStub(clients["critique"].channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service="cai.v1.CritiqueService"))
    first = await watch.read()
    watch.cancel()
    assert first.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    url = f"http://127.0.0.1:{fake_stack['critique'].metrics_port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    assert 'cai_requests_total{code="NOT_FOUND",method="Check",service="critique"}' in text

    taken = fake_stack["critique"]
    with pytest.raises(InvalidArgument, match="port"):
        await start_service("judge", make_settings("judge", port=taken.port), FakeBackend())
    with pytest.raises(InvalidArgument, match="metrics_port"):
        await start_service("judge", make_settings("judge", metrics_port=taken.metrics_port), FakeBackend())
