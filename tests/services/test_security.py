"""Bearer-token auth, TLS and mTLS on real servers (FakeBackend: the model plays no part), and
the same under abuse: every RPC of every service with missing, wrong, malformed and read-only
tokens, a client that trusts the wrong CA, a client certificate from a CA the server does not
trust; the right status each time, and no token in the logs or the error messages."""

from __future__ import annotations

import datetime
import logging
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cai.backends.fake import FakeBackend
from cai.errors import InvalidArgument
from cai.v1 import critique_pb2, judge_pb2, policy_pb2
from services.client import TLS, AsyncClient
from services.interceptor import READ_ONLY
from services.server import SERVICE_NAMES, start_service

CHAT = [{"role": "user", "content": "Hello"}]


def _write_pem(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> tuple[Path, Path]:
    key_path, cert_path = path.with_suffix(".key"), path.with_suffix(".pem")
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def _issue(name: str, issuer_key, issuer_name, key, ca: bool = False, san: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A throwaway CA with a server certificate for localhost and a client certificate."""
    root = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca_cert = _issue("test CA", ca_key, ca_name, ca_key, ca=True)
    _, ca_path = _write_pem(root / "ca", ca_key, ca_cert)
    files = {"ca": ca_path}
    for name in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        files[f"{name}_key"], files[f"{name}_cert"] = _write_pem(
            root / name, key, _issue(name, ca_key, ca_name, key, san=name == "server")
        )
    # Another CA, which the servers do not trust, with a client certificate of its own.
    other_key = ec.generate_private_key(ec.SECP256R1())
    other_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "other CA")])
    _, files["other_ca"] = _write_pem(
        root / "other-ca", other_key, _issue("other CA", other_key, other_name, other_key, ca=True)
    )
    key = ec.generate_private_key(ec.SECP256R1())
    files["other_client_key"], files["other_client_cert"] = _write_pem(
        root / "other-client", key, _issue("client", other_key, other_name, key)
    )
    return files


async def test_tokens_gate_rpcs_but_not_health(make_settings):
    service = await start_service(
        "policy", make_settings("policy", token="s3cret", read_token="look"), FakeBackend()
    )
    address = service.address
    try:
        for token, code in (
            (None, grpc.StatusCode.UNAUTHENTICATED),
            ("wrong", grpc.StatusCode.UNAUTHENTICATED),
        ):
            async with AsyncClient(address, token=token, retries=0) as client:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await client.generate(CHAT)
                assert info.value.code() == code and "authorization" in info.value.details()
                health = health_pb2_grpc.HealthStub(client.channel)  # probes need no token
                assert (
                    await health.Check(health_pb2.HealthCheckRequest())
                ).status == health_pb2.HealthCheckResponse.SERVING
        async with AsyncClient(address, token="look", retries=0) as client:
            assert (await client.info()).model_id == "fake"  # read-only RPC
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.generate(CHAT)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        async with AsyncClient(address, token="s3cret", retries=0) as client:
            assert (await client.generate(CHAT)).completions
    finally:
        await service.stop(0)


async def test_tls_and_mutual_tls(make_settings, pki):
    tls_only = make_settings("policy", tls_cert=pki["server_cert"], tls_key=pki["server_key"])
    mutual = make_settings(
        "policy", tls_cert=pki["server_cert"], tls_key=pki["server_key"], tls_client_ca=pki["ca"]
    )
    for settings, client_cert in ((tls_only, False), (mutual, True)):
        service = await start_service("policy", settings, FakeBackend())
        address = f"localhost:{service.port}"
        try:
            async with AsyncClient(address, retries=0, timeout=5) as plain:  # no TLS: the handshake fails
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await plain.generate(CHAT)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            if client_cert:  # mTLS: a client without a certificate is refused
                async with AsyncClient(address, tls=TLS(ca=pki["ca"]), retries=0, timeout=5) as anonymous:
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await anonymous.generate(CHAT)
                    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            tls = TLS(pki["ca"], pki["client_cert"], pki["client_key"]) if client_cert else TLS(pki["ca"])
            async with AsyncClient(address, tls=tls, retries=0, timeout=5) as client:
                assert (await client.generate(CHAT)).completions
        finally:
            await service.stop(0)


async def test_bad_tls_settings_are_named(make_settings):
    with pytest.raises(InvalidArgument, match="tls_cert, tls_key"):
        await start_service("policy", make_settings("policy", tls_cert="/nonexistent.pem"), FakeBackend())
    with pytest.raises(InvalidArgument, match="tls_key: cannot read"):
        settings = make_settings("policy", tls_cert="/nonexistent.pem", tls_key="/nonexistent.key")
        await start_service("policy", settings, FakeBackend())


TOKEN, READ_TOKEN = "full-token-7f3a9c", "read-token-2b8e41"
SERVICES = {
    "policy": policy_pb2.DESCRIPTOR.services_by_name["PolicyService"],
    "critique": critique_pb2.DESCRIPTOR.services_by_name["CritiqueService"],
    "judge": judge_pb2.DESCRIPTOR.services_by_name["JudgeService"],
}


async def _call(channel: grpc.aio.Channel, method, request, metadata) -> grpc.StatusCode:
    path = f"/{method.containing_service.full_name}/{method.name}"
    response = GetMessageClass(method.output_type)
    serialize = type(request).SerializeToString
    try:
        if method.server_streaming:
            call = channel.unary_stream(path, serialize, response.FromString)(
                request, metadata=metadata, timeout=10
            )
            async for _ in call:
                pass
        else:
            await channel.unary_unary(path, serialize, response.FromString)(
                request, metadata=metadata, timeout=10
            )
    except grpc.aio.AioRpcError as exc:
        assert TOKEN not in (exc.details() or "") and READ_TOKEN not in (exc.details() or "")
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            assert "authorization" in (exc.details() or "")
        return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("name", list(SERVICES))
async def test_every_rpc_refuses_bad_tokens_with_the_right_status_and_logs_no_token(
    make_settings, caplog, name
):
    from tests.reliability.test_fuzz_rpc import VALID

    extra = {"max_prompt_tokens": 4096} if name == "policy" else {}
    settings = make_settings(name, token=TOKEN, read_token=READ_TOKEN, **extra)
    service = await start_service(name, settings, FakeBackend())
    refused = grpc.StatusCode.UNAUTHENTICATED
    cases = [
        ("no token", (), refused),
        ("wrong token", (("authorization", f"Bearer {TOKEN}x"),), refused),
        ("token prefix", (("authorization", f"Bearer {TOKEN[:-1]}"),), refused),
        ("empty bearer", (("authorization", "Bearer "),), refused),
        ("no scheme", (("authorization", TOKEN),), refused),
        ("basic scheme", (("authorization", f"Basic {TOKEN}"),), refused),
        ("other header", (("x-api-key", TOKEN),), refused),
    ]
    try:
        with caplog.at_level(logging.DEBUG):
            async with grpc.aio.insecure_channel(service.address) as channel:
                for method in SERVICES[name].methods:
                    request = VALID[method.name]
                    path = f"/{method.containing_service.full_name}/{method.name}"
                    for what, metadata, expected in cases:
                        got = await _call(channel, method, request, metadata)
                        assert got == expected, f"{method.name} with {what}: {got.name}"
                    read_only = await _call(
                        channel, method, request, (("authorization", f"Bearer {READ_TOKEN}"),)
                    )
                    want = grpc.StatusCode.OK if path in READ_ONLY else grpc.StatusCode.PERMISSION_DENIED
                    assert read_only == want, f"{method.name} with the read-only token: {read_only.name}"
                    full = await _call(channel, method, request, (("authorization", f"bearer {TOKEN}"),))
                    assert full == grpc.StatusCode.OK, f"{method.name} with the token: {full.name}"
                health = health_pb2_grpc.HealthStub(channel)
                reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAMES[name]))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await service.stop(0)
    logged = caplog.text + "".join(str(getattr(r, "fields", "")) for r in caplog.records)
    assert "UNAUTHENTICATED" in logged and "PERMISSION_DENIED" in logged  # the refusals are logged ...
    assert TOKEN[:8] not in logged and READ_TOKEN[:8] not in logged  # ... without the tokens


async def test_a_client_trusting_another_ca_or_showing_a_foreign_certificate_is_refused(make_settings, pki):
    mutual = make_settings(
        "policy", tls_cert=pki["server_cert"], tls_key=pki["server_key"], tls_client_ca=pki["ca"]
    )
    service = await start_service("policy", mutual, FakeBackend())
    address = f"localhost:{service.port}"
    wrong_ca = TLS(pki["other_ca"], pki["client_cert"], pki["client_key"])  # does not trust the server
    foreign = TLS(
        pki["ca"], pki["other_client_cert"], pki["other_client_key"]
    )  # the server does not trust it
    try:
        for tls in (wrong_ca, foreign):
            async with AsyncClient(address, tls=tls, retries=0, timeout=5) as client:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await client.generate(CHAT)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        good = TLS(pki["ca"], pki["client_cert"], pki["client_key"])
        async with AsyncClient(address, tls=good, retries=0, timeout=5) as client:  # still serving
            assert (await client.generate(CHAT)).completions
    finally:
        await service.stop(0)
