"""Build the project's image where no image registry can be reached, and run it.

`Engine` uses the Docker engine that DOCKER_HOST (or the default socket) names; if none answers,
it starts a private `dockerd` (Debian's docker.io) with a data root under the cache folder, no
bridge, no iptables and its own socket, and stops it by pid afterwards. `ensure_base` makes the
CPU variant's base image: `python:3.11-slim-bookworm` if it can be pulled, else Debian bookworm
from `debootstrap --variant=minbase` with python3, imported with `docker import`. `build` runs
`docker build` on the repository's Dockerfile with that base, the default model baked in.

    python deploy/image/image.py build [--if-missing] [--if-engine]

`make image` builds (again); `make test` builds only a missing image, and only where an engine
can run (elsewhere tests/deploy/test_image.py says why it skips).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
IMAGE = "cai-stack:0.1.0-cpu-model"
UPSTREAM_BASE = "python:3.11-slim-bookworm"
DEBIAN_BASE = "cai-base:bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu/"  # the Dockerfile's TORCH_INDEX_URL
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cai"


class ImageError(RuntimeError):
    """The engine did not start, or a build or run step failed."""


def docker_binary() -> str:
    """Debian's docker.io client (it speaks to its own engine without buildx), else any docker."""
    for candidate in ("/usr/bin/docker", shutil.which("docker")):
        if candidate and Path(candidate).is_file():
            return candidate
    raise ImageError("no docker client: install Debian's docker.io (apt-get install docker.io)")


