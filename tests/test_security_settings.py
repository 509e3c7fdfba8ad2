"""Security basics: Kafka SSL/SASL settings reach every client (kafka-python producers, consumers and admin;
the worker's faust app and its own aiokafka consumers), an unknown protocol is a clear error, the SASL password
never shows in repr, redacted settings, debug pages or logs, and the debug HTTP server listens on loopback and
refuses every method but GET.

Configuration is tested by parsing (environment → Settings → client config / faust credentials): there is no
SSL or SASL broker here. The HTTP and log checks use a real worker on the session's broker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import replace
from pathlib import Path

import faust
import pytest
from aiokafka.errors import KafkaConnectionError
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

from conftest import free_port
from pymk.processes import start_worker_process, stop_process
from pymk.settings import Settings
from pymk.streams.app import PymkApp, faust_credentials
from pymk.streams.global_index import GlobalIndex
from pymk.streams.globals import UserGlobals
from pymk.streams.producer import make_producer
from workers import http_get, running_worker, wait_until

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SECRET = "pw-" + uuid.uuid4().hex  # unique, so finding it anywhere means it leaked from these settings


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A throwaway CA and a client certificate signed by it (EC keys: fast to make)."""
    folder = tmp_path_factory.mktemp("tls")
    files = {name: folder / name for name in ("ca.pem", "ca.key", "client.pem", "client.key", "client.csr")}
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", *ec, "-keyout", str(files["ca.key"]), "-out", str(files["ca.pem"]), "-days", "2",
            "-subj", "/CN=pymk-test-ca")
    openssl("req", *ec, "-keyout", str(files["client.key"]), "-out", str(files["client.csr"]),
            "-subj", "/CN=pymk-test-client")
    openssl("x509", "-req", "-in", str(files["client.csr"]), "-CA", str(files["ca.pem"]), "-CAkey",
            str(files["ca.key"]), "-CAcreateserial", "-out", str(files["client.pem"]), "-days", "2")
    return files


def environment(protocol: str, tls: dict[str, Path], **extra: str) -> dict[str, str]:
    """What an operator sets: the protocol and, whatever the protocol, every credential (unused ones ignored)."""
    return {"PYMK_SECURITY_PROTOCOL": protocol, "PYMK_SASL_MECHANISM": "SCRAM-SHA-256",
            "PYMK_SASL_USERNAME": "pymk-user", "PYMK_SASL_PASSWORD": SECRET,
            "PYMK_SSL_CAFILE": str(tls["ca.pem"]), "PYMK_SSL_CERTFILE": str(tls["client.pem"]),
            "PYMK_SSL_KEYFILE": str(tls["client.key"]),
            # nothing listens here: the client must fail on the connection, not on its configuration
            "PYMK_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}", **extra}


# ---- configuration: environment → Settings → clients ----------------------------------------------------------------

@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_kafka_python_client_config_follows_the_protocol(protocol: str, tls_files: dict[str, Path]) -> None:
    settings = Settings.from_env(environment(protocol, tls_files))
    config = settings.kafka_client_config()
    assert config["security_protocol"] == protocol
    assert config["bootstrap_servers"] == settings.bootstrap_servers
    sasl = {"sasl_mechanism": "SCRAM-SHA-256", "sasl_plain_username": "pymk-user", "sasl_plain_password": SECRET}
    files = {"ssl_cafile": str(tls_files["ca.pem"]), "ssl_certfile": str(tls_files["client.pem"]),
             "ssl_keyfile": str(tls_files["client.key"])}
    assert {k: config.get(k) for k in sasl} == (sasl if protocol.startswith("SASL") else dict.fromkeys(sasl))
    assert {k: config.get(k) for k in files} == (files if protocol.endswith("SSL") else dict.fromkeys(files))
    # every key is an option of kafka-python's producer, consumer and admin client (unknown ones are errors)
    for client in (KafkaProducer, KafkaConsumer, KafkaAdminClient):
        assert set(config) <= set(client.DEFAULT_CONFIG), (client.__name__, set(config) - set(client.DEFAULT_CONFIG))
    # pymk's own producer factory builds a client from it (api_version given: no broker needed to build one)
    producer = make_producer(settings, api_version=(2, 8))
    assert producer.config["security_protocol"] == protocol
    assert producer.config["sasl_plain_password"] == (SECRET if protocol.startswith("SASL") else None)
    producer.close(timeout=0)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_faust_credentials_follow_the_protocol(protocol: str, tls_files: dict[str, Path], tmp_path: Path) -> None:
    settings = Settings.from_env(environment(protocol, tls_files), home=tmp_path, recommend=False)
    credentials = faust_credentials(settings)
    if protocol == "PLAINTEXT":
        assert credentials is None
    elif protocol == "SSL":
        assert isinstance(credentials, faust.SSLCredentials)
    else:
        assert isinstance(credentials, faust.SASLCredentials)
        assert (credentials.username, credentials.password) == ("pymk-user", SECRET)
        assert credentials.mechanism.value == "SCRAM-SHA-256"
    context = getattr(credentials, "context", None) or getattr(credentials, "ssl_context", None)
    if protocol.endswith("SSL"):
        assert isinstance(context, ssl.SSLContext) and context.verify_mode == ssl.CERT_REQUIRED
        issuers = [dict(pair[0] for pair in cert["subject"])["commonName"] for cert in context.get_ca_certs()]
        assert "pymk-test-ca" in issuers  # the configured CA file is the trust anchor
    else:
        assert context is None
    # the worker's faust app is built with exactly these credentials
    app = PymkApp(settings).app
    built = app.conf.broker_credentials
    assert type(built) is type(credentials)
    if credentials is not None and protocol.startswith("SASL"):
        assert (built.username, built.password, built.mechanism) == ("pymk-user", SECRET, credentials.mechanism)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("reader", ["user-globals", "embeddings index"])
