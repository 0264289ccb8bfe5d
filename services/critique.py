"""CritiqueService: critique and revision of assistant responses against the constitution."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import grpc

from cai.engine import CritiqueOptions
from cai.errors import NotFound
from cai.records import conversation_of
from cai.v1 import critique_pb2, critique_pb2_grpc
from services import convert
from services.dataplane import CritiquePlane


class CritiqueServicer(critique_pb2_grpc.CritiqueServiceServicer):
    def __init__(self, plane: CritiquePlane):
        self.plane = plane
        self.engine = plane.engine
        self.limits = plane.limits

    @property
    def _hash(self) -> str:
        return self.engine.constitution.hash

    async def Critique(
        self, request: critique_pb2.CritiqueRequest, context: grpc.aio.ServicerContext
    ) -> critique_pb2.CritiqueResponse:
        params = convert.sampling(request.parameters, self.limits, self.engine.config.critique_params)
        turns = conversation_of(request.conversation)
        principle_id, critique = await self.plane.critique(turns, request.principle_id or None, params)
        return critique_pb2.CritiqueResponse(
            principle_id=principle_id, critique=critique, constitution_hash=self._hash
        )

    async def Revise(
        self, request: critique_pb2.ReviseRequest, context: grpc.aio.ServicerContext
    ) -> critique_pb2.ReviseResponse:
        params = convert.sampling(request.parameters, self.limits, self.engine.config.revision_params)
        turns = conversation_of(request.conversation)
        revision = await self.plane.revise(turns, request.principle_id, request.critique, params)
        return critique_pb2.ReviseResponse(
            principle_id=request.principle_id, revision=revision, constitution_hash=self._hash
        )

    async def CritiqueRevise(
        self, request: critique_pb2.CritiqueReviseRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[critique_pb2.CritiqueReviseResponse]:
        options = CritiqueOptions(request.rounds or 1, tuple(request.principle_ids))
        turns = conversation_of(request.conversation)
        seed = request.seed if request.HasField("seed") else secrets.randbits(32)
        steps = self.plane.steps(turns, options, seed)
        number = 0
        async for step in steps:
            number += 1
            yield critique_pb2.CritiqueReviseResponse(
                round=number,
                principle_id=step.principle_id,
                critique=step.critique,
                revision=step.revision,
                constitution_hash=self._hash,
            )

    async def ListPrinciples(
        self, request: critique_pb2.ListPrinciplesRequest, context: grpc.aio.ServicerContext
    ) -> critique_pb2.ListPrinciplesResponse:
        constitution = self.engine.constitution
        if request.tier and request.tier not in [t.id for t in constitution.tiers]:
            raise NotFound(f"tier: {request.tier!r} is not a tier of constitution {constitution.id!r}")
        return critique_pb2.ListPrinciplesResponse(
            principles=[
                critique_pb2.Principle(
                    id=p.id,
                    tier=p.tier,
                    rationale=p.rationale,
                    critique_request=p.critique or "",
                    revision_request=p.revision or "",
                    comparison_question=p.comparison or "",
                    weight=p.weight,
                )
                for p in constitution.principles
                if not request.tier or p.tier == request.tier
            ]
        )

    async def GetConstitution(
        self, request: critique_pb2.GetConstitutionRequest, context: grpc.aio.ServicerContext
    ) -> critique_pb2.GetConstitutionResponse:
        c = self.engine.constitution
        return critique_pb2.GetConstitutionResponse(
            id=c.id, version=c.version, hash=c.hash, tiers=[t.id for t in c.tiers], yaml=c.to_yaml()
        )
