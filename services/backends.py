"""`--backend KIND:TARGET` -> a Backend, and the backend that uses a running policy service."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import httpx2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cai.backends.base import Backend, Completion, SamplingParams, WrappedBackend
from cai.backends.openai import OpenAIBackend
from cai.constitution import Conversation
from cai.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from services import convert
from services.client import TLS, AsyncClient
from services.settings import PolicySettings, ServiceSettings

KINDS = ("transformers", "tgi", "openai", "policy")
POLICY_SERVICE = "cai.v1.PolicyService"


def _status_error(exc: grpc.aio.AioRpcError, address: str) -> Exception:
    """A policy service's status code -> the same domain error here, so it maps back to the same code."""
    kinds = {
        grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
        grpc.StatusCode.NOT_FOUND: NotFound,
        grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    }
    return kinds.get(exc.code(), Unavailable)(f"policy service {address}: {exc.details()}")


class PolicyServiceBackend(Backend):
    """A running policy service as a backend: the version it serves now (`cai eval` of a running
    policy), or its base weights (`base_weights`: critique and judge, so the feedback model stays
    fixed while the policy it judges trains)."""

    kind = "policy"

    def __init__(
        self, address: str, base_weights: bool = False, token: str | None = None, tls: TLS | None = None
    ):
        self.address = address
        self.base_weights_only = base_weights
        self.model_id = f"policy:{address}"
        self.client = AsyncClient(address, token=token, tls=tls)
        self.health = health_pb2_grpc.HealthStub(self.client.channel)

    async def start(self) -> None:
        try:
            info = await self.client.info()
        except grpc.aio.AioRpcError as exc:
            raise _status_error(exc, self.address) from None
        self.model_id = info.model_id
        if not self.base_weights_only:
            self.policy_version = info.policy_version

    async def ready(self, timeout: float) -> str | None:
        """None when the policy service reports SERVING (its health check), else why not."""
        request = health_pb2.HealthCheckRequest(service=POLICY_SERVICE)
        try:
            reply = await self.health.Check(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            return f"policy service {self.address}: {exc.code().name}: {exc.details()}"
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            return f"policy service {self.address} reports {status}"
        return None

    async def render(self, messages: Conversation) -> str:
        try:
            return (await self.client.render(messages)).text
        except grpc.aio.AioRpcError as exc:
            raise _status_error(exc, self.address) from None

    async def count_tokens(self, text: str) -> int | None:
        try:
            return (await self.client.render(text, raw=True)).token_count or None
        except grpc.aio.AioRpcError as exc:
            raise _status_error(exc, self.address) from None

    async def generate(self, prompt: str, params: SamplingParams) -> list[Completion]:
        request = convert.parameters_proto(params)
        try:
            response = await self.client.generate(
                prompt, n=params.n, params=request, raw=True, base_weights=self.base_weights_only
            )
        except grpc.aio.AioRpcError as exc:
            raise _status_error(exc, self.address) from None
        self.policy_version = response.policy_version
        return convert.completions_of(response)

    async def generate_stream(self, prompt: str, params: SamplingParams) -> AsyncIterator[str]:
        request = convert.parameters_proto(params)
        try:
            stream = self.client.generate_stream(
                prompt, params=request, raw=True, base_weights=self.base_weights_only
            )
            async for item in stream:
                if item.text:
                    yield item.text
        except grpc.aio.AioRpcError as exc:
            raise _status_error(exc, self.address) from None

    async def score_options(self, prompt: str, options: list[str]) -> list[float]:
        try:
            reply = await self.client.score_options(
                prompt, options, raw=True, base_weights=self.base_weights_only
            )
            return list(reply.logprobs)
        except grpc.aio.AioRpcError as exc:
            raise _status_error(exc, self.address) from None

    async def close(self) -> None:
        await self.client.close()


async def readiness(backend: Backend, timeout: float) -> str | None:
    """None when `backend` can answer now, else why not. An in-process model is ready once loaded;
    a remote engine or policy service is asked, within `timeout` seconds."""
    while isinstance(backend, WrappedBackend):
        backend = backend.inner
    if isinstance(backend, PolicyServiceBackend | OpenAIBackend):
        # An OpenAI-compatible server lists its models; vLLM must also list our policy versions
        # (a restarted one gets them back here, before the service reports SERVING again).
        return await backend.ready(timeout)
    url = getattr(backend, "url", None)
    if backend.kind != "tgi" or url is None:
        return None
    # TGI answers /health once its model is loaded.
    token = getattr(backend, "token", None)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        async with httpx2.AsyncClient(timeout=timeout) as http:
            response = await http.get(f"{url}/health", headers=headers)
    except httpx2.HTTPError as exc:
        return f"tgi server {url}: {type(exc).__name__}: {exc}"
    if not response.is_success:
        return f"tgi server {url}: GET /health answered {response.status_code}"
    return None


def make_backend(spec: str, settings: ServiceSettings) -> Backend:
    kind, sep, target = spec.partition(":")
    if not sep or kind not in KINDS or not target:
        raise InvalidArgument(
            f"backend: {spec!r} is not one of transformers:PATH, tgi:URL, openai:URL, policy:ADDRESS"
        )
    if kind == "transformers":
        from cai.backends.transformers import TransformersBackend
        from cai.models import resolve_model

        return TransformersBackend(
            resolve_model(target),
            device=settings.device,
            dtype=settings.dtype,
            max_batch_size=settings.max_batch_size,
            max_batch_tokens=settings.max_batch_tokens,
            batch_window_ms=settings.batch_window_ms,
            max_queue=settings.max_queue,
        )
    if kind == "tgi":
        from cai.backends.tgi import TGIBackend

        return TGIBackend(target, tokenizer=settings.tokenizer)
    if kind == "openai":
        keep = settings.loaded_versions if isinstance(settings, PolicySettings) else 1
        return OpenAIBackend(target, settings.served_model, settings.tokenizer, keep_versions=keep)
    token = settings.policy_token.get_secret_value() if settings.policy_token else None
    tls = TLS(ca=settings.policy_tls_ca) if settings.policy_tls_ca else None
    return PolicyServiceBackend(target, base_weights=True, token=token, tls=tls)  # critique, judge
