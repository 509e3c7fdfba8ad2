"""A real Apache Kafka broker for development, tests and the demo, with no Docker.

The broker's jars come from Maven Central through ``mvn`` (``org.apache.kafka:kafka_2.13`` and its runtime
dependencies plus a log4j2 backend), resolved once into ``settings.kafka_cache_dir``. The broker runs as a
single KRaft node that is both broker and controller, on 127.0.0.1, with its data, log and pid file under
``settings.broker_dir``.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from pymk.settings import Settings

LOG4J_VERSION = "2.25.3"
SLF4J_VERSION = "2.0.17"

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>pymk</groupId><artifactId>pymk-kafka-broker</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>{kafka}</version>
    </dependency>
    {logging}
  </dependencies>
</project>
"""
# Kafka 4 logs through log4j2 (via slf4j 2); Kafka 3 through reload4j.
_DEPENDENCY = "<dependency><groupId>{}</groupId><artifactId>{}</artifactId><version>{}</version></dependency>"
_LOGGING_4 = "\n    ".join([
    _DEPENDENCY.format("org.apache.logging.log4j", "log4j-core", LOG4J_VERSION),
    _DEPENDENCY.format("org.apache.logging.log4j", "log4j-slf4j2-impl", LOG4J_VERSION),
    _DEPENDENCY.format("org.slf4j", "slf4j-api", SLF4J_VERSION),
])
_LOGGING_3 = _DEPENDENCY.format("org.slf4j", "slf4j-reload4j", "1.7.36")

_LOG4J2 = """status = warn
appender.file.type = RollingFile
appender.file.name = FILE
appender.file.fileName = {log}
appender.file.filePattern = {log}.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 20MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 3
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.state.name = state.change.logger
logger.state.level = WARN
"""
_LOG4J1 = """log4j.rootLogger=INFO, file
log4j.appender.file=org.apache.log4j.RollingFileAppender
log4j.appender.file.File={log}
log4j.appender.file.MaxFileSize=20MB
log4j.appender.file.MaxBackupIndex=3
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n
"""


class BrokerError(RuntimeError):
    pass


@dataclass(frozen=True)
class BrokerStatus:
    running: bool
    pid: int | None
    bootstrap: str
    accepting: bool
    version: str

    def describe(self) -> str:
        if self.running:
            return f"kafka {self.version} running (pid {self.pid}) at {self.bootstrap}"
        if self.accepting:
            return (f"{self.bootstrap} is held by a process this checkout did not start (another checkout's broker?):"
                    f" stop it where it was started (pymk kafka stop there), or give this one other ports "
                    f"(PYMK_KAFKA_PORT=19092 PYMK_KAFKA_CONTROLLER_PORT=19093)")
        return f"kafka {self.version} not running ({self.bootstrap})"


