"""The development Kafka broker: fetch, format, start, watch and stop a single-node Apache Kafka
broker, for local runs (`cai kafka start`) and the tests. Production uses a real cluster; nothing
in the services or the trainer imports this module.

The broker runs in KRaft combined mode (one JVM is both broker and controller) on loopback. Its jars
come from Maven Central through `cai/data/kafka/pom.xml` and are cached in
`$CAI_HOME/kafka/<version>/libs`. Everything a broker owns lives in its data directory:

    broker.json        port, controller port, pid and cluster id (written atomically)
    server.properties  regenerated at every start from broker.json
    storage/           Kafka's log.dirs: the metadata log, topics and records
    server.log         the broker's own log (log4j2, see cai/data/kafka/log4j2.xml)
    console.log        the JVM's stdout and stderr: crashes before logging starts end up here

A restart on the same directory reuses the storage (formatted once) and the same client port, so
clients that reconnect after a restart find the broker at the address they already have.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import psutil

from cai.errors import CAIError
from cai.paths import PACKAGE_DIR, cai_home

HOST = "127.0.0.1"
POM = PACKAGE_DIR / "data" / "kafka" / "pom.xml"
LOG4J_CONFIG = PACKAGE_DIR / "data" / "kafka" / "log4j2.xml"
MIN_JAVA = 17  # Kafka 4.x brokers need Java 17
DEFAULT_HEAP_OPTS = "-Xms64m -Xmx512m"  # small, for development; $KAFKA_HEAP_OPTS overrides it
NODE_ID = 1
_COMPLETE = ".complete"  # written last into a fetched libs folder: the pom's sha256


class BrokerError(CAIError):
    """The Kafka broker could not be fetched, started or stopped."""


class JavaNotFound(BrokerError):
    pass


class MavenNotFound(BrokerError):
    pass


class FetchFailed(BrokerError):
    pass


class PortInUse(BrokerError):
    pass


class BrokerNotReady(BrokerError):
    pass


def kafka_version() -> str:
    """The Kafka version that `pom.xml` names: the one source of truth."""
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    node = ET.parse(POM).getroot().find("m:properties/m:kafka.version", ns)
    if node is None or not node.text:
        raise BrokerError(f"{POM}: no <kafka.version> property")
    return node.text.strip()


def default_data_dir() -> Path:
    return cai_home() / "kafka" / "data"


def libs_dir() -> Path:
    return cai_home() / "kafka" / kafka_version() / "libs"


def _pom_digest() -> str:
    return hashlib.sha256(POM.read_bytes()).hexdigest()


def is_fetched() -> bool:
    marker = libs_dir() / _COMPLETE
    # The digest makes a change to pom.xml (say, a new log4j) fetch again under the same Kafka version.
    return marker.is_file() and marker.read_text().strip() == _pom_digest()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock: two processes fetching or starting at once take turns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fetch(progress: Callable[[str], None] = lambda _: None) -> Path:
    """Download Kafka's jars with Maven into `$CAI_HOME/kafka/<version>/libs` unless they are there."""
    if is_fetched():
        return libs_dir()
    mvn = shutil.which("mvn")
    if mvn is None:
        raise MavenNotFound("Maven (`mvn`) is not on PATH; it is needed once, to fetch Kafka's jars")
    libs = libs_dir()
    root = libs.parent
    with _file_lock(root / ".fetch.lock"):
        if is_fetched():  # another process fetched while we waited for the lock
            return libs
        for stale in root.glob("fetch-*"):  # left by a fetch that was killed; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        progress(f"fetching Apache Kafka {kafka_version()} with Maven into {libs}")
        # Maven writes into a staging folder that is renamed into place only when complete, so an
        # interrupted fetch never looks like a finished one.
        staging = Path(tempfile.mkdtemp(prefix="fetch-", dir=root))
        try:
            shutil.copy(POM, staging / "pom.xml")
            command = [
                mvn,
                "-B",
                "-q",
                "-Dstyle.color=never",
                "-f",
                str(staging / "pom.xml"),
                "dependency:copy-dependencies",
                "-DincludeScope=runtime",
                f"-DoutputDirectory={staging / 'libs'}",
            ]
            result = subprocess.run(command, cwd=staging, capture_output=True, text=True, check=False)
            log = root / "fetch.log"
            log.write_text(f"$ {shlex.join(command)}\n{result.stdout}{result.stderr}")
            if result.returncode != 0:
                errors = [line for line in (result.stdout + result.stderr).splitlines() if "ERROR" in line]
                first = errors[0].removeprefix("[ERROR] ").strip() if errors else f"exit {result.returncode}"
                raise FetchFailed(f"mvn could not fetch Kafka's jars: {first[:300]} (see {log})")
            (staging / "libs" / _COMPLETE).write_text(_pom_digest())
            if libs.exists():  # fetched under an older pom.xml
                shutil.rmtree(libs)
            os.rename(staging / "libs", libs)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return libs


