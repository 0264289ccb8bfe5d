"""A real Kubernetes control plane on loopback, with simulated nodes.

Runs etcd, kube-apiserver (authorization Node,RBAC; PodSecurity admission), kube-controller-manager,
kube-scheduler and kwok from the binaries that build.sh puts in its cache folder. Everything lives
in one work folder (PKI, kubeconfigs, etcd's data, logs, pids); every port is a free loopback port;
every component is stopped by its pid. kwok plays the kubelets: nodes annotated
kwok.x-k8s.io/node=fake become Ready, Pods bound to them become Running and Ready, Job pods
complete. No container runs: images are never pulled.

As a program (`make kube-up` runs it):

    python deploy/controlplane/controlplane.py up [--apply deploy/k8s/overlays/local] [--dir DIR]

starts the control plane and its nodes, optionally installs the CRDs that the overlays need and
applies an overlay server-side, prints the KUBECONFIG to use, and stops everything on Ctrl-C.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import ipaddress
import json
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "kwok")
KWOK_ANNOTATION = "kwok.x-k8s.io/node"
SERVICE_CIDR = "10.96.0.0/16"
# The labels that NVIDIA's GPU operator (GPU feature discovery) puts on a GPU node.
GPU_LABELS = {
    "nvidia.com/gpu.present": "true",
    "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
    "nvidia.com/gpu.memory": "81559",
    "nvidia.com/gpu.family": "hopper",
    "nvidia.com/cuda.driver.major": "570",
}
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}


class ControlPlaneError(RuntimeError):
    """A component did not start, did not become ready, or a command against it failed."""


def _run_recipe(script: str, timeout_s: float) -> Path:
    """Run one of the recipe's scripts; return the folder it prints last."""
    try:
        result = subprocess.run(
            ["bash", str(HERE / script)], capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired as e:
        raise ControlPlaneError(f"deploy/controlplane/{script} took longer than {timeout_s:.0f} s") from e
    if result.returncode != 0:
        raise ControlPlaneError(
            f"deploy/controlplane/{script} failed (exit {result.returncode}):\n{result.stderr[-4000:]}"
        )
    return Path(result.stdout.strip().splitlines()[-1])


def build(timeout_s: float = 3600) -> Path:
    """Run build.sh (a no-op when its cache folder is complete) and return the binaries' folder."""
    return _run_recipe("build.sh", timeout_s)


def fetch_crds(timeout_s: float = 900) -> Path:
    """Run crds.sh (a no-op when its cache folder is complete) and return the CRDs' folder."""
    return _run_recipe("crds.sh", timeout_s)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL it when the process that started it dies (Linux)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# --- PKI ------------------------------------------------------------------------------------------


def _pem_key(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert(
    subject_cn: str,
    *,
    org: str | None = None,
    issuer: tuple[Any, Any] | None = None,
    ca: bool = False,
    server: bool = False,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
) -> tuple[Any, Any]:
    """A new ECDSA P-256 key and its certificate, signed by `issuer` (cert, key) or by itself."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]
    if org:
        attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    name = x509.Name(attrs)
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_cert.subject if issuer_cert else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        usage = [ExtendedKeyUsageOID.SERVER_AUTH] if server else [ExtendedKeyUsageOID.CLIENT_AUTH]
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        builder = builder.add_extension(
            x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True
        )
    if dns or ips:
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), key


def _pem_cert(cert: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(cert.public_bytes(serialization.Encoding.PEM))


# Who each kubeconfig is: (common name, organization). The controller manager and the scheduler
# get the identities their built-in RBAC roles are bound to; kwok plays every kubelet.
IDENTITIES = {
    "admin": ("cai-admin", "system:masters"),
    "controller-manager": ("system:kube-controller-manager", None),
    "scheduler": ("system:kube-scheduler", None),
    "kwok": ("kwok", "system:masters"),
}


def write_pki(folder: Path, server_url: str) -> None:
    """CA, API server certificate, service-account signing key and one kubeconfig per identity."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = _cert("cai-controlplane-ca", ca=True)
    (folder / "ca.crt").write_bytes(_pem_cert(ca_cert))
    service_ip = str(next(ipaddress.ip_network(SERVICE_CIDR).hosts()))
    cert, key = _cert(
        "kube-apiserver",
        issuer=(ca_cert, ca_key),
        server=True,
        dns=("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"),
        ips=("127.0.0.1", service_ip),
    )
    (folder / "apiserver.crt").write_bytes(_pem_cert(cert))
    (folder / "apiserver.key").write_bytes(_pem_key(key))
    sa_key = ec.generate_private_key(ec.SECP256R1())
    (folder / "sa.key").write_bytes(_pem_key(sa_key))
    (folder / "sa.pub").write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    ca_data = base64.b64encode(_pem_cert(ca_cert)).decode()
    for name, (cn, org) in IDENTITIES.items():
        cert, key = _cert(cn, org=org, issuer=(ca_cert, ca_key))
        user = {
            "client-certificate-data": base64.b64encode(_pem_cert(cert)).decode(),
            "client-key-data": base64.b64encode(_pem_key(key)).decode(),
        }
        (folder / f"{name}.kubeconfig").write_text(
            json.dumps(kubeconfig(server_url, ca_data, user), indent=1)
        )


def kubeconfig(server_url: str, ca_data: str, user: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "cai", "cluster": {"server": server_url, "certificate-authority-data": ca_data}}
        ],
        "users": [{"name": "cai", "user": user}],
        "contexts": [{"name": "cai", "context": {"cluster": "cai", "user": "cai"}}],
        "current-context": "cai",
    }