@dataclass
class Engine:
    data_root: Path = CACHE / "docker"
    host: str = ""
    process: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    def start(self, timeout_s: float = 60.0) -> None:
        self.env = dict(os.environ, DOCKER_BUILDKIT="1")
        if self._answers(self.env):
            return
        dockerd = shutil.which("dockerd")
        if dockerd is None:
            raise ImageError(
                "no Docker engine answers and dockerd is not installed (apt-get install docker.io)"
            )
        self.data_root.mkdir(parents=True, exist_ok=True)
        socket = self.data_root / "docker.sock"
        self.host = f"unix://{socket}"
        self.env["DOCKER_HOST"] = self.host
        log = (self.data_root / "dockerd.log").open("wb")
        self.process = subprocess.Popen(
            [
                dockerd,
                f"--data-root={self.data_root / 'root'}",
                f"--exec-root={self.data_root / 'exec'}",
                f"--pidfile={self.data_root / 'dockerd.pid'}",
                f"--host={self.host}",
                "--bridge=none",
                "--iptables=false",
                "--ip6tables=false",
                "--ip-masq=false",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ImageError(f"dockerd exited with {self.process.returncode}:\n{self._log_tail()}")
            if self._answers(self.env):
                return
            time.sleep(0.5)
        self.stop()
        raise ImageError(f"dockerd did not answer within {timeout_s:.0f} s:\n{self._log_tail()}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def docker(
        self, *args: str, check: bool = True, timeout_s: float = 600.0, input: bytes | None = None
    ) -> subprocess.CompletedProcess[str]:
        try:
            result = subprocess.run(
                [docker_binary(), *args],
                env=self.env,
                input=input.decode() if input else None,
                capture_output=True,
                text=True,
                timeout=timeout_s,
            )
        except subprocess.TimeoutExpired as e:
            raise ImageError(f"docker {' '.join(args[:3])} ... took longer than {timeout_s:.0f} s") from e
        if check and result.returncode != 0:
            raise ImageError(
                f"docker {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-4000:]}"
            )
        return result

    def has_image(self, name: str) -> bool:
        return self.docker("image", "inspect", name, check=False).returncode == 0

    def _answers(self, env: dict[str, str]) -> bool:
        try:
            run = subprocess.run([docker_binary(), "info"], env=env, capture_output=True, timeout=10)
        except (subprocess.TimeoutExpired, ImageError):
            return False
        return run.returncode == 0

    def _log_tail(self) -> str:
        try:
            return "\n".join((self.data_root / "dockerd.log").read_text().splitlines()[-30:])
        except OSError:
            return "(no log)"


def install_engine() -> str:
    """Install Debian's docker.io and debootstrap (as root, with apt-get); return dockerd's path."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ImageError("no Docker engine answers and dockerd is not installed (apt-get install docker.io)")
    print("installing Debian's docker.io and debootstrap with apt-get", file=sys.stderr, flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "docker.io", "debootstrap"],
    ):
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise ImageError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise ImageError("docker.io is installed but dockerd is not on PATH")
    return dockerd


def ensure_base(engine: Engine) -> tuple[str, str]:
    """(base image, its python) for the CPU variant: the usual one if it can be pulled, else Debian's."""
    pulled = engine.has_image(UPSTREAM_BASE) or (
        engine.docker("pull", UPSTREAM_BASE, check=False, timeout_s=300).returncode == 0
    )
    if pulled:
        return UPSTREAM_BASE, "/usr/local/bin/python3"
    if not engine.has_image(DEBIAN_BASE):
        debootstrap = shutil.which("debootstrap")
        if debootstrap is None:
            raise ImageError(f"{UPSTREAM_BASE} cannot be pulled and debootstrap is not installed")
        with tempfile.TemporaryDirectory(prefix="cai-rootfs-") as rootfs:
            subprocess.run(
                [debootstrap, "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
                 "bookworm", rootfs, DEBIAN_MIRROR],
                check=True, capture_output=True, timeout=1800,
            )  # fmt: skip
            for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
                shutil.rmtree(Path(rootfs) / cache, ignore_errors=True)
            tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
            imported = subprocess.run(
                [docker_binary(), "import", "-", DEBIAN_BASE],
                stdin=tar.stdout,
                env=engine.env,
                capture_output=True,
            )
            tar.wait()
            if imported.returncode != 0:
                raise ImageError(f"docker import of the debootstrap root failed: {imported.stderr.decode()}")
    return DEBIAN_BASE, "/usr/bin/python3"


def reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return bool(answer.status == 200)
    except (OSError, ValueError):
        return False


def build(engine: Engine, tag: str = IMAGE) -> None:
    base, python = ensure_base(engine)
    args = [
        "build", "--network=host", "-t", tag,
        "--build-arg", f"PYTHON_IMAGE={base}", "--build-arg", f"CPU_PYTHON={python}",
        "--build-arg", "WITH_DEFAULT_MODEL=1",
    ]  # fmt: skip
    if not reachable(TORCH_CPU_INDEX):  # then PyPI's torch (a CUDA build, larger, runs on CPU)
        args += ["--build-arg", "TORCH_INDEX_URL="]
    bundle = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE")
    if bundle and Path(bundle).is_file():  # a TLS-inspecting proxy's CA, for the downloads
        args += ["--secret", f"id=ca-bundle,src={bundle}"]
    result = subprocess.run([docker_binary(), *args, str(REPO)], env=engine.env, text=True, timeout=3600)
    if result.returncode != 0:
        raise ImageError(f"docker build of {tag} failed ({result.returncode})")
    # The build cache holds another copy of the dependency layers (about 7 GB): keep the image only.
    engine.docker("builder", "prune", "--force", check=False, timeout_s=600)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "build" or not set(args[1:]) <= {"--if-engine", "--if-missing"}:
        print(__doc__, file=sys.stderr)
        return 2
    started = time.monotonic()
    engine = Engine()
    try:
        engine.start()
    except ImageError as e:
        if "--if-engine" not in args:
            raise
        print(f"no Docker engine can run here, so no image is built: {e}", file=sys.stderr)
        return 0
    try:
        if "--if-missing" in args and engine.has_image(IMAGE):
            print(f"{IMAGE} is built already")
            return 0
        build(engine)
    finally:
        engine.stop()
    print(f"{IMAGE} built in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
