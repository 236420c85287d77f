"""Operations: gRPC TLS and mTLS (TLS_CERT_PATH, TLS_KEY_PATH, TLS_CLIENT_CA_CERT_PATH) and their start-up errors.

Certificates are made at test time with `cryptography`: a CA, a server
certificate for 127.0.0.1/localhost, a client certificate from that CA and
one from another CA.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.gateway.pb import generation_pb2 as pb
from services.gateway.pb import generation_pb2_grpc
from tests.pipeline import Pipeline, free_port

pytestmark = pytest.mark.e2e

REQUEST = pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text="Hello")],
                                      params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=3)))


@dataclass
class Pair:
    cert: Path
    key: Path

    @property
    def cert_pem(self) -> bytes:
        return self.cert.read_bytes()

    @property
    def key_pem(self) -> bytes:
        return self.key.read_bytes()


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(folder: Path, stem: str, cn: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
           *, ca: bool = False, server: bool = False) -> tuple[Pair, x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer_cert.subject if issuer_cert else _name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    pair = Pair(folder / f"{stem}.crt", folder / f"{stem}.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pair.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return pair, cert, key


@dataclass
class Pki:
    ca: Pair
    server: Pair
    client: Pair
    other_ca: Pair
    stranger: Pair  # a client certificate signed by the other CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, ca_cert, ca_key = _issue(folder, "ca", "test CA", None, ca=True)
    server, _, _ = _issue(folder, "server", "localhost", (ca_cert, ca_key), server=True)
    client, _, _ = _issue(folder, "client", "good client", (ca_cert, ca_key))
    other_ca, other_cert, other_key = _issue(folder, "other-ca", "other CA", None, ca=True)
    stranger, _, _ = _issue(folder, "stranger", "stranger", (other_cert, other_key))
    return Pki(ca, server, client, other_ca, stranger)


@pytest.fixture(scope="module")
def tls_pipeline(tiny_model_path, tmp_path_factory, pki):
    p = Pipeline(tiny_model_path, tmp_path_factory.mktemp("ops-tls"), "--max-sequence-length", "256",
                 "--num-tokenizers", "1", "--tls-cert-path", str(pki.server.cert),
                 "--tls-key-path", str(pki.server.key)).start()
    yield p
    assert p.stop() == 0, p.logs()


@pytest.fixture(scope="module")
def mtls_pipeline(tiny_model_path, tmp_path_factory, pki):
    # The env var names, as a deployment would set them.
    p = Pipeline(tiny_model_path, tmp_path_factory.mktemp("ops-mtls"), "--max-sequence-length", "256",
                 "--num-tokenizers", "1", env={"TLS_CERT_PATH": str(pki.server.cert),
                                               "TLS_KEY_PATH": str(pki.server.key),
                                               "TLS_CLIENT_CA_CERT_PATH": str(pki.ca.cert)}).start()
    yield p
    assert p.stop() == 0, p.logs()


def call(channel: grpc.Channel) -> pb.BatchedGenerationResponse:
    return generation_pb2_grpc.GenerationServiceStub(channel).Generate(REQUEST, timeout=20)


def secure(p: Pipeline, pki: Pki, client: Pair | None = None, root: Pair | None = None) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=(root or pki.ca).cert_pem,
        private_key=client.key_pem if client else None,
        certificate_chain=client.cert_pem if client else None,
    )
    return grpc.secure_channel(p.address, creds)


def refused(channel_factory) -> grpc.StatusCode:
    with channel_factory() as channel, pytest.raises(grpc.RpcError) as info:
        call(channel)
    return info.value.code()


def test_tls_serves_and_refuses_plaintext(tls_pipeline, pki):
    with secure(tls_pipeline, pki) as channel:
        response = call(channel).responses[0]
    assert response.generated_token_count == 3
    # Also by host name (the certificate names localhost too).
    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert_pem)
    with grpc.secure_channel(f"localhost:{tls_pipeline.grpc_port}", creds) as channel:
        assert call(channel).responses[0].text == response.text
    assert refused(lambda: grpc.insecure_channel(tls_pipeline.address)) == grpc.StatusCode.UNAVAILABLE
    # A client that does not trust the server's CA does not connect either.
    assert refused(lambda: secure(tls_pipeline, pki, root=pki.other_ca)) == grpc.StatusCode.UNAVAILABLE
    assert tls_pipeline.health()[0] == 200  # /health and /metrics stay plain HTTP


def test_mtls_requires_a_client_certificate_from_the_ca(mtls_pipeline, pki):
    with secure(mtls_pipeline, pki, client=pki.client) as channel:
        assert call(channel).responses[0].generated_token_count == 3
    assert refused(lambda: secure(mtls_pipeline, pki)) == grpc.StatusCode.UNAVAILABLE
    assert refused(lambda: secure(mtls_pipeline, pki, client=pki.stranger)) == grpc.StatusCode.UNAVAILABLE
    assert refused(lambda: grpc.insecure_channel(mtls_pipeline.address)) == grpc.StatusCode.UNAVAILABLE
    # Refused clients do not hurt the server.
    with secure(mtls_pipeline, pki, client=pki.client) as channel:
        assert call(channel).responses[0].generated_token_count == 3


def run_launcher(model: Path, tmp: Path, *args: str, env: dict[str, str] | None = None):
    argv = [sys.executable, "-m", "services.launcher", "--model-name", str(model), "--port", str(free_port()),
            "--grpc-port", str(free_port()), "--ipc-dir", str(tmp / "ipc"), *args]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TLS_")}
    return subprocess.run(argv, env={**environ, **(env or {})}, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("settings", "message"), [
    ({"TLS_CERT_PATH": "cert"}, "tls: must provide both cert and key"),
    ({"TLS_KEY_PATH": "key"}, "tls: must provide both cert and key"),
    ({"TLS_CLIENT_CA_CERT_PATH": "ca"}, "tls: cannot provide client ca cert without keypair"),
])
def test_half_given_tls_settings_stop_the_launcher(tiny_model_path, tmp_path, pki, settings, message):
    paths = {"cert": str(pki.server.cert), "key": str(pki.server.key), "ca": str(pki.ca.cert)}
    env = {name: paths[value] for name, value in settings.items()}
    result = run_launcher(tiny_model_path, tmp_path, env=env)
    assert result.returncode != 0
    assert message in result.stderr + result.stdout


@pytest.mark.parametrize(("settings", "message"), [
    ({"TLS_KEY_PATH": "key"}, "tls: must provide both cert and key"),
    ({"TLS_CLIENT_CA_CERT_PATH": "ca"}, "tls: cannot provide client ca cert without keypair"),
])
def test_half_given_tls_settings_stop_the_gateway_alone(tmp_path, pki, settings, message):
    paths = {"cert": str(pki.server.cert), "key": str(pki.server.key), "ca": str(pki.ca.cert)}
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TLS_")}
    env = {**environ, **{name: paths[value] for name, value in settings.items()},
           "TOKENIZER_ENDPOINT": f"ipc://{tmp_path}/t.sock", "SCHEDULER_ENDPOINT": f"ipc://{tmp_path}/s.sock"}
    result = subprocess.run([sys.executable, "-m", "services.gateway.main"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert "ERROR gateway" in result.stderr and message in result.stderr


@pytest.mark.parametrize(("files", "message"), [
    (("missing", "server", None), "No such file or directory"),
    (("server", "client", None), "the key does not match the certificate"),  # issue 11: found only after loading
    (("server", "server", "missing"), "tls: cannot read client ca cert"),
])
def test_unusable_tls_files_stop_the_launcher_before_any_model_loads(tiny_model_path, tmp_path, pki, files, message):
    cert, key, ca = (None if name is None else tmp_path / "missing.pem" if name == "missing" else getattr(pki, name)
                     for name in files)
    args = ["--tls-cert-path", str(getattr(cert, "cert", cert)), "--tls-key-path", str(getattr(key, "key", key))]
    if ca is not None:
        args += ["--tls-client-ca-cert-path", str(ca)]
    result = run_launcher(tiny_model_path, tmp_path, *args)
    output = result.stderr + result.stdout
    assert result.returncode == 1
    assert message in output and "started" not in output  # no service (and no model) was started
