"""PolicyService: generation and option scoring with the served policy weights, or with the base
weights for a request that asks (a feedback model on the same engine)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from cai.backends.base import SamplingParams
from cai.v1 import common_pb2, policy_pb2, policy_pb2_grpc
from services import convert
from services.dataplane import PolicyPlane

DEFAULT_PARAMS = SamplingParams(max_new_tokens=128, temperature=0.7, top_p=1.0)


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(self, plane: PolicyPlane):
        self.plane = plane
        self.base_plane = PolicyPlane(plane.backend.base_weights(), plane.limits, plane.count)
        self.backend = plane.backend
        self.limits = plane.limits

    def _plane(self, base_weights: bool) -> PolicyPlane:
        return self.base_plane if base_weights else self.plane

    async def _text(self, message: policy_pb2.PolicyInput) -> str:
        given = convert.prompt_input(message)
        return given if isinstance(given, str) else await self.backend.render(given)

    async def _prompt(self, message: policy_pb2.PolicyInput) -> str:
        return await self.plane.checked(await self._text(message), "input")

    async def Generate(
        self, request: policy_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.GenerateResponse:
        params = convert.sampling(request.parameters, self.limits, DEFAULT_PARAMS, n=request.n)
        plane = self._plane(request.base_weights)
        completions = await plane.generate(await self._prompt(request.input), params)
        return policy_pb2.GenerateResponse(
            completions=[convert.completion_proto(c) for c in completions],
            policy_version=completions[0].policy_version or plane.backend.policy_version,
            model_id=self.backend.model_id,
        )

    async def GenerateStream(
        self, request: policy_pb2.GenerateStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[policy_pb2.GenerateStreamResponse]:
        params = convert.sampling(request.parameters, self.limits, DEFAULT_PARAMS)
        prompt = await self._prompt(request.input)
        plane = self._plane(request.base_weights)
        version = plane.backend.policy_version
        text = ""
        pieces = 0
        async for piece in plane.generate_stream(prompt, params):
            text += piece
            pieces += 1
            yield policy_pb2.GenerateStreamResponse(text=piece, token_count=pieces, policy_version=version)
        tokens = await self.backend.count_tokens(text)
        tokens = pieces if tokens is None else tokens
        # The stream carries no finish reason: running out of tokens is the only way to hit the limit.
        finish = (
            common_pb2.FINISH_REASON_LENGTH
            if tokens >= params.max_new_tokens
            else common_pb2.FINISH_REASON_STOP
        )
        yield policy_pb2.GenerateStreamResponse(
            finish_reason=finish, token_count=tokens, policy_version=version
        )

    async def ScoreOptions(
        self, request: policy_pb2.ScoreOptionsRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.ScoreOptionsResponse:
        plane = self._plane(request.base_weights)
        version = plane.backend.policy_version
        logprobs = await plane.score_options(await self._prompt(request.input), list(request.options))
        return policy_pb2.ScoreOptionsResponse(logprobs=logprobs, policy_version=version)

    async def GetInfo(
        self, request: policy_pb2.GetInfoRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.GetInfoResponse:
        return policy_pb2.GetInfoResponse(
            model_id=self.backend.model_id,
            policy_version=self.backend.policy_version,
            backend=self.backend.kind,
            limits=self.limits.to_proto(),
        )

    async def Render(
        self, request: policy_pb2.RenderRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.RenderResponse:
        text = await self._text(request.input)
        tokens = await self.backend.count_tokens(text)
        return policy_pb2.RenderResponse(text=text, token_count=tokens or 0)
