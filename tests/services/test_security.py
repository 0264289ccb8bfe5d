"""Bearer-token auth, TLS and mTLS on real servers (FakeBackend: the model plays no part)."""

from __future__ import annotations

import datetime
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cai.backends.fake import FakeBackend
from cai.errors import InvalidArgument
from services.client import TLS, AsyncClient
from services.server import start_service

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
