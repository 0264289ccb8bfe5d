"""Builds and runs one service: grpc.aio server, health, reflection, metrics, TLS, graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cai import constitution as constitutions
from cai.backends.base import Backend
from cai.engine import CAIEngine
from cai.errors import InvalidArgument, Unavailable
from cai.kafka.stream import StreamStage
from cai.v1 import critique_pb2, critique_pb2_grpc, judge_pb2, judge_pb2_grpc, policy_pb2, policy_pb2_grpc
from services.backends import make_backend, readiness
from services.critique import CritiqueServicer
from services.dataplane import CritiquePlane, JudgePlane, Limits, PolicyPlane
from services.interceptor import Auth, ServiceInterceptor
from services.judge import JudgeServicer
from services.observability import MeteredBackend, Metrics
from services.policy import PolicyServicer
from services.processors import stream_stage
from services.settings import CritiqueSettings, JudgeSettings, PolicySettings, ServiceName, ServiceSettings

log = logging.getLogger("cai.server")

SERVICE_NAMES = {
    "policy": policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name,
    "critique": critique_pb2.DESCRIPTOR.services_by_name["CritiqueService"].full_name,
    "judge": judge_pb2.DESCRIPTOR.services_by_name["JudgeService"].full_name,
}


class Readiness:
    """Keeps the health status true. The service's own name (`cai.v1.CritiqueService`, ...) is
    readiness: SERVING only while its backend has started (loaded, or connected to its server)
    and can answer now, so a remote backend that is down sends load balancers elsewhere until it
    answers again. The whole server's status ("") is liveness: SERVING while the process serves,
    so a dead backend does not get a healthy front end restarted. Checked every `interval_s`
    seconds; on drain both are NOT_SERVING for good."""

    def __init__(
        self,
        health_servicer: health.aio.HealthServicer,
        name: ServiceName,
        backend: Backend,
        interval_s: float,
    ):
        self.health = health_servicer
        self.name = name
        self.backend = backend
        self.interval_s = interval_s
        self.started = False
        self.reason: str | None = "starting"  # why not ready; None when ready
        self.draining = False
        self._status: int | None = None  # the status last set
        self._task: asyncio.Task[None] | None = None

    def not_started(self) -> str | None:
        """Why calls cannot be served yet, before the backend has started; else None."""
        if self.started:
            return None
        return f"{self.name} service: its backend has not started ({self.reason})"

    async def check(self) -> None:
        """Start the backend if it has not started (an unreachable server is retried on the next
        check; any other error is raised), then ask whether it can answer, and set the status."""
        reason: str | None
        if not self.started:
            try:
                await self.backend.start()
                self.started = True
            except Unavailable as exc:
                reason = str(exc)
        if self.started:
            reason = await readiness(self.backend, self.interval_s)
        await self._set(reason)

    async def _set(self, reason: str | None) -> None:
        if self.draining:
            return
        self.reason = reason
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if reason is None
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        if status == self._status:
            return
        self._status = status  # set, and logged, on each change only
        await self.health.set(SERVICE_NAMES[self.name], status)
        fields = {"service": self.name, "status": health_pb2.HealthCheckResponse.ServingStatus.Name(status)}
        if reason is not None:
            log.warning("not ready", extra={"fields": {**fields, "reason": reason}})
        else:
            log.info("ready", extra={"fields": fields})

    def watch(self) -> None:
        """Check again every `interval_s` seconds, in the background, until `close`."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(self.interval_s)
                try:
                    await self.check()
                except Exception as exc:  # a backend that fails to start for good: say so, stay down
                    await self._set(f"backend failed to start: {exc}")

        self._task = asyncio.ensure_future(loop())

    async def drain(self) -> None:
        """NOT_SERVING from now on, whatever the backend does."""
        self.draining = True
        await self.health.enter_graceful_shutdown()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


