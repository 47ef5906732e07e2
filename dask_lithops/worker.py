"""The one worker entry point every mode launches.

    python -m dask_lithops.worker --payload-file PATH   # 0600 file, deleted after reading
    python -m dask_lithops.worker --payload -           # msgpack on stdin
    DASK_LITHOPS_PAYLOAD=<base64 msgpack> python -m dask_lithops.worker

It checks that this runtime matches the client's, then runs a distributed
Nanny (or Worker) until the cluster stops it, its lifetime ends, or its
scheduler has been unreachable for ``death_timeout`` (or refused every connection
for ``REFUSED_GRACE`` before the worker reached it: its cluster closed).  Launchers read two
machine-readable lines on stdout: ``DASK_LITHOPS_READY {json}`` once the
worker is up, ``DASK_LITHOPS_ERROR {json}`` when it cannot start.

``run_worker(payload)`` is the same thing as a function (the FaaS handler calls it).

Why a worker ended reaches the cluster (see :mod:`dask_lithops.failures`): the
worker process reports an error that stops it from running user code (a module
missing while a task is deserialized: this module is also the worker's preload),
the nanny reports how its worker process ended (exit code, signal), and the
entry point reports its own end (lifetime, stop, scheduler lost).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import signal
import sys
import threading
import time
from typing import Any

from dask_lithops.failures import EXIT_REPORT_OP, classify_exception
from dask_lithops.payload import (
    LaunchPayload,
    PayloadError,
    RuntimeMismatch,
    decode,
    decode_b64,
    describe_mismatch,
    runtime_key,
    runtime_mismatch,
    security_from_dict,
)

logger = logging.getLogger("dask_lithops.worker")

READY_MARK = "DASK_LITHOPS_READY"
ERROR_MARK = "DASK_LITHOPS_ERROR"
EXIT_RUNTIME_MISMATCH = 3
EXIT_BAD_PAYLOAD = 2


def check_runtime(payload: LaunchPayload) -> None:
    diff = runtime_mismatch(payload.runtime_key, runtime_key())
    if diff:
        raise RuntimeMismatch(describe_mismatch(diff))


def _server_kwargs(payload: LaunchPayload) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        name=payload.name,
        nthreads=payload.nthreads,
        memory_limit=payload.memory_limit,
        security=security_from_dict(payload.security),
        death_timeout=payload.death_timeout,
        lifetime=payload.lifetime,
        lifetime_stagger=payload.lifetime_stagger,
        lifetime_restart=False,
        local_directory=payload.local_directory,
        resources=payload.resources,
        dashboard=False,
        preload=[*_configured_preloads(), _PRELOAD],
    )
    if payload.host:
        kwargs["host"] = payload.host
    if payload.contact_address:
        kwargs["contact_address"] = payload.contact_address
    if payload.relay:
        from dask_lithops.relay import worker_addresses

        kwargs.update(worker_addresses(payload.relay["address"], payload.relay["worker_id"]))
        # The worker's HTTP server (metrics) would bind the relay's host, which is not
        # an address of this machine outside localhost: keep it on loopback.
        kwargs.setdefault("dashboard_address", "127.0.0.1:0")
    elif payload.listen_address:
        kwargs["listen_address"] = payload.listen_address
    return {k: v for k, v in kwargs.items() if v is not None}


_PRELOAD = "dask_lithops.worker"

# Exit report kinds of a worker whose scheduler is gone: nobody to post the report to.
SCHEDULER_GONE = frozenset({"scheduler-lost", "scheduler-unreachable"})


def _configured_preloads() -> list[str]:
    import dask.config

    value = dask.config.get("distributed.worker.preload", None) or []
    return [value] if isinstance(value, str) else list(value)


# ---------------------------------------------------------------- the worker's preload


class _CannotRunUserCode(logging.Handler):
    """Catches the errors that make a worker drop its scheduler connection (a task
    that cannot be deserialized: missing module or shared library) and reports
    them to the scheduler at once, before the worker goes."""

    def __init__(self, worker):
        super().__init__(logging.ERROR)
        self.worker = worker
        self.sent = False
        self.posting: asyncio.Future | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.sent or not record.exc_info or record.exc_info[1] is None:
            return
        report = classify_exception(record.exc_info[1])
        if report is None:
            return
        self.sent = True
        report["name"] = str(self.worker.name)
        worker = self.worker

        def post():
            self.posting = asyncio.ensure_future(_post_from_worker(worker, report))

        try:
            worker.loop.add_callback(post)
        except Exception:  # the loop is closing: nothing to do
            pass


_LOGGERS_OF_DESERIALIZATION = ("distributed.protocol", "distributed.core", "tornado.application")


def dask_setup(worker) -> None:
    """Preload hook, runs in the worker process (also a nanny's forked/spawned child)."""
    handler = _CannotRunUserCode(worker)
    worker._dask_lithops_report_handler = handler
    for name in _LOGGERS_OF_DESERIALIZATION:
        logging.getLogger(name).addHandler(handler)


async def dask_teardown(worker) -> None:
    handler = getattr(worker, "_dask_lithops_report_handler", None)
    if handler is not None:
        for name in _LOGGERS_OF_DESERIALIZATION:
            logging.getLogger(name).removeHandler(handler)
        if handler.posting is not None:  # the reason goes before the process' final report
            await asyncio.wait([handler.posting], timeout=6)


async def _post_from_worker(worker, report: dict) -> None:
    # a connection of its own: the worker's pool may already be closing
    await post_report(worker.scheduler.address, worker.security, report)


async def post_report(address: str, security, report: dict, timeout: float = 5) -> None:
    """Send an exit report to the scheduler (best effort, bounded)."""
    from distributed.core import rpc

    try:
        async with rpc(address, timeout=timeout,
                       connection_args=security.get_connection_args("worker")) as r:
            await asyncio.wait_for(getattr(r, EXIT_REPORT_OP)(report=report), timeout)
    except Exception as e:  # the cluster may be gone
        logger.info("could not post the exit report: %s", e)


def _nanny_class():
    """A Nanny that tells the scheduler how its worker process ended."""
    from distributed import Nanny
    from distributed.core import Status

    class ReportingNanny(Nanny):
        _memory_kill: dict | None = None

        def log_event(self, topic, msg):
            # the memory monitor logs this, then terminates the worker: the exit that
            # follows is that kill (one report, so no race with a separate event)
            if topic == "worker-restart-memory" and isinstance(msg, dict):
                self._memory_kill = msg
            return super().log_event(topic, msg)

        async def _on_worker_exit(self, exitcode):
            memory_kill, self._memory_kill = self._memory_kill, None
            if self.status not in (Status.init, Status.closing, Status.closed,
                                   Status.closing_gracefully, Status.failed) and exitcode:
                if memory_kill is not None and exitcode < 0:
                    report = {"kind": "out-of-memory", "rss": memory_kill.get("rss"),
                              "limit": self.memory_manager.memory_limit, "signal": -exitcode}
                else:
                    report = ({"kind": "signal", "signal": -exitcode} if exitcode < 0 else
                              {"kind": "exit", "exitcode": exitcode})
                report.update(name=str(self.name), restarted=True)
                self._ongoing_background_tasks.call_soon(
                    post_report, self.scheduler_addr, self.security, report)
            return await super()._on_worker_exit(exitcode)

    return ReportingNanny


def _worker_class():
    """A Worker (no nanny: FaaS) whose close does not wait for running task threads:
    a retired worker's invocation must end at once, not when a task that outlived
    its worker finally returns (the function's hard timeout)."""
    from distributed import Worker

    class PromptWorker(Worker):
        async def close(self, *args, executor_wait: bool = False, **kwargs):
            return await super().close(*args, executor_wait=executor_wait, **kwargs)

    return PromptWorker


class _MemoryWatchdog(threading.Thread):
    """For a worker without a nanny: what the nanny's memory monitor does (terminate at
    ``distributed.worker.memory.terminate`` of the limit), but first tell the
    scheduler why -- a function killed by its platform for memory says nothing."""

    def __init__(self, payload: LaunchPayload, security, limit: int, fraction: float):
        super().__init__(name="dask-lithops-memory-watchdog", daemon=True)
        self.payload, self.security = payload, security
        self.limit, self.fraction = limit, fraction
        self.stopped = threading.Event()

    def run(self) -> None:
        import psutil

        # RSS, as the nanny measures: a sandbox's cgroup usage also counts files in its
        # tmpfs and page cache (an unpacked runtime), which is not the worker's memory
        proc = psutil.Process()
        while not self.stopped.wait(0.01):  # a growing task adds tens of MB per 10 ms at most
            rss = proc.memory_info().rss
            if rss > self.fraction * self.limit:
                logger.error("worker %s uses %d bytes, over %.0f%% of its memory limit %d: "
                             "terminating it", self.payload.name, rss, self.fraction * 100,
                             self.limit)
                report = {"name": self.payload.name, "kind": "out-of-memory",
                          "reason": "out-of-memory", "rss": rss, "limit": self.limit,
                          "final": True}
                try:
                    asyncio.run(post_report(self.payload.scheduler_address, self.security,
                                            report, timeout=2))
                finally:
                    os._exit(137)


def _memory_watchdog(payload: LaunchPayload, security) -> _MemoryWatchdog | None:
    import dask.config
    from dask.utils import parse_bytes

    fraction = dask.config.get("distributed.worker.memory.terminate", 0.95)
    limit = payload.memory_limit
    if payload.nanny or not fraction or limit in (None, "auto", 0):
        return None
    limit = parse_bytes(limit) if isinstance(limit, str) else int(limit)
    watchdog = _MemoryWatchdog(payload, security, limit, float(fraction))
    watchdog.start()
    return watchdog


def _reset_signals_in_child() -> None:
    """A forked worker process must not share the nanny's signal handling: asyncio's
    handler writes the signal to a wakeup socket both processes share, so a SIGTERM
    sent to the worker (the nanny's memory monitor) stopped the nanny instead."""
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    except (ValueError, OSError):
        pass


_at_fork_registered = False


def _dotted(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: the payload's config is a difference from the
    defaults, and ``dask.config.set`` would replace a whole nested section."""
    out = {}
    for key, value in tree.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(_dotted(value, dotted))
        else:
            out[dotted] = value
    return out


def _start_method(payload: LaunchPayload) -> dict:
    """Let the nanny fork its worker: this process is small and fresh, and a fork
    skips a second interpreter start and import of distributed (half a worker's
    start time).  Not on macOS, where fork is unsafe."""
    import dask.config

    method = dask.config.get("lithops.cluster.nanny_start_method", None)
    if not payload.nanny or not method or (method == "fork" and sys.platform == "darwin"):
        return {}
    return {"distributed.worker.multiprocessing-method": method}


async def _scheduler_watchdog(server, payload: LaunchPayload, security) -> bool:
    """Close ``server`` once the scheduler has been unreachable for death_timeout.

    A worker whose scheduler vanished (client SIGKILLed) must not outlive it:
    distributed's own death_timeout covers only the first connection, and a
    nanny would keep restarting its worker.
    """
    from distributed.comm import connect
    from distributed.core import Status

    interval = max(0.5, min(5.0, payload.death_timeout / 4))
    last_ok = time.monotonic()
    args = security.get_connection_args("worker")
    while server.status not in (Status.closing, Status.closed, Status.failed):
        await asyncio.sleep(interval)
        try:
            comm = await connect(payload.scheduler_address, timeout=interval * 2, **args)
            await comm.close()
            last_ok = time.monotonic()
        except (OSError, asyncio.TimeoutError):
            if time.monotonic() - last_ok > payload.death_timeout:
                logger.warning(
                    "Scheduler %s unreachable for %.0fs (death_timeout): closing worker %s",
                    payload.scheduler_address, payload.death_timeout, payload.name)
                await server.close(reason="scheduler-lost")
                return True
        except Exception:  # a TLS or handshake error still means the scheduler is alive
            last_ok = time.monotonic()
    return False


# A worker that has not reached its scheduler yet gives up once every dial of the
# scheduler's address was refused for this long: the host answers, nothing listens (the
# cluster closed, e.g. while this replacement was cold-starting, which nothing can cancel
# on a FaaS platform).  Without this it would retry until death_timeout (60 s), billed.
# Not at the first refusal: our clusters invoke or launch workers only once their
# scheduler (and the relay) listen, and a busy listener drops connections (a full backlog
# times out, it does not refuse), so a refusal is only transient where a forwarder is
# between the worker and the scheduler -- an SSH tunnel being set up again, a port
# forward or proxy restarting -- which takes a second or two.  Three times that still
# ends an orphaned invocation long before death_timeout.
REFUSED_GRACE = 5.0
_DIAL_INTERVAL = 0.5


async def dial_scheduler(address: str, security, timeout: float) -> str | None:
    """None when something answers at the scheduler's ``address`` (TCP, and TLS when the
    security says so: a TLS listener warns about a connection closed before its handshake);
    ``"refused"`` when the host answers that nothing listens there; else why not."""
    import ssl

    from distributed.comm.addressing import parse_address, parse_host_port

    host, port = parse_host_port(parse_address(address)[1])
    ssl_context = security.get_connection_args("worker").get("ssl_context")
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ssl_context,
                                    server_hostname=host if ssl_context else None), timeout)
    except ConnectionRefusedError:
        return "refused"
    except ssl.SSLError:
        return None  # something answers TLS there: the worker's own start reports more
    except asyncio.TimeoutError:
        return f"no answer within {timeout:g}s"
    except OSError as e:
        return (e.strerror or str(e)).lower()
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), 1)
    except (OSError, asyncio.TimeoutError):
        pass
    return None


async def refused_for(address: str, security, grace: float = REFUSED_GRACE,
                      first_wait: float = 0.0) -> None:
    """Return once every dial of ``address`` for ``grace`` seconds was refused (a dial
    that answers, or does not answer at all, starts the count again)."""
    await asyncio.sleep(first_wait)
    refused_since = None
    while True:
        outcome = await dial_scheduler(address, security, timeout=max(1.0, grace / 2))
        now = time.monotonic()
        if outcome != "refused":
            refused_since = None
        elif refused_since is None:
            refused_since = now
        elif now - refused_since >= grace:
            return
        # a scheduler that answers logs each probe ("closed before handshake"): fewer then
        await asyncio.sleep(_DIAL_INTERVAL if outcome == "refused" else grace / 2)


async def _start_unless_refused(server, payload: LaunchPayload, security) -> bool:
    """Start ``server`` (it registers with its scheduler); False, with the server
    closed, when the scheduler refuses connections for ``REFUSED_GRACE`` first.

    distributed retries a refused connection until death_timeout with no way to tell
    it apart from a slow network, so a probe of our own watches the start.  It dials
    only while the start takes longer than a healthy one."""
    starting = asyncio.ensure_future(server.start())
    refused = asyncio.ensure_future(
        refused_for(payload.scheduler_address, security, first_wait=1.0))
    try:
        await asyncio.wait([starting, refused], return_when=asyncio.FIRST_COMPLETED)
    finally:
        refused.cancel()
    if not starting.done() and refused.done() and not refused.cancelled() and \
            refused.exception() is not None:
        # the probe itself broke (an address it cannot dial): the start alone decides
        logger.debug("probing scheduler %s failed: %r", payload.scheduler_address,
                     refused.exception())
        await starting
    if starting.done():
        starting.result()  # its error, if any
        return True
    starting.cancel()
    try:
        await starting
    except (asyncio.CancelledError, Exception):
        pass
    logger.warning("scheduler %s refused connections for %.0fs before worker %s reached it: "
                   "its cluster is closed; not starting the worker",
                   payload.scheduler_address, REFUSED_GRACE, payload.name)
    await server.close(reason="scheduler-unreachable")
    return False


async def run_worker_async(payload: LaunchPayload | dict, on_ready=None) -> dict:
    """Run one worker described by ``payload`` until it stops; return an exit report."""
    if isinstance(payload, dict):
        payload = LaunchPayload.from_dict(payload)
    check_runtime(payload)
    start = time.monotonic()

    import dask.config

    with dask.config.set(_dotted(payload.config or {})), dask.config.set(_start_method(payload)):
        kwargs = _server_kwargs(payload)
        cls = _nanny_class() if payload.nanny else _worker_class()
        server = cls(payload.scheduler_address, **kwargs)
        if not await _start_unless_refused(server, payload, kwargs["security"]):
            return {"name": payload.name, "reason": "scheduler-unreachable",
                    "kind": "scheduler-unreachable", "duration": time.monotonic() - start,
                    "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        address = server.worker_address if payload.nanny else server.address
        if on_ready is not None:
            on_ready({"name": payload.name, "address": address,
                      "contact": getattr(server, "contact_address", None) or address,
                      "pid": os.getpid()})
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        global _at_fork_registered
        if not _at_fork_registered and hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_reset_signals_in_child)
            _at_fork_registered = True
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # not the main thread (e.g. inside a function runtime)
        watchdog = asyncio.create_task(
            _scheduler_watchdog(server, payload, kwargs["security"]))
        memory_watchdog = _memory_watchdog(payload, kwargs["security"])
        finished = asyncio.create_task(server.finished())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait([finished, stopper], return_when=asyncio.FIRST_COMPLETED)
        reason = "finished"
        if stop.is_set() and not finished.done():
            reason = "stopped"
            await server.close(reason="dask-lithops-stop")
        elif watchdog.done() and not watchdog.cancelled() and watchdog.result():
            reason = "scheduler-lost"
        elif payload.lifetime and time.monotonic() - start >= payload.lifetime * 0.95:
            reason = "lifetime"
        watchdog.cancel()
        stopper.cancel()
        if memory_watchdog is not None:
            memory_watchdog.stopped.set()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.remove_signal_handler(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
    return {
        "name": payload.name,
        "reason": reason,
        "kind": reason,
        "duration": time.monotonic() - start,
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def run_worker(payload: LaunchPayload | dict, on_ready=None) -> dict:
    """Blocking form of :func:`run_worker_async` (a fresh event loop)."""
    return asyncio.run(run_worker_async(payload, on_ready=on_ready))


def read_payload(args: argparse.Namespace) -> LaunchPayload:
    if args.payload_file:
        with open(args.payload_file, "rb") as f:
            raw = f.read()
        if not args.keep_payload_file:
            os.unlink(args.payload_file)  # it may hold TLS keys and the relay token
        return decode(raw)
    if args.payload == "-":
        return decode(sys.stdin.buffer.read())
    if args.payload:
        return decode_b64(args.payload)
    if os.environ.get("DASK_LITHOPS_PAYLOAD"):
        return decode_b64(os.environ.pop("DASK_LITHOPS_PAYLOAD"))
    raise PayloadError("no launch payload: give --payload-file, --payload or DASK_LITHOPS_PAYLOAD")


def _emit(mark: str, data: dict) -> None:
    sys.stdout.write(f"{mark} {json.dumps(data)}\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dask_lithops.worker",
                                     description="dask-lithops worker entry point")
    parser.add_argument("--payload-file", help="msgpack launch payload file (deleted after reading)")
    parser.add_argument("--keep-payload-file", action="store_true")
    parser.add_argument("--payload", help="base64 msgpack launch payload, or - for stdin")
    parser.add_argument("--check-runtime", action="store_true",
                        help="print this runtime's key as JSON and exit")
    args = parser.parse_args(argv)
    if args.check_runtime:
        print(json.dumps(runtime_key()))
        return 0
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s - %(name)s - %(levelname)s - %(message)s")
    try:
        payload = read_payload(args)
        report = run_worker(payload, on_ready=lambda info: _emit(READY_MARK, info))
        if report["kind"] not in SCHEDULER_GONE:  # "final": this process ends now
            asyncio.run(post_report(payload.scheduler_address,
                                    security_from_dict(payload.security),
                                    {**report, "final": True}))
    except PayloadError as e:
        _emit(ERROR_MARK, {"type": "PayloadError", "message": str(e)})
        return EXIT_BAD_PAYLOAD
    except RuntimeMismatch as e:
        _emit(ERROR_MARK, {"type": "RuntimeMismatch", "message": str(e)})
        return EXIT_RUNTIME_MISMATCH
    except Exception as e:
        logger.exception("worker failed")
        _emit(ERROR_MARK, {"type": type(e).__name__, "message": str(e)})
        return 1
    logger.info("worker %s stopped: %s", report["name"], report["reason"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