def jar_stats(libs: Path) -> tuple[int, int]:
    """(number of jars, total bytes)."""
    jars = list(libs.glob("*.jar"))
    return len(jars), sum(jar.stat().st_size for jar in jars)


def find_java() -> str:
    """The `java` of $JAVA_HOME, else of PATH, checked to be Java 17 or newer."""
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home and (Path(home) / "bin" / "java").is_file() else None
    java = java or shutil.which("java")
    if java is None:
        raise JavaNotFound(f"Kafka needs Java {MIN_JAVA} or newer: no `java` on PATH or in $JAVA_HOME")
    result = subprocess.run([java, "-version"], capture_output=True, text=True, check=False)
    # `java -version` writes e.g. `openjdk version "17.0.15" 2025-04-15` (or "1.8.0_402") to stderr.
    match = re.search(r'version "(\d+)(?:\.(\d+))?', result.stderr)
    if match is None:
        raise JavaNotFound(f"could not read the version of {java}: {result.stderr.strip()[:200]}")
    major = int(match[2]) if match[1] == "1" and match[2] else int(match[1])
    if major < MIN_JAVA:
        raise JavaNotFound(f"Kafka needs Java {MIN_JAVA} or newer; {java} is Java {major} (set JAVA_HOME)")
    return java


def new_cluster_id() -> str:
    """A Kafka Uuid in its text form: 16 random bytes, URL-safe base64 without padding.

    Like Kafka's own Uuid.randomUuid, avoid a leading '-', which command lines would read as a flag.
    """
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not text.startswith("-"):
            return text


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the JVM does for server sockets: connections of a stopped broker in TIME_WAIT don't count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port(avoid: int | None = None) -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
        if port != avoid:
            return port


@dataclass(frozen=True)
class BrokerState:
    """What broker.json holds."""

    port: int | None = None
    controller_port: int | None = None
    pid: int | None = None
    pid_create_time: float | None = None  # tells our broker from a later process that reuses its pid
    cluster_id: str | None = None
    kafka_version: str | None = None


@dataclass(frozen=True)
class BrokerStatus:
    data_dir: Path
    running: bool
    pid: int | None
    port: int | None
    log_file: Path

    @property
    def bootstrap(self) -> str | None:
        return f"{HOST}:{self.port}" if self.port else None

    def to_dict(self) -> dict[str, object]:
        return {
            "running": self.running,
            "bootstrap": self.bootstrap,
            "pid": self.pid,
            "port": self.port,
            "data_dir": str(self.data_dir),
            "log_file": str(self.log_file),
        }


