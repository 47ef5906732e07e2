"""What every backend's function entry point runs (the platform adapters live in
``backends/<name>/handler.py`` and call :func:`handle_event`).

Events (JSON):

* ``{"dask_lithops": "metadata"}`` -> this runtime's key (versions), no worker.
  With ``"dial": ["host:port", ...]`` (and ``"dial_timeout": s``) it also says
  whether the function can open a TCP connection to each address: ``"dial":
  {"host:port": null | "<why not>"}`` (the cluster's reachability check).
* ``{"dask_lithops": "worker", "payload": <base64 msgpack LaunchPayload>,
  "not_after": <epoch s>}`` -> runs one worker (no nanny) until the cluster
  stops it, its lifetime ends or the scheduler is lost; returns the exit report
  and also posts it to the scheduler (Event invocations' results go nowhere).

A worker invocation never raises: a raised error would make a platform retry
the event, i.e. start a duplicate worker.

The exit report's ``timeline`` holds epoch seconds of the cold path: the
process' start, this module loaded, the handler called, the worker's imports
done, the scheduler found reachable, the worker registered.
"""

from __future__ import annotations

import time

_MODULE_LOADED = time.time()  # dask_lithops' package imports are done by now

import asyncio  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402

logger = logging.getLogger("dask_lithops.serverless.handler")


