"""A scheduler on an SSH host, tethered to the client's SSH session.

    python -m dask_lithops.standalone.remote_scheduler --payload-file F

The payload (:class:`~dask_lithops.payload.SchedulerPayload`: host, port,
security PEMs, dashboard address, dask config, relay) arrives in a 0600 file,
deleted once read.  With ``relay`` set, a ``relay://`` relay runs in the same
process.  It prints ``DASK_LITHOPS_SCHEDULER {json}`` (address, dashboard port,
relay address, pid) on stdout and runs until stdin reaches EOF -- i.e. until
the SSH session that started it ends, whether the client closed it or died --
or SIGTERM.  The client side is :class:`~dask_lithops.standalone.launchers.RemoteScheduler`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import threading

from dask_lithops.payload import SchedulerPayload

MARK = "DASK_LITHOPS_SCHEDULER"


async def run(payload: SchedulerPayload) -> None:
    import dask.config

    from dask_lithops.payload import security_from_dict
    from dask_lithops.scheduler import LithopsScheduler

    with dask.config.set(payload.config or {}):
        dashboard = payload.dashboard_address
        security = security_from_dict(payload.security)
        scheduler = LithopsScheduler(
            host=payload.host, port=payload.port or 0, protocol=payload.protocol,
            security=security, dashboard=dashboard is not None, dashboard_address=dashboard,
            idle_timeout=payload.idle_timeout)
        await scheduler
        relay = None
        if payload.relay is not None:
            from dask_lithops.relay import RelayServer

            relay = RelayServer(host=payload.relay["host"], port=payload.relay.get("port") or 0,
                                token=security.extra_conn_args["relay_token"])
            await relay.start()
        port = scheduler.services.get("dashboard").port if "dashboard" in scheduler.services \
            else None
        sys.stdout.write(f"{MARK} " + json.dumps({
            "address": scheduler.address, "dashboard_port": port,
            "relay_address": relay.address if relay is not None else None,
            "pid": os.getpid()}) + "\n")
        sys.stdout.flush()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def watch_stdin():
            try:
                while sys.stdin.buffer.read(4096):
                    pass
            finally:
                loop.call_soon_threadsafe(stop.set)

        threading.Thread(target=watch_stdin, daemon=True).start()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, stop.set)
        finished = asyncio.ensure_future(scheduler.finished())
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait([finished, stopper], return_when=asyncio.FIRST_COMPLETED)
        if not finished.done():
            await scheduler.close(reason="dask-lithops: client session ended")
        stopper.cancel()
        if relay is not None:
            await relay.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dask_lithops.standalone.remote_scheduler")
    parser.add_argument("--payload-file", required=True)
    args = parser.parse_args(argv)
    with open(args.payload_file, "rb") as f:
        payload = SchedulerPayload.decode(f.read())
    os.unlink(args.payload_file)  # it holds the TLS key
    asyncio.run(run(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
