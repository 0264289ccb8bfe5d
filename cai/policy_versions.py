"""Policy versions: the trainer packs its adapter into one archive, hashes it and announces it;
the policy service fetches the archive, checks the hash and serves it from its next decode step.

A version is named `v<N>` with N = step / publish_every, so a trainer that resumes from a
checkpoint and trains the same steps again publishes the same names (a service that already
serves a version with that name and hash skips it). Samples carry the name of the version that
generated them; staleness is the difference of the N's.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import shutil
import tarfile
import tempfile
import threading
import urllib.parse
import urllib.request
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cai.errors import InvalidArgument, Unavailable
from cai.records import BASE_VERSION, PolicyVersion

log = logging.getLogger("cai.trainer")

_VERSION = re.compile(r"v(\d+)")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def version_name(index: int) -> str:
    return f"v{index}" if index > 0 else BASE_VERSION


def version_index(name: str) -> int | None:
    """N of `v<N>`, 0 for the base policy, None for a name this scheme did not make."""
    if name in ("", BASE_VERSION):
        return 0
    matched = _VERSION.fullmatch(name)
    return int(matched.group(1)) if matched else None


def pack_adapter(model: Any, folder: Path, version: str) -> tuple[Path, str]:
    """`folder/<version>.tar` holding the peft adapter (config + safetensors), and its sha256.
    The archive is written to a temporary name and renamed, so a reader never sees half of it."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as staging:
        model.save_pretrained(staging)
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for name in ADAPTER_FILES:
                info = tar.gettarinfo(os.path.join(staging, name), arcname=name)
                info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
                with open(os.path.join(staging, name), "rb") as f:
                    tar.addfile(info, f)
    data = buffer.getvalue()
    target = folder / f"{version}.tar"
    tmp = folder / f".{version}.tar.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, target)
    return target, hashlib.sha256(data).hexdigest()


def fetch_adapter(version: PolicyVersion, cache: Path) -> Path:
    """Download (or read) the archive, check its sha256, unpack it into `cache/<version>-<hash>/`."""
    target = cache / f"{version.version}-{version.sha256[:16]}"
    if (target / ADAPTER_FILES[1]).is_file():
        return target
    try:
        if version.uri.startswith(("http://", "https://")):
            with urllib.request.urlopen(version.uri, timeout=60) as response:
                data = response.read()
        else:
            path = version.uri
            if path.startswith("file://"):
                path = urllib.request.url2pathname(urllib.parse.urlparse(path).path)
            data = Path(path).read_bytes()
    except (OSError, ValueError) as exc:
        raise Unavailable(f"policy version {version.version}: cannot fetch {version.uri}: {exc}") from exc
    found = hashlib.sha256(data).hexdigest()
    if found != version.sha256:
        raise InvalidArgument(
            f"policy version {version.version}: sha256 of {version.uri} is {found}, the record says "
            f"{version.sha256}; not loading it"
        )
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache))
    try:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            names = sorted(tar.getnames())
            if names != sorted(ADAPTER_FILES):
                raise InvalidArgument(f"the archive holds {names}, not an adapter")
            tar.extractall(staging, filter="data")
    except (tarfile.TarError, InvalidArgument) as exc:
        shutil.rmtree(staging)
        raise InvalidArgument(f"policy version {version.version}: {exc}") from None
    shutil.rmtree(target, ignore_errors=True)
    os.rename(staging, target)
    return target


class KafkaPublisher:
    """Announces versions on the policy-versions topic (one partition: one order for everyone)."""

    def __init__(self, bootstrap: str, topic: str):
        from cai.kafka import client

        self.topic = topic
        self.bootstrap = bootstrap
        self.producer: Any = client.producer(bootstrap, "cai-trainer")

    def publish(self, version: PolicyVersion) -> None:
        """Returns once the record is acknowledged; Unavailable if it is not within 30 s."""
        from cai.kafka import records

        value, headers = records.encode(version.to_proto())
        self.producer.produce(self.topic, value=value, key=version.version.encode(), headers=headers)
        if self.producer.flush(30) > 0:
            raise Unavailable(f"kafka: could not publish {version.version} to {self.topic}")

    def close(self) -> None:
        self.producer.flush(10)


class PolicyServer:
    """Serves the published archives over HTTP (GET only), for services on other machines."""

    def __init__(self, folder: Path, port: int, host: str = "0.0.0.0"):
        folder.mkdir(parents=True, exist_ok=True)
        handler = partial(_QuietHandler, directory=str(folder))
        try:
            self.server = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise Unavailable(f"serve_policies_port: cannot listen on {port}: {exc.strerror}") from exc
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, name="cai-policy-files", daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("policy files: " + format, *args)

    def list_directory(self, path: str | os.PathLike[str]) -> None:
        self.send_error(404)
        return None