class LocalBroker:
    """Resolve, start, stop and inspect the local single-node broker described by ``settings``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.dir = settings.broker_dir.resolve()
        self.pid_file = self.dir / "broker.pid"
        self.log_file = self.dir / "server.log"
        self.stdout_file = self.dir / "stdout.log"
        self.data_dir = self.dir / "data"
        self.config_file = self.dir / "server.properties"

    # ---- jars -------------------------------------------------------------------------------
    @property
    def libs_dir(self) -> Path:
        cache = Path(self.settings.kafka_cache_dir).expanduser().resolve()
        return cache / f"kafka-{self.settings.kafka_version}" / "libs"

    def ensure_jars(self, quiet: bool = False) -> Path:
        """Resolve the broker's jars from Maven Central once; later calls return the cached folder."""
        libs = self.libs_dir
        marker = libs / ".complete"
        if marker.exists():
            return libs
        if shutil.which("mvn") is None:
            raise BrokerError("mvn (Apache Maven) is needed once to fetch Kafka's jars: apt-get install maven")
        work = libs.parent
        work.mkdir(parents=True, exist_ok=True)
        version = self.settings.kafka_version
        logging = _LOGGING_4 if not version.startswith("3.") else _LOGGING_3
        (work / "pom.xml").write_text(_POM.format(kafka=version, logging=logging))
        staging = work / "libs.partial"
        shutil.rmtree(staging, ignore_errors=True)
        if not quiet:
            print(f"resolving Apache Kafka {version} (kafka_2.13 + runtime dependencies) from Maven Central …",
                  flush=True)
        result = subprocess.run(
            ["mvn", "-q", "-B", "-f", str(work / "pom.xml"), "dependency:copy-dependencies",
             "-DincludeScope=runtime", f"-DoutputDirectory={staging}"],
            capture_output=True, text=True, timeout=1200,
        )
        if result.returncode != 0:
            raise BrokerError(f"mvn could not resolve Kafka {version}:\n{result.stdout[-4000:]}\n"
                              f"{result.stderr[-4000:]}")
        shutil.rmtree(libs, ignore_errors=True)
        staging.rename(libs)
        marker.write_text(version + "\n")
        return libs

    # ---- status -----------------------------------------------------------------------------
    def _read_pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _is_our_broker(pid, self.config_file) else None

    def accepting(self) -> bool:
        return _port_open(self.settings.kafka_host, self.settings.kafka_port)

    def status(self) -> BrokerStatus:
        pid = self._read_pid()
        return BrokerStatus(
            running=pid is not None,
            pid=pid,
            bootstrap=f"{self.settings.kafka_host}:{self.settings.kafka_port}",
            accepting=self.accepting(),
            version=self.settings.kafka_version,
        )

    # ---- start / stop -------------------------------------------------------------------------
    def _write_config(self) -> None:
        s = self.settings
        self.dir.mkdir(parents=True, exist_ok=True)
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{s.kafka_host}:{s.kafka_controller_port}",
            "listeners": (f"PLAINTEXT://{s.kafka_host}:{s.kafka_port},"
                          f"CONTROLLER://{s.kafka_host}:{s.kafka_controller_port}"),
            "advertised.listeners": f"PLAINTEXT://{s.kafka_host}:{s.kafka_port}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": str(s.partitions),
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "8",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "min.insync.replicas": "1",
            "default.replication.factor": "1",
            # A single consumer group member should not wait 3 s for others that will never come.
            "group.initial.rebalance.delay.ms": "0",
            # Topics are created explicitly (pymk topics create, faust's internal topics) so that
            # co-partitioned topics always have the same partition count.
            "auto.create.topics.enable": "false",
            "log.retention.hours": "-1",
            "log.segment.bytes": str(64 * 1024 * 1024),
            "message.max.bytes": str(4 * 1024 * 1024),
        }
        self.config_file.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        template = _LOG4J2 if not s.kafka_version.startswith("3.") else _LOG4J1
        name = "log4j2.properties" if not s.kafka_version.startswith("3.") else "log4j.properties"
        (self.dir / name).write_text(template.format(log=self.log_file))

    def _java(self, libs: Path, main: str, *args: str, heap_mb: int = 256) -> list[str]:
        log_config = self.dir / "log4j2.properties"
        log_flag = (f"-Dlog4j2.configurationFile={log_config}" if not self.settings.kafka_version.startswith("3.")
                    else f"-Dlog4j.configuration=file:{self.dir / 'log4j.properties'}")
        return [
            "java", f"-Xmx{heap_mb}m", f"-Xms{min(heap_mb, 256)}m", "-XX:+UseG1GC", "-Djava.awt.headless=true",
            log_flag, "-cp", f"{libs}/*", main, *args,
        ]

    def _format_storage(self, libs: Path) -> None:
        if (self.data_dir / "meta.properties").exists():
            return
        cluster_id = new_cluster_id()
        result = subprocess.run(
            self._java(libs, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(self.config_file)),
            capture_output=True, text=True, timeout=120,
        )
        if result.returncode != 0:
            raise BrokerError(f"formatting KRaft storage failed:\n{result.stdout}\n{result.stderr}")

    def start(self, timeout_s: float = 90.0, quiet: bool = False) -> BrokerStatus:
        """Start the broker unless it already runs; return once it accepts connections and serves metadata."""
        current = self.status()
        if current.running:
            return current
        if current.accepting:
            raise BrokerError(current.describe())
        libs = self.ensure_jars(quiet=quiet)
        self._write_config()
        self._format_storage(libs)
        with open(self.stdout_file, "ab") as out:
            proc = subprocess.Popen(
                self._java(libs, "kafka.Kafka", str(self.config_file), heap_mb=self.settings.kafka_heap_mb),
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                cwd=self.dir,
            )
        self.pid_file.write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise BrokerError(f"the broker exited with code {proc.returncode}; see {self.log_file}\n{self._tail()}")
            if self.accepting() and _metadata_ready(self.settings):
                return self.status()
            time.sleep(0.2)
        self.stop()
        raise BrokerError(f"the broker did not become ready within {timeout_s:.0f} s; see {self.log_file}\n"
                          f"{self._tail()}")

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Stop the broker this folder started (and nothing else). Returns whether one was running."""
        pid = self._read_pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
            while _alive(pid):
                time.sleep(0.05)
        self.pid_file.unlink(missing_ok=True)
        return True

    def _tail(self, lines: int = 30) -> str:
        for path in (self.log_file, self.stdout_file):
            if path.exists():
                return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        return ""


def new_cluster_id() -> str:
    """A random KRaft cluster id: a UUID in URL-safe base64, as ``kafka-storage random-uuid`` makes them, and like
    Kafka's ``Uuid.randomUuid`` never starting with "-" (one in 64 would: the storage tool's argument parser reads
    such an id as an option and formatting fails)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of this process is not alive for our purposes.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        if state == "Z":
            os.waitpid(pid, os.WNOHANG)
            return False
    except (OSError, ChildProcessError):
        pass
    return True


def _is_our_broker(pid: int, config_file: Path) -> bool:
    """True only for a live java process running kafka.Kafka with this folder's config file."""
    if not _alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"kafka.Kafka" in cmdline and str(config_file).encode() in cmdline


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _metadata_ready(settings: Settings) -> bool:
    """The broker answers a metadata request (the port opens a moment before the broker is usable)."""
    from kafka import KafkaAdminClient  # imported lazily: `pymk kafka status` should stay fast

    try:
        admin = KafkaAdminClient(**settings.kafka_client_config(), request_timeout_ms=2000)
    except Exception:
        return False
    try:
        admin.list_topics()
        return True
    except Exception:
        return False
    finally:
        admin.close()