def test_worker_aiokafka_consumers_accept_the_security_config(protocol: str, reader: str,
                                                              tls_files: dict[str, Path], tmp_path: Path) -> None:
    """The worker's own aiokafka consumers (the user-globals table, the embeddings of the ANN index) must get as
    far as connecting: failing to reach the (absent) broker is expected; a TypeError/ValueError about their
    configuration is not (it would stop the worker on an SSL cluster)."""
    settings = Settings.from_env(environment(protocol, tls_files))
    table = UserGlobals(settings) if reader == "user-globals" else GlobalIndex(settings, tmp_path / "index")

    async def run() -> None:
        await asyncio.wait_for(table.run(), timeout=5)

    try:
        asyncio.run(run())
    except (KafkaConnectionError, TimeoutError):
        pass  # it tried the network: the configuration was accepted
    except (TypeError, ValueError) as exc:
        pytest.fail(f"{protocol}: the worker's {reader} consumer rejects pymk's client config: {exc!r}")


@pytest.mark.parametrize("protocol", ["CARRIER_PIGEON", "TLS", "SASL", ""])
def test_an_unknown_protocol_is_a_clear_error(protocol: str) -> None:
    # the worker (faust) refuses it, whether parsing the environment or building the credentials says so
    with pytest.raises(ValueError, match="(?i)security.protocol"):
        faust_credentials(Settings.from_env({"PYMK_SECURITY_PROTOCOL": protocol}))
    # producers, consumers and the admin client must refuse it too (kafka-python accepts any string and fails
    # later, on the first connection, with an unrelated message)
    with pytest.raises(ValueError, match="(?i)security.protocol"):
        Settings.from_env({"PYMK_SECURITY_PROTOCOL": protocol}).kafka_client_config()


def test_protocol_names_mean_the_same_to_every_client(tls_files: dict[str, Path]) -> None:
    """``sasl_ssl`` must either be refused or mean SASL_SSL to faust and to kafka-python alike; the worker
    authenticating while its producers and the lag reader silently don't is the failure."""
    settings = Settings.from_env(environment("sasl_ssl", tls_files))
    try:
        config = settings.kafka_client_config()
    except ValueError:
        with pytest.raises(ValueError):
            faust_credentials(settings)
        return
    assert isinstance(faust_credentials(settings), faust.SASLCredentials)
    assert config["security_protocol"] == "SASL_SSL" and config.get("sasl_plain_password") == SECRET


# ---- no secrets in repr, redacted settings, command lines, debug pages or logs ------------------------------------

def test_password_is_never_shown(tls_files: dict[str, Path]) -> None:
    settings = Settings.from_env(environment("SASL_SSL", tls_files))
    assert settings.sasl_password == SECRET
    for shown in (repr(settings), str(settings), f"{settings!r}", json.dumps(settings.redacted())):
        assert SECRET not in shown
    assert settings.redacted()["sasl_password"] == "***"
    assert settings.redacted()["sasl_username"] == "pymk-user"  # only the secret is masked
    assert Settings().redacted()["sasl_password"] == ""  # an unset password does not pretend to be set
    secret_fields = [f.name for f in dataclasses.fields(Settings) if not f.repr]
    assert secret_fields == ["sasl_password"]


