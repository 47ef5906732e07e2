"""``dask-lithops relay``: run a relay server in the foreground."""

from __future__ import annotations

import asyncio
import logging
import signal

import click

from dask_lithops.relay.protocol import TOKEN_ENV
from dask_lithops.relay.server import RelayServer

logger = logging.getLogger("dask_lithops.relay")


@click.command("relay")
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option("--port", default=8788, show_default=True, type=int,
              help="Port to listen on (0 picks a free one; the address is logged).")
@click.option("--token", envvar=TOKEN_ENV, required=True, show_envvar=True,
              help=f"The cluster's relay token (prefer ${TOKEN_ENV}: command lines are "
                   "visible to other users).")
@click.option("--heartbeat", default=5.0, show_default=True, type=float,
              help="Seconds between worker control pings.")
@click.option("--log-level", default="INFO", show_default=True)
def relay(host: str, port: int, token: str, heartbeat: float, log_level: str) -> None:
    """Run a relay for workers that accept no inbound connection (relay:// addresses)."""
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(_serve(host, port, token, heartbeat))


async def _serve(host: str, port: int, token: str, heartbeat: float) -> None:
    server = RelayServer(host=host, port=port, token=token, heartbeat=heartbeat)
    await server.start()
    # The line tests and wrappers wait for; never includes the token.
    print(f"relay listening on {server.address}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.close()
        logger.info("relay stopped")


if __name__ == "__main__":  # python -m dask_lithops.relay.cli
    relay()
