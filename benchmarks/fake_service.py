"""One service on the instant `FakeBackend`, in its own process: the load target of `service-overhead`.

`python -m benchmarks.fake_service critique --port 0` starts the service as `cai serve` would (same
settings, same JSON logging at the same level), except that the model is `FakeBackend`, so what a load
generator measures is the gRPC layer, the interceptor, the servicer and the engine's prompt building.
It prints `ready PORT` on stdout once it serves and stops gracefully on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from cai.backends.fake import FakeBackend
from services.observability import setup_logging
from services.server import start_service
from services.settings import SERVICES, ServiceName, load_settings


async def serve(name: ServiceName, port: int, log_level: str) -> None:
    settings = load_settings(name, None, port=port, metrics_port=0, log_level=log_level)
    setup_logging(settings.log_level)
    service = await start_service(name, settings, backend=FakeBackend())
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    print(f"ready {service.port}", flush=True)
    await stopping.wait()
    await service.stop(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("service", choices=SERVICES)
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed when ready)")
    parser.add_argument("--log-level", default="INFO", help="as `cai serve` (INFO logs every RPC)")
    args = parser.parse_args()
    asyncio.run(serve(args.service, args.port, args.log_level))


if __name__ == "__main__":
    main()