PAGES = ["/health", "/metrics", "/stats", "/memory", "/users/1", "/users/1/candidates", "/features/1/2",
         "/recommendations/1", "/neighbours/1", "/", "/router/", "/table/", "/stats/", "/assignment/", "/graph/",
         "/no-such-page"]


def request(settings: Settings, method: str, path: str) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://{settings.web_host}:{settings.web_port}{path}", method=method,
                                 data=b'{"user": 1}' if method in ("POST", "PUT", "PATCH") else None)
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp*) in LISTEN state on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if int(hex_port, 16) == port and state == "0A":
                found.add(address)
    return found


def non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_workers_serve_read_only_on_loopback_and_never_show_the_password(kafka_settings: Settings,
                                                                         tmp_path: Path) -> None:
    """Two real workers with the password set. One speaks SASL to the PLAINTEXT test broker: it cannot
    authenticate, and whatever it logs while it tries and gives up (kafka-python's bootstrap timeout, 30 s), the
    password is not in it. The other is PLAINTEXT (credentials set but unused), so it runs: its debug HTTP
    listens on 127.0.0.1 only, answers GET, refuses every other method, and shows the password nowhere."""
    assert Settings().web_host == "127.0.0.1" and Settings.from_env({}).web_host == "127.0.0.1"
    sasl = replace(kafka_settings, recommend=False, security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN",
                   sasl_username="pymk-user", sasl_password=SECRET, web_port=free_port(), app_id="sasl-worker")
    sasl_log = tmp_path / "sasl-worker.log"
    sasl_worker = start_worker_process(sasl, sasl_log)  # started first: it takes a while to give up
    try:
        assert SECRET.encode() not in Path(f"/proc/{sasl_worker.pid}/cmdline").read_bytes()
        check_read_only_loopback_server(replace(kafka_settings, recommend=False, sasl_username="pymk-user",
                                                sasl_password=SECRET), tmp_path / "worker.log")
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline and sasl_worker.poll() is None:
            time.sleep(0.5)
    finally:
        stop_process(sasl_worker, grace_s=10)
    text = sasl_log.read_text(errors="replace")
    assert text.strip(), "the SASL worker logged nothing: the check below would prove nothing"
    assert SECRET not in text


def check_read_only_loopback_server(settings: Settings, log: Path) -> None:
    with running_worker(settings, log) as worker:
        wait_until(lambda: len(http_get(settings, "/health")["partitions"]) == settings.partitions, 60,
                   what="every partition assigned")
        assert listening_addresses(settings.web_port) == {"0100007F"}, "the debug server must listen on 127.0.0.1 only"
        outside = non_loopback_address()
        if outside is not None:
            with pytest.raises(OSError):
                socket.create_connection((outside, settings.web_port), timeout=2).close()
        assert SECRET.encode() not in Path(f"/proc/{worker.pid}/cmdline").read_bytes()

        # a retryable 503 until the worker knows it has read all its partitions' input (then: 404, unknown user)
        wait_until(lambda: request(settings, "GET", "/features/1/2")[0] == 404, 60, what="the input read")
        served = {path: request(settings, "GET", path) for path in PAGES}
        assert served["/health"][0] == 200
        assert served["/features/1/2"][0] == 404 and b"unknown" in served["/features/1/2"][1]  # no event named 1
        memory = json.loads(served["/memory"][1])  # allocation sites only when the worker was started tracing
        assert memory["rss_bytes"] > 0 and memory["tracing"] is False and "top" not in memory
        for path, (status, body) in served.items():
            assert status < 500, (path, status)
            assert SECRET.encode() not in body, f"GET {path} shows the password"
        for path, (get_status, get_body) in served.items():
            routed = get_status != 404 or b'"user"' in get_body  # a page's own 404 for an unknown user
            for method in ("POST", "PUT", "DELETE", "PATCH"):
                status, body = request(settings, method, path)
                assert status == (405 if routed else 404), (method, path, status, body[:200])
        assert request(settings, "GET", "/health")[0] == 200  # still serving
        assert worker.poll() is None
    assert SECRET not in log.read_text(errors="replace")