def _process_start() -> float | None:
    """When this process started (epoch s, 10 ms resolution): the environment's start."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - age
    except (OSError, ValueError, IndexError, AttributeError):
        return None


_PROCESS_START = _process_start()

EXIT_REPORT_OP = "dask_lithops_worker_exit"
_SAFETY = 3.0  # seconds kept between the worker's end and the function's deadline


def _setup_logging() -> None:
    root = logging.getLogger()
    if not any(getattr(h, "_dask_lithops", False) for h in root.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s"))
        h._dask_lithops = True
        root.addHandler(h)
        root.setLevel(logging.INFO)
        logging.getLogger("distributed.utils_perf").setLevel(logging.ERROR)


def metadata(event: dict | None = None, memory_mb: int | None = None) -> dict:
    from dask_lithops.payload import runtime_key

    out = {"runtime_key": runtime_key(), "machine": platform.machine(),
           "memory_mb": memory_mb, "runtime": os.environ.get("DASK_LITHOPS_RUNTIME"),
           "python": sys.version.split()[0]}
    targets = (event or {}).get("dial")
    if targets:
        timeout = float((event or {}).get("dial_timeout") or 5.0)
        out["dial"] = asyncio.run(_dial_all([str(t) for t in targets], timeout))
    return out


async def _dial_all(targets: list[str], timeout: float) -> dict[str, str | None]:
    results = await asyncio.gather(*(_dial(t, timeout) for t in targets))
    return dict(zip(targets, results))


async def _dial(target: str, timeout: float) -> str | None:
    """None when a TCP connection to ``host:port`` opens within ``timeout``, else why not."""
    from distributed.comm.addressing import parse_host_port

    try:
        host, port = parse_host_port(target.split("://")[-1])
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except asyncio.TimeoutError:
        return f"no answer within {timeout:g}s"
    except ConnectionRefusedError:
        return "connection refused"
    except OSError as e:
        return (e.strerror or str(e)).lower()
    except ValueError as e:
        return f"invalid address: {e}"
    writer.close()
    return None


def handle_event(event, *, remaining: float | None, memory_mb: int | None,
                 request_id: str | None) -> dict:
    """Run one event.

    remaining:
        seconds until the platform kills the invocation (None: no deadline known)
    memory_mb:
        the function's memory (the worker's memory limit when the payload says auto)
    request_id:
        the platform's id of this invocation (in the exit report)
    """
    if not isinstance(event, dict) or "dask_lithops" not in event:
        return {"error": "not a dask-lithops event"}
    kind = event["dask_lithops"]
    if kind == "metadata":
        return metadata(event, memory_mb)
    if kind != "worker":
        return {"error": f"unknown dask-lithops event {kind!r}"}
    _setup_logging()
    start = time.time()
    deadline = time.monotonic() + remaining if remaining is not None else None
    try:
        return asyncio.run(_run(event, deadline, memory_mb or 0, request_id, start))
    except BaseException as e:  # noqa: BLE001 -- see the module docstring
        logger.exception("dask-lithops worker failed")
        return {"reason": "error", "error": f"{type(e).__name__}: {e}",
                "duration": time.time() - start}


async def _run(event: dict, deadline: float | None, memory_mb: int, request_id: str | None,
               start: float) -> dict:
    timeline = {"process_start": _PROCESS_START, "module_loaded": _MODULE_LOADED,
                "handler": start}
    from dask_lithops.payload import RuntimeMismatch, decode_b64, security_from_dict
    from dask_lithops.worker import SCHEDULER_GONE, run_worker_async

    timeline["imports"] = time.time()
    if event.get("not_after") and time.time() > float(event["not_after"]):
        logger.info("worker event expired before it started: not starting it")
        return {"reason": "expired", "duration": 0.0}
    payload = decode_b64(event["payload"])
    if payload.memory_limit in (None, "auto") and memory_mb:
        payload.memory_limit = memory_mb * 1024 * 1024
    if deadline is not None:
        # never let the platform kill the worker: retire before the deadline
        cap = max(1.0, deadline - time.monotonic() - _SAFETY)
        payload.lifetime = min(payload.lifetime or cap, cap)
        payload.lifetime_stagger = min(payload.lifetime_stagger or 0, payload.lifetime / 10)
    security = security_from_dict(payload.security)
    if not await _scheduler_reachable(payload, security):
        logger.warning("scheduler %s unreachable: not starting worker %s",
                       payload.scheduler_address, payload.name)
        return {"name": payload.name, "reason": "scheduler-unreachable",
                "duration": time.time() - start, "request_id": request_id}
    timeline["reachable"] = time.time()
    try:
        report = await run_worker_async(
            payload, on_ready=lambda info: timeline.setdefault("registered", time.time()))
    except RuntimeMismatch as e:
        report = {"name": payload.name, "reason": "runtime-mismatch", "kind": "error",
                  "error": str(e)}
    report["final"] = True  # the invocation returns now
    report["duration"] = time.time() - start
    report["started"] = start
    report["timeline"] = timeline
    report["memory_mb"] = memory_mb
    report["request_id"] = request_id
    if report.get("kind") not in SCHEDULER_GONE:  # else a post would retry for seconds
        await _post_report(payload, security, report)
    return report


async def _scheduler_reachable(payload, security, timeout: float = 10.0) -> bool:
    """A worker event that starts after its cluster closed must end at once: False when
    the scheduler does not answer for ``min(timeout, death_timeout)``, or refuses every
    connection for ``REFUSED_GRACE`` (see there why not at the first refusal)."""
    from dask_lithops.worker import REFUSED_GRACE, dial_scheduler

    deadline = time.monotonic() + min(timeout, payload.death_timeout or timeout)
    refused_since = None
    while True:
        outcome = await dial_scheduler(payload.scheduler_address, security, timeout=3)
        if outcome is None:
            return True
        now = time.monotonic()
        if outcome == "refused":  # the host answers: nothing listens there (now)
            refused_since = refused_since or now
            if now - refused_since >= REFUSED_GRACE:
                return False
        else:
            refused_since = None
            if now > deadline:
                return False
        await asyncio.sleep(0.5)


async def _post_report(payload, security, report: dict) -> None:
    from distributed.core import rpc

    try:
        async with rpc(payload.scheduler_address, timeout=5,
                       connection_args=security.get_connection_args("worker")) as r:
            await asyncio.wait_for(getattr(r, EXIT_REPORT_OP)(report=report), 5)
    except Exception as e:  # the cluster may be gone: the report is best effort
        logger.info("could not post the exit report: %s", e)