class Broker:
    """One broker, identified by its data directory; any process can check or stop it.

    `detach`: start the JVM in a session of its own, so that it outlives this process and its
    terminal (`cai kafka start`). Tests leave it attached: whatever kills the test run's process
    group (Ctrl-C, a CI timeout) then stops the broker too.
    """

    def __init__(self, data_dir: Path | str | None = None, detach: bool = True) -> None:
        self.detach = detach
        self.data_dir = Path(data_dir).expanduser().resolve() if data_dir else default_data_dir()
        self.state_file = self.data_dir / "broker.json"
        self.storage_dir = self.data_dir / "storage"
        self.log_file = self.data_dir / "server.log"
        self.console_file = self.data_dir / "console.log"
        self.properties_file = self.data_dir / "server.properties"
        self._child: subprocess.Popen[bytes] | None = None  # set when this process started the broker

    # ---- state -----------------------------------------------------------------------------

    def read_state(self) -> BrokerState:
        try:
            raw = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return BrokerState()
        except (OSError, ValueError) as exc:
            raise BrokerError(f"{self.state_file}: unreadable ({exc}); remove it to start afresh") from exc
        known = BrokerState.__dataclass_fields__
        return BrokerState(**{key: value for key, value in raw.items() if key in known})

    def _write_state(self, state: BrokerState) -> None:
        temp = self.state_file.with_suffix(".json.tmp")
        temp.write_text(json.dumps(asdict(state), indent=2) + "\n")
        os.replace(temp, self.state_file)

    def _process(self, state: BrokerState) -> psutil.Process | None:
        """The broker's live process, or None: a dead pid, a zombie or a recycled pid don't count."""
        if state.pid is None:
            return None
        try:
            process = psutil.Process(state.pid)
            if process.status() == psutil.STATUS_ZOMBIE:
                return None
            if state.pid_create_time is not None and abs(process.create_time() - state.pid_create_time) > 1:
                return None
            if "kafka.Kafka" not in process.cmdline():
                return None
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None
        return process

    def status(self) -> BrokerStatus:
        state = self.read_state()
        process = self._process(state)
        return BrokerStatus(
            data_dir=self.data_dir,
            running=process is not None,
            pid=process.pid if process else None,
            port=state.port,
            log_file=self.log_file,
        )

    @property
    def bootstrap(self) -> str:
        port = self.read_state().port
        if port is None:
            raise BrokerError(f"no broker was ever started in {self.data_dir}")
        return f"{HOST}:{port}"

    # ---- start -----------------------------------------------------------------------------

    def start(
        self,
        port: int | None = None,
        timeout: float = 90.0,
        progress: Callable[[str], None] = lambda _: None,
    ) -> BrokerStatus:
        """Start the broker in the background (or find it running) and return once it serves clients.

        `port`: the client port; by default the one this data dir used before, else a free one.
        """
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with _file_lock(self.data_dir / ".lock"):
            current = self.status()
            if current.running and port is not None and port != current.port:
                raise BrokerError(
                    f"a broker already runs on {self.data_dir} at port {current.port}; stop it first"
                )
            if not current.running:
                java = find_java()
                libs = fetch(progress)
                state = self.read_state()
                client_port, controller_port = self._choose_ports(state, port)
                state = replace(state, port=client_port, controller_port=controller_port)
                state = replace(state, cluster_id=self._format(java, libs, state, progress))
                self.properties_file.write_text(self._properties(state))
                self._launch(java, libs, state)
        # Also when it was running already: another process may have started it a moment ago.
        self._wait_ready(timeout)
        return self.status()

    def _choose_ports(self, state: BrokerState, port: int | None) -> tuple[int, int]:
        """(client port, controller port)."""
        if port is None and state.port is not None:
            port = state.port
            if not port_is_free(port):
                raise PortInUse(
                    f"port {port}, which {self.data_dir} used before (clients may still hold that "
                    f"address), is in use; free it or choose another with --port"
                )
        elif port is not None and not port_is_free(port):
            raise PortInUse(f"port {port} on {HOST} is in use; choose another with --port")
        port = port or free_port()
        # The controller port is internal (a static quorum reads it from server.properties, not from
        # the storage), so a new one is fine when the old one was taken meanwhile.
        controller = state.controller_port
        if controller is None or controller == port or not port_is_free(controller):
            controller = free_port(avoid=port)
        return port, controller

    def _java_command(self, java: str, libs: Path, main: str, *args: str) -> list[str]:
        heap = shlex.split(os.environ.get("KAFKA_HEAP_OPTS", DEFAULT_HEAP_OPTS))
        return [
            java,
            *heap,
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
            f"-Dkafka.logs.dir={self.data_dir}",
            "-cp",
            f"{libs}/*",  # the JVM expands the wildcard itself
            main,
            *args,
        ]

    def _format(self, java: str, libs: Path, state: BrokerState, progress: Callable[[str], None]) -> str:
        """Format the storage once; return the cluster id (the storage's own, when it exists)."""
        meta = self.storage_dir / "meta.properties"
        if meta.is_file():
            match = re.search(r"^cluster\.id=(\S+)$", meta.read_text(), re.MULTILINE)
            if match:
                return match[1]
        cluster_id = state.cluster_id or new_cluster_id()
        progress(f"formatting {self.storage_dir} (cluster id {cluster_id})")
        self.properties_file.write_text(self._properties(replace(state, cluster_id=cluster_id)))
        command = self._java_command(
            java, libs, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(self.properties_file)
        )
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            lines = (result.stdout + result.stderr).strip().splitlines() or [f"exit {result.returncode}"]
            raise BrokerError(f"formatting {self.storage_dir} failed: {lines[-1][:300]}")
        return cluster_id

    def _properties(self, state: BrokerState) -> str:
        # A static quorum (controller.quorum.voters) rather than `format --standalone`: a dynamic quorum
        # records the controller's address in the metadata log, which would pin the controller port
        # for the life of the data dir.
        settings = {
            "process.roles": "broker,controller",
            "node.id": NODE_ID,
            "listeners": f"PLAINTEXT://{HOST}:{state.port},CONTROLLER://{HOST}:{state.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{HOST}:{state.port}",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "controller.quorum.voters": f"{NODE_ID}@{HOST}:{state.controller_port}",
            "log.dirs": self.storage_dir,
            # One node: every internal topic has one replica.
            "num.partitions": 1,
            "offsets.topic.replication.factor": 1,
            # One partition instead of 50: the group coordinator is ready in moments, not minutes, on a
            # small machine. A dev broker has few groups, so nothing is lost.
            "offsets.topic.num.partitions": 1,
            "transaction.state.log.replication.factor": 1,
            "transaction.state.log.min.isr": 1,
            "share.coordinator.state.topic.replication.factor": 1,
            "share.coordinator.state.topic.min.isr": 1,
            # Consumer groups form at once instead of after 3 s: tests and local runs start quickly.
            "group.initial.rebalance.delay.ms": 0,
        }
        lines = [f"{key}={value}" for key, value in settings.items()]
        return "# written by cai/devbroker.py at every start; edits are lost\n" + "\n".join(lines) + "\n"

    def _launch(self, java: str, libs: Path, state: BrokerState) -> None:
        command = self._java_command(java, libs, "kafka.Kafka", str(self.properties_file))
        with self.console_file.open("ab") as console:
            child = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                start_new_session=self.detach,
            )
        self._child = child
        try:
            create_time = psutil.Process(child.pid).create_time()
        except psutil.NoSuchProcess:
            create_time = None
        self._write_state(
            replace(state, pid=child.pid, pid_create_time=create_time, kafka_version=kafka_version())
        )

    def _wait_ready(self, timeout: float) -> None:
        """Ready: our broker (same cluster id) answers a DescribeCluster and is not fenced."""
        state = self.read_state()
        assert state.port is not None
        deadline = time.monotonic() + timeout
        while True:
            process = self._process(state)
            if process is None:
                code = None
                if self._child is not None:  # let it finish exiting, so its code and last log lines exist
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        code = self._child.wait(timeout=10)
                exited = f"exited with code {code}" if code is not None else "exited"
                cause = self._fatal_error()
                raise BrokerNotReady(
                    f"the Kafka broker {exited} while starting{': ' + cause if cause else ''}; "
                    f"see {self._log_to_read()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerNotReady(
                    f"the Kafka broker was not ready after {timeout:.0f} s (stopped it): see {self.log_file}"
                )
            if self._answers(state, deadline):
                return
            time.sleep(0.2)

    def _answers(self, state: BrokerState, deadline: float) -> bool:
        # A plain TCP connect first: cheap, and no client retries against a port nothing listens on.
        try:
            socket.create_connection((HOST, state.port or 0), timeout=1).close()
        except OSError:
            return False
        from confluent_kafka import KafkaException

        from cai.kafka import client

        timeout = min(5.0, max(1.0, deadline - time.monotonic()))
        try:
            with client.admin(f"{HOST}:{state.port}", "cai-kafka-ready") as admin:
                cluster = admin.describe_cluster(request_timeout=timeout).result()
        except KafkaException:
            return False
        if cluster.cluster_id != state.cluster_id:
            raise BrokerNotReady(
                f"another Kafka cluster ({cluster.cluster_id}) answers on {HOST}:{state.port}"
            )
        # The cluster's nodes are its unfenced brokers: a fenced one is not listed.
        return any(node.id == NODE_ID for node in cluster.nodes)

    def _fatal_error(self) -> str | None:
        """The message of the last exception in the broker's log (Kafka logs why it exits)."""
        try:
            lines = self._log_to_read().read_text(errors="replace").splitlines()[-300:]
        except OSError:
            return None
        causes = [line for line in lines if re.match(r"^[\w.$]+(Exception|Error): ", line)]
        return causes[-1].split(": ", 1)[1][:300] if causes else None

    def _log_to_read(self) -> Path:
        # A JVM that fails before log4j starts (bad flag, missing class) writes only to the console file.
        if self.log_file.is_file() and self.log_file.stat().st_size > 0:
            return self.log_file
        return self.console_file

    # ---- stop ------------------------------------------------------------------------------

    def stop(self, timeout: float = 30.0) -> bool:
        """SIGTERM (a controlled shutdown), then SIGKILL after `timeout` s. False if it wasn't running."""
        if not self.data_dir.is_dir():
            return False
        with _file_lock(self.data_dir / ".lock"):
            state = self.read_state()
            process = self._process(state)
            if process is not None:
                process.terminate()
                try:
                    process.wait(timeout)
                except psutil.TimeoutExpired:
                    process.kill()
                    process.wait(10)
            if self._child is not None:
                self._child.wait()  # reap it: a zombie child would still hold its pid
                self._child = None
            if state.pid is not None:
                self._write_state(replace(state, pid=None, pid_create_time=None))
            return process is not None

    def restart(self, timeout: float = 90.0) -> BrokerStatus:
        """Stop, then start on the same data dir and port."""
        self.stop()
        return self.start(timeout=timeout)
