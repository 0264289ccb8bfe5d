"""One service with its stream stage on a FakeBackend, as its own process, for the crash tests:
python tests/kafka/fake_stage.py NAME BOOTSTRAP PREFIX DELAY_S. Exits 0 on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import sys

from cai.backends.fake import FakeBackend
from services.server import start_service
from services.settings import load_settings


async def main(name: str, bootstrap: str, prefix: str, delay_s: float) -> None:
    settings = load_settings(name, None, port=0, metrics_port=0, kafka=bootstrap, kafka_prefix=prefix)  # type: ignore[arg-type]
    service = await start_service(name, settings, FakeBackend(delay_s=delay_s))  # type: ignore[arg-type]
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    await service.stream(settings).run(stopping)
    await service.stop(0)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])))
