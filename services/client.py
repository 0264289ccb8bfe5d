"""Python clients of the three services: `AsyncClient` (grpc.aio) and `Client` (blocking).

Both retry calls that fail with UNAVAILABLE (gRPC's own retry policy, with exponential backoff)
and give every call a deadline. One client talks to one address; a service answers only its own
RPCs, so point a client at the service you call.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from cai.constitution import Conversation
from cai.engine import JudgeOptions
from cai.records import conversation_proto
from cai.v1 import (
    common_pb2,
    critique_pb2,
    critique_pb2_grpc,
    judge_pb2,
    judge_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
)
from services.convert import judge_options_proto


@dataclass(frozen=True)
class TLS:
    """Trust `ca` for the server; add `cert` and `key` to present a client certificate (mTLS)."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: Path | None) -> bytes | None:
            return path.read_bytes() if path else None

        return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))


def _options(retries: int, max_message_bytes: int) -> list[tuple[str, Any]]:
    service_config = {
        "methodConfig": [
            {
                "name": [{}],  # every method
                "retryPolicy": {
                    "maxAttempts": retries + 1,
                    "initialBackoff": "0.2s",
                    "maxBackoff": "5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
    sizes = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    if retries == 0:
        return [*sizes, ("grpc.enable_retries", 0)]
    return [*sizes, ("grpc.service_config", json.dumps(service_config)), ("grpc.enable_retries", 1)]


def _messages(conversation: Conversation | str) -> common_pb2.Conversation:
    if isinstance(conversation, str):
        conversation = [{"role": "user", "content": conversation}]
    return conversation_proto(conversation)


def _input(prompt: Conversation | str, raw: bool) -> policy_pb2.PolicyInput:
    if raw:
        if not isinstance(prompt, str):
            raise TypeError("raw=True takes the prompt text as a str")
        return policy_pb2.PolicyInput(raw_prompt=prompt)
    return policy_pb2.PolicyInput(conversation=_messages(prompt))


def parameters(
    max_new_tokens: int = 0,
    temperature: float | None = None,
    top_p: float = 0.0,
    stop: Sequence[str] = (),
    seed: int | None = None,
) -> common_pb2.GenerationParameters:
    """Generation parameters; zero values and None mean the service's default."""
    return common_pb2.GenerationParameters(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stop=list(stop), seed=seed
    )


def judge_options(
    k_principles: int = 1,
    principle_ids: Sequence[str] = (),
    debias: bool = True,
    chain_of_thought: bool = False,
    seed: int | None = None,
) -> judge_pb2.JudgeOptions:
    options = JudgeOptions(k_principles, debias, chain_of_thought, tuple(principle_ids))
    return judge_options_proto(options, seed)


class AsyncClient:
    """grpc.aio client; use as `async with AsyncClient("localhost:50052") as client:`.
    `timeout` is the default deadline of each call, in seconds."""

    def __init__(
        self,
        address: str,
        token: str | None = None,
        tls: TLS | None = None,
        timeout: float = 120.0,
        retries: int = 4,
        max_message_bytes: int = 4 << 20,
    ):
        self.address = address
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options = _options(retries, max_message_bytes)
        if tls:
            self.channel = grpc.aio.secure_channel(address, tls.credentials(), options)
        else:
            self.channel = grpc.aio.insecure_channel(address, options)
        self.policy = policy_pb2_grpc.PolicyServiceStub(self.channel)
        self.critique_service = critique_pb2_grpc.CritiqueServiceStub(self.channel)
        self.judge = judge_pb2_grpc.JudgeServiceStub(self.channel)

    def _call(self, timeout: float | None) -> dict[str, Any]:
        return {"timeout": self.timeout if timeout is None else timeout, "metadata": self._metadata}

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until the channel connects (the server is listening)."""
        await asyncio.wait_for(self.channel.channel_ready(), timeout)

    # ---- PolicyService ---------------------------------------------------------------------

    async def generate(
        self,
        prompt: Conversation | str,
        n: int = 1,
        params: common_pb2.GenerationParameters | None = None,
        raw: bool = False,
        timeout: float | None = None,
        base_weights: bool = False,
    ) -> policy_pb2.GenerateResponse:
        request = policy_pb2.GenerateRequest(
            input=_input(prompt, raw), parameters=params, n=n, base_weights=base_weights
        )
        return await self.policy.Generate(request, **self._call(timeout))

    async def generate_stream(
        self,
        prompt: Conversation | str,
        params: common_pb2.GenerationParameters | None = None,
        raw: bool = False,
        timeout: float | None = None,
        base_weights: bool = False,
    ) -> AsyncIterator[policy_pb2.GenerateStreamResponse]:
        request = policy_pb2.GenerateStreamRequest(
            input=_input(prompt, raw), parameters=params, base_weights=base_weights
        )
        async for item in self.policy.GenerateStream(request, **self._call(timeout)):
            yield item

    async def score_options(
        self,
        prompt: Conversation | str,
        options: Sequence[str],
        raw: bool = False,
        timeout: float | None = None,
        base_weights: bool = False,
    ) -> policy_pb2.ScoreOptionsResponse:
        request = policy_pb2.ScoreOptionsRequest(
            input=_input(prompt, raw), options=list(options), base_weights=base_weights
        )
        return await self.policy.ScoreOptions(request, **self._call(timeout))

    async def render(
        self, prompt: Conversation | str, raw: bool = False, timeout: float | None = None
    ) -> policy_pb2.RenderResponse:
        return await self.policy.Render(
            policy_pb2.RenderRequest(input=_input(prompt, raw)), **self._call(timeout)
        )

    async def info(self, timeout: float | None = None) -> policy_pb2.GetInfoResponse:
        return await self.policy.GetInfo(policy_pb2.GetInfoRequest(), **self._call(timeout))

    # ---- CritiqueService -------------------------------------------------------------------

    async def critique(
        self,
        conversation: Conversation,
        principle_id: str = "",
        params: common_pb2.GenerationParameters | None = None,
        timeout: float | None = None,
    ) -> critique_pb2.CritiqueResponse:
        request = critique_pb2.CritiqueRequest(
            conversation=_messages(conversation), principle_id=principle_id, parameters=params
        )
        return await self.critique_service.Critique(request, **self._call(timeout))

    async def revise(
        self,
        conversation: Conversation,
        principle_id: str,
        critique: str,
        params: common_pb2.GenerationParameters | None = None,
        timeout: float | None = None,
    ) -> critique_pb2.ReviseResponse:
        request = critique_pb2.ReviseRequest(
            conversation=_messages(conversation),
            principle_id=principle_id,
            critique=critique,
            parameters=params,
        )
        return await self.critique_service.Revise(request, **self._call(timeout))

    async def critique_revise(
        self,
        conversation: Conversation,
        rounds: int = 1,
        principle_ids: Sequence[str] = (),
        seed: int | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[critique_pb2.CritiqueReviseResponse]:
        request = critique_pb2.CritiqueReviseRequest(
            conversation=_messages(conversation), rounds=rounds, principle_ids=list(principle_ids), seed=seed
        )
        async for item in self.critique_service.CritiqueRevise(request, **self._call(timeout)):
            yield item

    async def list_principles(
        self, tier: str = "", timeout: float | None = None
    ) -> list[critique_pb2.Principle]:
        request = critique_pb2.ListPrinciplesRequest(tier=tier)
        return list((await self.critique_service.ListPrinciples(request, **self._call(timeout))).principles)

    async def constitution(self, timeout: float | None = None) -> critique_pb2.GetConstitutionResponse:
        request = critique_pb2.GetConstitutionRequest()
        return await self.critique_service.GetConstitution(request, **self._call(timeout))

    # ---- JudgeService ----------------------------------------------------------------------

    async def compare(
        self,
        conversation: Conversation | str,
        response_a: str,
        response_b: str,
        options: judge_pb2.JudgeOptions | None = None,
        timeout: float | None = None,
    ) -> judge_pb2.CompareResponse:
        request = judge_pb2.CompareRequest(
            conversation=_messages(conversation),
            response_a=response_a,
            response_b=response_b,
            options=options,
        )
        return await self.judge.Compare(request, **self._call(timeout))

    async def compare_batch(
        self,
        items: Sequence[tuple[Conversation | str, str, str]],
        options: judge_pb2.JudgeOptions | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[judge_pb2.CompareBatchResponse]:
        request = judge_pb2.CompareBatchRequest(
            comparisons=[
                judge_pb2.CompareRequest(
                    conversation=_messages(c), response_a=a, response_b=b, options=options
                )
                for c, a, b in items
            ]
        )
        async for item in self.judge.CompareBatch(request, **self._call(timeout)):
            yield item

    async def rank(
        self,
        conversation: Conversation | str,
        responses: Sequence[str],
        options: judge_pb2.JudgeOptions | None = None,
        timeout: float | None = None,
    ) -> judge_pb2.RankResponse:
        request = judge_pb2.RankRequest(
            conversation=_messages(conversation), responses=list(responses), options=options
        )
        return await self.judge.Rank(request, **self._call(timeout))


class Client:
    """Blocking client: every `AsyncClient` method, run on a private event-loop thread.
    Streaming methods return iterators."""

    def __init__(self, address: str, **kwargs: Any):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cai-client", daemon=True)
        self._thread.start()

        async def connect() -> AsyncClient:  # a grpc.aio channel belongs to the loop that creates it
            return AsyncClient(address, **kwargs)

        self._client = self._run(connect())

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)
        if inspect.isasyncgenfunction(method):

            def stream(*args: Any, **kwargs: Any) -> Iterator[Any]:
                items = method(*args, **kwargs)
                while True:
                    try:
                        yield self._run(items.__anext__())
                    except StopAsyncIteration:
                        return

            return stream
        if inspect.iscoroutinefunction(method):
            return lambda *args, **kwargs: self._run(method(*args, **kwargs))
        return method

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
