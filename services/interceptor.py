"""The one server interceptor: bearer-token auth, domain errors -> status codes, metrics, access logs."""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from cai import errors
from services.observability import Metrics

log = logging.getLogger("cai.access")

STATUS = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}
# Probes and API discovery work without a token, so kubelet and grpcurl can reach them.
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
READ_ONLY = {
    "/cai.v1.PolicyService/GetInfo",
    "/cai.v1.CritiqueService/ListPrinciples",
    "/cai.v1.CritiqueService/GetConstitution",
}


def status_of(exc: errors.CAIError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return grpc.StatusCode.FAILED_PRECONDITION


class Auth:
    """`token` may call every RPC; `read_token` only the read-only ones."""

    def __init__(self, token: str | None, read_token: str | None):
        self.token = token
        self.read_token = read_token

    @property
    def enabled(self) -> bool:
        return bool(self.token or self.read_token)

    def check(self, method: str, metadata: Any) -> None:
        if not self.enabled or method.startswith(OPEN_PREFIXES):
            return
        header = dict(metadata or ()).get("authorization", "")
        scheme, _, given = str(header).partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise errors.Unauthenticated("authorization: send the metadata 'authorization: Bearer <token>'")
        if self.token and hmac.compare_digest(given.encode(), self.token.encode()):
            return
        if self.read_token and hmac.compare_digest(given.encode(), self.read_token.encode()):
            if method in READ_ONLY:
                return
            raise errors.PermissionDenied(f"authorization: the read-only token may not call {method}")
        raise errors.Unauthenticated("authorization: the token is not valid for this service")


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """`not_started` says why the backend cannot take calls yet (None once it can): until then
    every RPC but health and reflection fails UNAVAILABLE with that reason, after the auth check."""

    def __init__(self, metrics: Metrics, auth: Auth, not_started: Callable[[], str | None] = lambda: None):
        self.metrics = metrics
        self.auth = auth
        self.not_started = not_started

    def check(self, method: str, metadata: Any) -> None:
        self.auth.check(method, metadata)
        if method.startswith(OPEN_PREFIXES):
            return
        if (reason := self.not_started()) is not None:
            raise errors.Unavailable(reason)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method
        metadata = details.invocation_metadata
        check = self.check
        watch = self._watch
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                async with watch(method, context):
                    check(method, metadata)
                    return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            inner_stream = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async with watch(method, context):
                    check(method, metadata)
                    async for item in inner_stream(request, context):
                        yield item

            return grpc.unary_stream_rpc_method_handler(
                stream, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream is not None:  # a coroutine that writes with context.write (health Watch)
            inner_writer = handler.unary_stream

            async def writer(request: Any, context: grpc.aio.ServicerContext) -> None:
                async with watch(method, context):
                    check(method, metadata)
                    await inner_writer(request, context)

            return grpc.unary_stream_rpc_method_handler(
                writer, handler.request_deserializer, handler.response_serializer
            )
        return handler  # client-streaming RPCs: none in our API

    def _watch(self, method: str, context: grpc.aio.ServicerContext) -> _Watch:
        return _Watch(self.metrics, method, context)


class _Watch:
    """Around one call: turns its error into a status code, records metrics and the access log."""

    def __init__(self, metrics: Metrics, method: str, context: grpc.aio.ServicerContext):
        self.metrics, self.method, self.context = metrics, method, context
        self.start = 0.0

    async def __aenter__(self) -> None:
        self.start = time.perf_counter()
        self.metrics.in_flight.labels(self.metrics.service).inc()

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        code = grpc.StatusCode.OK
        message = ""
        if isinstance(exc, errors.CAIError):
            code, message = status_of(exc), str(exc)
        elif isinstance(exc, asyncio.CancelledError):
            code = grpc.StatusCode.CANCELLED  # the caller cancelled or its deadline expired
        elif isinstance(exc, grpc.aio.AbortError):  # the handler aborted with its own status
            code = self.context.code() or grpc.StatusCode.UNKNOWN
        elif exc is not None:
            code, message = grpc.StatusCode.INTERNAL, "internal error; see the service's log"
            log.error("unhandled error in %s", self.method, exc_info=exc)
        self._record(code, message)
        if code not in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED) and exc is not None:
            await self.context.abort(code, message)  # raises: replaces the original exception
        return False

    def _record(self, code: grpc.StatusCode, message: str) -> None:
        m = self.metrics
        elapsed = time.perf_counter() - self.start
        name = self.method.rsplit("/", 1)[-1]
        m.in_flight.labels(m.service).dec()
        m.requests.labels(m.service, name, code.name).inc()
        m.latency.labels(m.service, name).observe(elapsed)
        fields = {"method": self.method, "code": code.name, "ms": round(elapsed * 1000, 2)}
        if message:
            fields["error"] = message
        # Probes arrive every few seconds: keep them out of the INFO log.
        level = logging.DEBUG if self.method.startswith(OPEN_PREFIXES) else logging.INFO
        log.log(level, "rpc", extra={"fields": fields})
