"""`cai up --services`: the run's three stages through the gRPC services on loopback."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from cai.backends.base import Backend, Completion, SamplingParams
from cai.constitution import Constitution, Conversation
from cai.engine import (
    ComparisonResult,
    CritiqueChain,
    CritiqueOptions,
    CritiqueStep,
    EngineConfig,
    JudgeOptions,
)
from cai.records import labels_of
from services import convert
from services.backends import PolicyServiceBackend
from services.client import AsyncClient
from services.server import RunningService, start_service
from services.settings import load_settings


class ServiceStages:
    """Drives a run through running policy, critique and judge services."""

    def __init__(
        self, policy: AsyncClient, critique: AsyncClient, judge: AsyncClient, constitution: Constitution
    ):
        self.policy, self.critic, self.judge = policy, critique, judge
        self.constitution = constitution
        self.model_id = ""
        self.feedback_model_id = ""
        self.engine_config = EngineConfig()  # what the critique and judge services run with

    async def respond(self, conversation: Conversation, params: SamplingParams) -> list[Completion]:
        request = convert.parameters_proto(params)
        reply = await self.policy.generate(conversation, n=params.n, params=request)
        self.model_id = reply.model_id
        return convert.completions_of(reply)

    async def critique_revise(
        self, conversation: Conversation, options: CritiqueOptions, seed: int
    ) -> CritiqueChain:
        steps = [
            CritiqueStep(s.principle_id, s.critique, s.revision)
            async for s in self.critic.critique_revise(
                conversation, options.rounds, list(options.principles), seed=seed
            )
        ]
        return CritiqueChain(conversation[-1]["content"], steps)

    async def compare(
        self, conversation: Conversation, a: str, b: str, options: JudgeOptions, seed: int
    ) -> ComparisonResult:
        reply = await self.judge.compare(conversation, a, b, convert.judge_options_proto(options, seed))
        return ComparisonResult(reply.p_a, labels_of(reply.labels))


@contextlib.asynccontextmanager
async def loopback_stages(
    backend: Backend, constitution: Constitution, feedback: Backend | None = None
) -> AsyncIterator[ServiceStages]:
    """Start the three services on free loopback ports and drive them through gRPC clients. The
    policy serves `backend`. The critique and judge services use `feedback` (a model of their own:
    `--judge-model`, or the base weights while the policy trains), else the policy service's base
    weights, so one model (and one batching queue) does everything."""
    roomy = {"port": 0, "metrics_port": 0, "max_prompt_tokens": 8192, "max_new_tokens": 1024, "max_n": 16}
    running: list[RunningService] = []
    clients: list[AsyncClient] = []
    remotes: list[PolicyServiceBackend] = []
    try:
        policy = await start_service("policy", load_settings("policy", None, **roomy), backend)
        running.append(policy)
        for name in ("critique", "judge"):
            settings = load_settings(name, None, constitution=constitution.source, **roomy)
            if feedback is None:
                remotes.append(PolicyServiceBackend(policy.address, base_weights=True))
            running.append(await start_service(name, settings, feedback or remotes[-1]))
        clients = [AsyncClient(service.address, timeout=600) for service in running]
        stages = ServiceStages(clients[0], clients[1], clients[2], constitution)
        stages.model_id = (await clients[0].info()).model_id
        stages.feedback_model_id = feedback.model_id if feedback else stages.model_id
        yield stages
    finally:
        for client in clients:
            await client.close()
        for service in reversed(running):
            await service.stop(0)
        for remote in remotes:
            await remote.close()