@dataclass
class RunningService:
    name: ServiceName
    server: grpc.aio.Server
    readiness: Readiness
    backend: Backend
    port: int
    metrics: Metrics
    grace_s: float
    plane: PolicyPlane | CritiquePlane | JudgePlane
    owns_backend: bool = True  # False: the caller passed the backend in, and closes it

    @property
    def metrics_port(self) -> int:
        assert self.metrics.port is not None
        return self.metrics.port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stream(self, settings: ServiceSettings) -> StreamStage:
        """This service's stream stage on the topics `settings` name."""
        return stream_stage(self.plane, self.name, settings, self.metrics.stream)

    async def stop_serving(self) -> None:
        """Report NOT_SERVING from now on while still answering calls: the start of a drain."""
        await self.readiness.drain()

    async def stop(self, grace_s: float | None = None) -> None:
        """Report NOT_SERVING, refuse new calls, give in-flight calls the grace period, then close."""
        await self.readiness.drain()
        await self.readiness.close()
        await self.server.stop(self.grace_s if grace_s is None else grace_s)
        if self.owns_backend:
            await self.backend.close()


def _read(path: object, what: str) -> bytes:
    try:
        return open(str(path), "rb").read()
    except OSError as exc:
        raise InvalidArgument(f"{what}: cannot read {path}: {exc.strerror}") from None


def _credentials(settings: ServiceSettings) -> grpc.ServerCredentials | None:
    if settings.tls_cert is None and settings.tls_key is None:
        if settings.tls_client_ca is not None:
            raise InvalidArgument("tls_client_ca: mTLS needs tls_cert and tls_key as well")
        return None
    if settings.tls_cert is None or settings.tls_key is None:
        raise InvalidArgument("tls_cert, tls_key: give both to enable TLS")
    pair = [(_read(settings.tls_key, "tls_key"), _read(settings.tls_cert, "tls_cert"))]
    if settings.tls_client_ca is None:
        return grpc.ssl_server_credentials(pair)
    ca = _read(settings.tls_client_ca, "tls_client_ca")
    return grpc.ssl_server_credentials(pair, root_certificates=ca, require_client_auth=True)


