"""A scheduler on an SSH host, tethered to the client's SSH session.

    python -m dask_lithops.standalone.remote_scheduler --payload-file F

The payload (msgpack: host, port, security PEMs, dashboard address, dask
config) arrives in a 0600 file, deleted once read.  It prints
``DASK_LITHOPS_SCHEDULER {json}`` (address, dashboard port, pid) on stdout and
runs until stdin reaches EOF -- i.e. until the SSH session that started it ends,
whether the client closed it or died -- or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import threading

import msgpack

MARK = "DASK_LITHOPS_SCHEDULER"


async def run(payload: dict) -> None:
    import dask.config
    from distributed import Scheduler

    from dask_lithops.payload import security_from_dict

    with dask.config.set(payload.get("config") or {}):
        dashboard = payload.get("dashboard_address")
        scheduler = Scheduler(
            host=payload["host"], port=payload.get("port") or 0,
            protocol=payload.get("protocol"),
            security=security_from_dict(payload.get("security")),
            dashboard=dashboard is not None, dashboard_address=dashboard,
            idle_timeout=payload.get("idle_timeout"))
        await scheduler
        port = scheduler.services.get("dashboard").port if "dashboard" in scheduler.services \
            else None
        sys.stdout.write(f"{MARK} " + json.dumps({"address": scheduler.address,
                                                  "dashboard_port": port,
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dask_lithops.standalone.remote_scheduler")
    parser.add_argument("--payload-file", required=True)
    args = parser.parse_args(argv)
    with open(args.payload_file, "rb") as f:
        payload = msgpack.unpackb(f.read(), raw=False)
    os.unlink(args.payload_file)  # it holds the TLS key
    asyncio.run(run(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
