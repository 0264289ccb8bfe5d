"""JudgeService: soft preference labels from the option tokens' log-probabilities."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import grpc

from cai.constitution import Conversation
from cai.engine import CAIEngine, ComparisonResult
from cai.errors import InvalidArgument
from cai.v1 import common_pb2, judge_pb2, judge_pb2_grpc
from services import convert
from services.convert import Limits


class JudgeServicer(judge_pb2_grpc.JudgeServiceServicer):
    def __init__(self, engine: CAIEngine, limits: Limits):
        self.engine = engine
        self.limits = limits

    async def _compare(
        self, conversation: Conversation, a: str, b: str, options: judge_pb2.JudgeOptions, field: str
    ) -> ComparisonResult:
        for name, text in (("response_a", a), ("response_b", b)):
            if not text.strip():
                raise InvalidArgument(f"{field}{name}: must not be empty")
        return await self.engine.compare(
            conversation,
            a,
            b,
            k_principles=options.k_principles or 1,
            debias=not options.disable_debias,
            cot=options.chain_of_thought,
            principles=list(options.principle_ids) or None,
            seed=options.seed if options.HasField("seed") else None,
        )

    async def _conversation(
        self, message: common_pb2.Conversation, extra: list[str], field: str
    ) -> Conversation:
        turns = convert.conversation(message, f"{field}conversation")
        if turns[-1]["role"] != "user":
            raise InvalidArgument(f"{field}conversation: must end with the user turn the responses answer")
        # The judge sees the conversation and the responses in one prompt.
        text = await self.engine.backend.render(turns) + "\n".join(extra)
        await convert.check_prompt_length(self.engine.backend, text, self.limits, f"{field}conversation")
        return turns

    def _response(self, result: ComparisonResult) -> judge_pb2.CompareResponse:
        return judge_pb2.CompareResponse(
            p_a=result.p_a,
            labels=convert.labels_proto(result.labels),
            constitution_hash=self.engine.constitution.hash,
            model_id=self.engine.backend.model_id,
        )

    async def _one(self, request: judge_pb2.CompareRequest, field: str = "") -> judge_pb2.CompareResponse:
        a, b = request.response_a, request.response_b
        turns = await self._conversation(request.conversation, [a, b], field)
        return self._response(await self._compare(turns, a, b, request.options, field))

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
        turns = await self._conversation(request.conversation, responses, "")
        pairs = list(itertools.combinations(range(len(responses)), 2))
        results = await asyncio.gather(
            *(self._compare(turns, responses[i], responses[j], request.options, "") for i, j in pairs)
        )
        wins = [0.0] * len(responses)
        for (i, j), result in zip(pairs, results, strict=True):
            wins[i] += result.p_a
            wins[j] += 1 - result.p_a
        scores = [w / (len(responses) - 1) for w in wins]
        order = sorted(range(len(responses)), key=lambda i: -scores[i])
        return judge_pb2.RankResponse(scores=scores, order=order)