# --- nodes ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeSpec:
    name: str
    cpu: str = "8"
    memory: str = "32Gi"
    gpus: int = 0
    pods: int = 110

    def manifest(self) -> dict[str, Any]:
        labels = {
            "kubernetes.io/hostname": self.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "type": "kwok",
            "node.kubernetes.io/instance-type": "gpu" if self.gpus else "cpu",
        }
        capacity = {
            "cpu": self.cpu,
            "memory": self.memory,
            "pods": str(self.pods),
            "ephemeral-storage": "200Gi",
        }
        spec: dict[str, Any] = {}
        if self.gpus:
            labels.update(GPU_LABELS)
            labels["nvidia.com/gpu.count"] = str(self.gpus)
            capacity["nvidia.com/gpu"] = str(self.gpus)
            spec["taints"] = [GPU_TAINT]
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.name, "labels": labels, "annotations": {KWOK_ANNOTATION: "fake"}},
            "spec": spec,
            "status": {
                "capacity": capacity,
                "allocatable": capacity,
                "nodeInfo": {
                    "architecture": "amd64",
                    "operatingSystem": "linux",
                    "kubeletVersion": "fake",
                    "kubeProxyVersion": "fake",
                },
            },
        }


DEFAULT_NODES = (
    NodeSpec("cpu-1"),
    NodeSpec("cpu-2"),
    NodeSpec("cpu-3"),
    NodeSpec("gpu-1", cpu="32", memory="256Gi", gpus=8),
    NodeSpec("gpu-2", cpu="32", memory="256Gi", gpus=8),
)


def persistent_volumes(count: int, size: str = "100Gi") -> list[dict[str, Any]]:
    """Statically provisioned volumes for the PersistentVolumeClaims (no provisioner runs here)."""
    return [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": f"pv-{i}"},
            "spec": {
                "capacity": {"storage": size},
                "accessModes": ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Retain",
                "hostPath": {"path": f"/var/lib/cai-test/pv-{i}"},
            },
        }
        for i in range(count)
    ]


# --- the control plane ----------------------------------------------------------------------------


