"""JudgeService: soft preference labels from the option tokens' log-probabilities."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import grpc

from cai.engine import ComparisonResult
from cai.errors import InvalidArgument
from cai.records import conversation_of, labels_proto
from cai.v1 import judge_pb2, judge_pb2_grpc
from services import convert
from services.dataplane import JudgePlane


class JudgeServicer(judge_pb2_grpc.JudgeServiceServicer):
    def __init__(self, plane: JudgePlane):
        self.plane = plane
        self.engine = plane.engine
        self.limits = plane.limits

    def _response(self, result: ComparisonResult) -> judge_pb2.CompareResponse:
        return judge_pb2.CompareResponse(
            p_a=result.p_a,
            labels=labels_proto(result.labels),
            constitution_hash=self.engine.constitution.hash,
            model_id=self.engine.backend.model_id,
        )

    async def _one(self, request: judge_pb2.CompareRequest, field: str = "") -> judge_pb2.CompareResponse:
        turns = conversation_of(request.conversation, f"{field}conversation")
        options, seed = convert.judge_options_of(request.options)
        result = await self.plane.compare(turns, request.response_a, request.response_b, options, seed, field)
        return self._response(result)

    async def Compare(
        self, request: judge_pb2.CompareRequest, context: grpc.aio.ServicerContext
    ) -> judge_pb2.CompareResponse:
        return await self._one(request)

    async def CompareBatch(
        self, request: judge_pb2.CompareBatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[judge_pb2.CompareBatchResponse]:
        convert.check_count("comparisons", request.comparisons, 1, self.limits.max_batch)

        async def indexed(i: int, item: judge_pb2.CompareRequest) -> judge_pb2.CompareBatchResponse:
            return judge_pb2.CompareBatchResponse(index=i, result=await self._one(item, f"comparisons[{i}]."))

        tasks = [asyncio.ensure_future(indexed(i, item)) for i, item in enumerate(request.comparisons)]
        try:
            for finished in asyncio.as_completed(tasks):
                yield await finished
        finally:
            for task in tasks:  # the caller went away or one item failed: stop the rest
                task.cancel()

    async def Rank(
        self, request: judge_pb2.RankRequest, context: grpc.aio.ServicerContext
    ) -> judge_pb2.RankResponse:
        responses = list(request.responses)
        convert.check_count("responses", responses, 2, self.limits.max_n)
        for i, text in enumerate(responses):
            if not text.strip():
                raise InvalidArgument(f"responses[{i}]: must not be empty")
        turns = await self.plane.checked(conversation_of(request.conversation), responses)
        options, seed = convert.judge_options_of(request.options)
        pairs = list(itertools.combinations(range(len(responses)), 2))
        results = await asyncio.gather(
            *(self.plane.compare(turns, responses[i], responses[j], options, seed) for i, j in pairs)
        )
        wins = [0.0] * len(responses)
        for (i, j), result in zip(pairs, results, strict=True):
            wins[i] += result.p_a
            wins[j] += 1 - result.p_a
        scores = [w / (len(responses) - 1) for w in wins]
        order = sorted(range(len(responses)), key=lambda i: -scores[i])
        return judge_pb2.RankResponse(scores=scores, order=order)