async def start_service(
    name: ServiceName, settings: ServiceSettings, backend: Backend | None = None
) -> RunningService:
    """Start one service; `backend` replaces the one `settings.backend` names (tests, shared models)
    and stays open when the service stops."""
    credentials = _credentials(settings)
    if name == "policy" and settings.backend.startswith("policy:") and backend is None:
        raise InvalidArgument("backend: the policy service cannot use another policy service as its backend")
    metrics = Metrics(name)
    owned = backend is None
    backend = MeteredBackend(backend or make_backend(settings.backend, settings), metrics)
    limits = Limits.of(settings)
    health_servicer = health.aio.HealthServicer()
    ready = Readiness(health_servicer, name, backend, settings.health_interval_s)
    server = grpc.aio.server(
        interceptors=[
            ServiceInterceptor(
                metrics,
                Auth(
                    settings.token.get_secret_value() if settings.token else None,
                    settings.read_token.get_secret_value() if settings.read_token else None,
                ),
                ready.not_started,
            )
        ],
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a port already in use is an error, not silently shared
        ],
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,  # bounds the memory calls hold
    )
    plane: PolicyPlane | CritiquePlane | JudgePlane
    if isinstance(settings, PolicySettings):
        plane = PolicyPlane(backend, limits, metrics.count_operation)
        policy_pb2_grpc.add_PolicyServiceServicer_to_server(PolicyServicer(plane), server)
    elif isinstance(settings, CritiqueSettings):
        plane = CritiquePlane(
            CAIEngine(backend, constitutions.load(settings.constitution)), limits, metrics.count_operation
        )
        critique_pb2_grpc.add_CritiqueServiceServicer_to_server(CritiqueServicer(plane), server)
    else:
        assert isinstance(settings, JudgeSettings)
        plane = JudgePlane(
            CAIEngine(backend, constitutions.load(settings.constitution)), limits, metrics.count_operation
        )
        judge_pb2_grpc.add_JudgeServiceServicer_to_server(JudgeServicer(plane), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [
            SERVICE_NAMES[name],
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    address = f"{settings.host}:{settings.port}"
    try:
        port = (
            server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
        )
    except RuntimeError as exc:
        raise InvalidArgument(f"port: cannot listen on {address}: {exc}") from None
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)  # liveness: the process
    await health_servicer.set(SERVICE_NAMES[name], health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    try:
        metrics_port = metrics.serve(settings.host, settings.metrics_port)
        # Starts the backend; a remote one that cannot be reached yet leaves the service up and
        # NOT_SERVING, and is retried on every check.
        await ready.check()
    except OSError as exc:
        await server.stop(0)
        raise InvalidArgument(
            f"metrics_port: cannot listen on {settings.host}:{settings.metrics_port}: {exc}"
        ) from None
    except BaseException:
        await server.stop(0)
        raise
    ready.watch()
    log.info(
        "serving",
        extra={
            "fields": {
                "service": name,
                "address": address.rsplit(":", 1)[0] + f":{port}",
                "metrics_port": metrics_port,
                "backend": backend.kind,
                "model_id": backend.model_id,
                "tls": credentials is not None,
                "auth": bool(settings.token or settings.read_token),
                "ready": ready.reason is None,
            }
        },
    )
    return RunningService(
        name, server, ready, backend, port, metrics, settings.grace_s, plane, owns_backend=owned
    )


async def serve(name: ServiceName, settings: ServiceSettings) -> None:
    """Run until SIGTERM or SIGINT (with `settings.kafka`, the stream stage too), then shut down
    gracefully: the service reports NOT_SERVING at once and keeps answering for `drain_s` seconds
    (load balancers and clients move away meanwhile) while the stream drains and commits; then it
    refuses new calls and gives the ones in flight `grace_s` seconds to finish."""
    service = await start_service(name, settings)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(stopping.wait())]
    stream = None
    if settings.kafka:
        caught_up = None
        if isinstance(settings, PolicySettings) and settings.follow_policy_versions:
            from services.policy_updates import PolicyFollower

            topic = settings.kafka_prefix + "policy-versions"
            follower = PolicyFollower(
                service.backend,
                settings.kafka,
                topic,
                settings.adapter_dir,
                on_load=service.metrics.count_policy_load,
            )
            waits.append(asyncio.ensure_future(follower.run(stopping)))
            caught_up = follower.caught_up
        stream = asyncio.ensure_future(_stream_when_started(service, settings, stopping, caught_up))
        waits.append(stream)
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    drain_until = loop.time() + settings.drain_s
    await service.stop_serving()
    log.info(
        "shutting down",
        extra={"fields": {"service": name, "drain_s": settings.drain_s, "grace_s": settings.grace_s}},
    )
    stopping.set()
    try:
        if stream is not None:
            await stream  # re-raises why the stream stopped, after the server below is down
        await asyncio.sleep(max(0.0, drain_until - loop.time()))
    finally:
        await service.stop()
        log.info("stopped", extra={"fields": {"service": name}})


async def _stream_when_started(
    service: RunningService,
    settings: ServiceSettings,
    stopping: asyncio.Event,
    caught_up: asyncio.Event | None = None,
) -> None:
    """The stream stage, once the backend has started: records are not taken while it cannot
    answer them (and, for a policy-service backend, before its model id is known), nor, when the
    service follows policy versions, before it has tried the newest one already published (its
    rollouts would carry an older version and be dropped as stale)."""
    while service.readiness.not_started() is not None or (caught_up is not None and not caught_up.is_set()):
        if stopping.is_set():
            return
        await asyncio.sleep(min(service.readiness.interval_s, 0.5))
    await service.stream(settings).run(stopping)