@dataclass
class Component:
    name: str
    args: list[str]
    log: Path
    health: str  # URL that answers 200 once the component is ready
    process: subprocess.Popen[bytes] | None = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class ControlPlane:
    """etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok in `workdir`."""

    bin_dir: Path
    workdir: Path
    nodes: Sequence[NodeSpec] = DEFAULT_NODES
    volumes: int = 12
    components: list[Component] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)
    crds: list[str] = field(default_factory=list)  # names of the CRDs install_crds installed

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    @property
    def kubeconfig(self) -> Path:
        """The admin's kubeconfig (system:masters)."""
        return self.workdir / "pki" / "admin.kubeconfig"

    @property
    def ca_file(self) -> Path:
        return self.workdir / "pki" / "ca.crt"

    # lifecycle

    def start(self, timeout_s: float = 120.0) -> None:
        """Start every component in order, each ready before the next; then the nodes."""
        missing = [b for b in BINARIES if not (self.bin_dir / b).is_file()]
        if missing:
            raise ControlPlaneError(f"{self.bin_dir} lacks {missing}: run deploy/controlplane/build.sh")
        self.workdir.mkdir(parents=True, exist_ok=True)
        for name in ("etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler", "kwok"):
            self.ports[name] = free_port()
        pki = self.workdir / "pki"
        write_pki(pki, self.server)
        try:
            for component in self._components(pki):
                self._start(component, timeout_s)
            self.apply(
                [n.manifest() for n in self.nodes] + persistent_volumes(self.volumes), server_side=True
            )
            self.wait_for(
                "nodes to become Ready",
                lambda: all(self._node_ready(n.name) for n in self.nodes),
                timeout_s,
            )
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGTERM every component by pid, newest first; SIGKILL what is left after 15 seconds."""
        running = [c.process for c in reversed(self.components) if c.process and c.process.poll() is None]
        try:
            for process in running:
                process.terminate()
            deadline = time.monotonic() + 15
            for process in running:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=max(0.1, deadline - time.monotonic()))
        finally:  # also when interrupted: nothing is left running
            for process in running:
                if process.poll() is None:
                    process.kill()
                    process.wait(timeout=15)
            self.components.clear()

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _components(self, pki: Path) -> list[Component]:
        b, p, logs = self.bin_dir, self.ports, self.workdir / "logs"
        logs.mkdir(exist_ok=True)
        etcd_url = f"http://127.0.0.1:{p['etcd']}"
        peer_url = f"http://127.0.0.1:{p['etcd-peer']}"
        common_go = ["--bind-address=127.0.0.1", "--leader-elect=false"]
        return [
            Component(
                "etcd",
                [
                    str(b / "etcd"),
                    "--name=cai",
                    f"--data-dir={self.workdir / 'etcd'}",
                    f"--listen-client-urls={etcd_url}",
                    f"--advertise-client-urls={etcd_url}",
                    f"--listen-peer-urls={peer_url}",
                    f"--initial-advertise-peer-urls={peer_url}",
                    f"--initial-cluster=cai={peer_url}",
                    "--unsafe-no-fsync=true",
                    "--log-level=warn",
                ],
                logs / "etcd.log",
                f"{etcd_url}/health",
            ),
            Component(
                "kube-apiserver",
                [
                    str(b / "kube-apiserver"),
                    f"--etcd-servers={etcd_url}",
                    "--bind-address=127.0.0.1",
                    "--advertise-address=127.0.0.1",
                    f"--secure-port={p['apiserver']}",
                    f"--tls-cert-file={pki / 'apiserver.crt'}",
                    f"--tls-private-key-file={pki / 'apiserver.key'}",
                    f"--client-ca-file={pki / 'ca.crt'}",
                    f"--service-account-key-file={pki / 'sa.pub'}",
                    f"--service-account-signing-key-file={pki / 'sa.key'}",
                    "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                    f"--service-cluster-ip-range={SERVICE_CIDR}",
                    "--authorization-mode=Node,RBAC",
                    "--enable-admission-plugins=NodeRestriction,PodSecurity",
                    "--allow-privileged=true",  # as kubeadm sets it: Pod Security admission decides
                    "--profiling=false",
                ],
                logs / "kube-apiserver.log",
                f"{self.server}/readyz",
            ),
            Component(
                "kube-controller-manager",
                [
                    str(b / "kube-controller-manager"),
                    *common_go,
                    f"--secure-port={p['controller-manager']}",
                    f"--kubeconfig={pki / 'controller-manager.kubeconfig'}",
                    f"--authentication-kubeconfig={pki / 'controller-manager.kubeconfig'}",
                    f"--authorization-kubeconfig={pki / 'controller-manager.kubeconfig'}",
                    f"--service-account-private-key-file={pki / 'sa.key'}",
                    f"--root-ca-file={pki / 'ca.crt'}",
                    "--use-service-account-credentials=true",
                    f"--service-cluster-ip-range={SERVICE_CIDR}",
                    "--profiling=false",
                ],
                logs / "kube-controller-manager.log",
                f"https://127.0.0.1:{p['controller-manager']}/healthz",
            ),
            Component(
                "kube-scheduler",
                [
                    str(b / "kube-scheduler"),
                    *common_go,
                    f"--secure-port={p['scheduler']}",
                    f"--kubeconfig={pki / 'scheduler.kubeconfig'}",
                    f"--authentication-kubeconfig={pki / 'scheduler.kubeconfig'}",
                    f"--authorization-kubeconfig={pki / 'scheduler.kubeconfig'}",
                    "--profiling=false",
                ],
                logs / "kube-scheduler.log",
                f"https://127.0.0.1:{p['scheduler']}/healthz",
            ),
            Component(
                "kwok",
                [
                    str(b / "kwok"),
                    f"--config={self.workdir / 'kwok.yaml'}",
                    f"--kubeconfig={pki / 'kwok.kubeconfig'}",
                    "--manage-all-nodes=false",
                    f"--manage-nodes-with-annotation-selector={KWOK_ANNOTATION}=fake",
                    f"--server-address=127.0.0.1:{p['kwok']}",
                    "--cidr=10.244.0.0/16",
                    "--node-ip=127.0.0.1",
                    "--node-lease-duration-seconds=40",
                ],
                logs / "kwok.log",
                f"http://127.0.0.1:{p['kwok']}/healthz",
            ),
        ]

    def _start(self, component: Component, timeout_s: float) -> None:
        if component.name == "kwok":  # its own configuration only, never a user's ~/.kwok
            (self.workdir / "kwok.yaml").write_text(
                "apiVersion: config.kwok.x-k8s.io/v1alpha1\nkind: KwokConfiguration\noptions: {}\n"
            )
        with component.log.open("wb") as log:
            component.process = subprocess.Popen(
                component.args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self.components.append(component)
        pids = self.workdir / "pids"
        pids.mkdir(exist_ok=True)
        (pids / component.name).write_text(f"{component.process.pid}\n")
        deadline = time.monotonic() + timeout_s
        context = ssl.create_default_context(cafile=str(self.ca_file))
        context.check_hostname = False  # controller manager and scheduler serve self-signed certs
        context.verify_mode = ssl.CERT_NONE if component.name != "kube-apiserver" else ssl.CERT_REQUIRED
        last = ""
        while time.monotonic() < deadline:
            if component.process.poll() is not None:
                raise ControlPlaneError(
                    f"{component.name} exited with status {component.process.returncode} before "
                    f"it was ready; the end of {component.log}:\n{component.log_tail()}"
                )
            try:
                with urllib.request.urlopen(component.health, timeout=5, context=context) as answer:
                    if answer.status == 200:
                        return
                    last = f"HTTP {answer.status}"
            except (urllib.error.URLError, OSError) as e:
                last = str(e)
            time.sleep(0.25)
        raise ControlPlaneError(
            f"{component.name} was not ready after {timeout_s:.0f} s ({component.health}: {last}); "
            f"the end of {component.log}:\n{component.log_tail()}"
        )

    # using it

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout_s: float = 120.0,
        kubeconfig: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl as the admin (or with `kubeconfig`); raise with its output if it fails."""
        command = [str(self.bin_dir / "kubectl"), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args]
        try:
            result = subprocess.run(
                command, input=input, capture_output=True, text=True, timeout=timeout_s, cwd=REPO
            )
        except subprocess.TimeoutExpired as e:
            raise ControlPlaneError(f"kubectl {' '.join(args)} took longer than {timeout_s:.0f} s") from e
        if check and result.returncode != 0:
            raise ControlPlaneError(
                f"kubectl {' '.join(args)} failed (exit {result.returncode}):\n{result.stderr}{result.stdout}"
            )
        return result

    def get(self, *args: str) -> Any:
        """`kubectl get ... -o json`, parsed."""
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def apply(self, objects: Sequence[dict[str, Any]], *, server_side: bool = True) -> str:
        docs = "\n".join(json.dumps(o) for o in objects)
        flags = ["--server-side", "--force-conflicts", "--field-manager=cai-tests"] if server_side else []
        return self.kubectl("apply", *flags, "-f", "-", input=docs).stdout

    def install_crds(self, crd_dir: Path, timeout_s: float = 60.0) -> list[str]:
        """Apply every CRD in `crd_dir` and wait until each is Established; returns their names."""
        files = sorted(crd_dir.glob("*.yaml"))
        if not files:
            raise ControlPlaneError(f"no CRDs in {crd_dir}")
        args = ["apply", "--server-side", "--field-manager=cai-tests"]
        for f in files:
            args += ["-f", str(f)]
        out = self.kubectl(*args, "-o", "name", timeout_s=timeout_s).stdout
        names = [n.split("/", 1)[1] for n in out.split()]
        self.crds += names
        self.kubectl(
            "wait", "--for=condition=Established", f"--timeout={int(timeout_s)}s",
            *[f"crd/{n}" for n in names], timeout_s=timeout_s + 10,
        )  # fmt: skip
        return names

    def apply_overlay(self, overlay: Path, timeout_s: float = 120.0) -> list[str]:
        """`kubectl apply --server-side -k overlay`; returns what kubectl names ("kind/name ...")."""
        out = self.kubectl(
            "apply", "--server-side", "--field-manager=cai-tests", "-k", str(overlay), "-o", "name",
            timeout_s=timeout_s,
        ).stdout  # fmt: skip
        return out.split()

    def wait_for(self, what: str, condition: Any, timeout_s: float, interval_s: float = 0.5) -> None:
        """Poll `condition()` until it is true; on the deadline, raise naming `what`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(interval_s)
        raise ControlPlaneError(f"timed out after {timeout_s:.0f} s waiting for {what}")

    def _node_ready(self, name: str) -> bool:
        result = self.kubectl("get", "node", name, "-o", "json", check=False)
        if result.returncode != 0:
            return False
        conditions = json.loads(result.stdout).get("status", {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


@contextlib.contextmanager
def running(workdir: Path | None = None, **kwargs: Any) -> Iterator[ControlPlane]:
    """Build (or find) the binaries, start a control plane, and stop it on the way out."""
    bin_dir = build()
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cai-controlplane-")))
        plane = ControlPlane(bin_dir, workdir, **kwargs)
        plane.start()
        stack.callback(plane.stop)
        yield plane


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the control plane and its nodes; Ctrl-C stops it")
    up.add_argument("--dir", type=Path, help="work folder (default: a new temporary one)")
    up.add_argument("--apply", type=Path, action="append", default=[], help="an overlay to apply")
    sub.add_parser("build", help="build the binaries (once) and print their folder")
    args = parser.parse_args(argv)
    if args.command == "build":
        print(build())
        return 0
    started = time.monotonic()
    with running(args.dir) as plane:
        print(f"control plane ready in {time.monotonic() - started:.1f} s: {plane.server}", flush=True)
        if args.apply:
            print(f"CRDs: {', '.join(plane.install_crds(fetch_crds()))}", flush=True)
        for overlay in args.apply:
            print("\n".join(plane.apply_overlay(overlay)), flush=True)
        print(
            f"\nexport KUBECONFIG={plane.kubeconfig}\n"
            f"kubectl ({plane.bin_dir / 'kubectl'}) now reaches it; Ctrl-C stops everything.",
            flush=True,
        )
        stop = False

        def interrupted(*_: object) -> None:
            nonlocal stop
            stop = True

        # Ctrl-C or SIGTERM end the wait; a second one does not cut the shutdown short.
        signal.signal(signal.SIGINT, interrupted)
        signal.signal(signal.SIGTERM, interrupted)
        while not stop and all(c.process and c.process.poll() is None for c in plane.components):
            time.sleep(0.5)
        print("stopping the control plane", flush=True)
        dead = [c.name for c in plane.components if c.process and c.process.poll() is not None]
        if dead:
            print(
                f"stopped because {', '.join(dead)} exited; logs in {plane.workdir / 'logs'}", file=sys.stderr
            )
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
