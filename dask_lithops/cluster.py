"""The shared base of the three modes, on ``distributed.SpecCluster``.

A mode is a :class:`LithopsCluster` subclass that names its config section and
its :class:`WorkerLauncher` (one spec entry = one launch of the worker entry
point, :mod:`dask_lithops.worker`).  The base owns what every mode shares:
option resolution, the launch payload, TLS and the relay, graceful scale-down
by worker name, logs, and lost workers: a worker that ends unexpectedly (crash,
out of memory, signal, a module its tasks need is missing) is detected (the
scheduler's worker stream, or its launcher's :meth:`WorkerLauncher.report_end`),
its reason recorded in :attr:`LithopsCluster.worker_failures` and logged once,
and it is replaced under a new name, up to ``lithops.cluster.crash_loop_limit``
failures in a row; past that, computations waiting for workers fail with
:class:`~dask_lithops.failures.WorkerFailureError` (see :mod:`dask_lithops.failures`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import sys
import time
import uuid
import weakref
from typing import ClassVar

import dask
import dask.config
from dask.utils import parse_timedelta
from distributed.core import Status
from distributed.deploy.spec import ProcessInterface, SpecCluster
from distributed.security import Security
from distributed.utils import import_term

from dask_lithops import config, progress
from dask_lithops.failures import (
    FAIL_WAITING_OP,
    PLANNED,
    PLUGIN_NAME,
    REPORTS_OP,
    FailureMonitor,
    WorkerFailure,
    WorkerFailureError,
    describe,
)
from dask_lithops.payload import LaunchPayload, security_to_dict
from dask_lithops.scheduler import LithopsScheduler

logger = logging.getLogger(__name__)

_LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
               "error": logging.ERROR, "critical": logging.CRITICAL}


class _Unset:
    def __repr__(self):
        return "<unset>"


UNSET = _Unset()  # keyword not given (None can mean "off", e.g. dashboard_address=None)


class WorkerLaunchError(RuntimeError):
    """A worker could not be started; the message says where and why."""


class ClusterClosedError(RuntimeError):
    """The cluster was closed: it cannot be scaled, entered or asked for logs."""


__all__ = ["LithopsCluster", "WorkerLauncher", "WorkerLaunchError", "ClusterClosedError",
           "WorkerFailure", "WorkerFailureError"]


class WorkerLauncher(ProcessInterface):
    """One spec entry: launches the worker entry point somewhere, stops it on close.

    Subclasses implement :meth:`launch` and :meth:`stop` (and optionally
    :meth:`logs`); they never block the event loop (blocking SDKs go to a thread).
    """

    def __init__(self, scheduler: str, name: str, cluster: weakref.ref):
        super().__init__(scheduler=scheduler, name=name)
        self.scheduler = scheduler
        self.name = name
        self.cluster_ref = cluster
        self.payload: LaunchPayload | None = None

    @property
    def cluster(self) -> LithopsCluster:
        cluster = self.cluster_ref()
        if cluster is None:
            raise RuntimeError(f"worker {self.name}: its cluster is gone")
        return cluster

    async def start(self) -> None:
        self.payload = self.cluster.launch_payload(self.name)
        await self.launch(self.payload)
        await super().start()

    async def close(self) -> None:
        try:
            if self.status != Status.closed:
                await self.stop()
        finally:
            await super().close()

    async def launch(self, payload: LaunchPayload) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    def logs(self) -> str | None:
        return None

    def report_end(self, report: dict | None = None) -> None:
        """Tell the cluster this launch's worker(s) ended on their own (not by stop()).

        ``report`` says why as far as the launcher knows, e.g. ``{"kind": "exit",
        "exitcode": 1}``, ``{"kind": "signal", "signal": 9}``, ``{"kind":
        "out-of-memory", "limit": 2 ** 30}``, ``{"kind": "timeout"}``; the cluster
        merges it with what the worker itself reported to the scheduler.
        """
        cluster = self.cluster_ref()
        if cluster is not None and self.status != Status.closed:
            cluster.worker_ended(self.name, report)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}: status={self.status.name}>"


def inherited_config() -> dict:
    """The client's dask config as workers need it: what differs from the defaults.

    Workers run the same package versions (the runtime key is checked), so
    they have the same defaults; sending only the difference keeps the launch
    payload small (a few hundred bytes instead of ~40 KB), which matters for
    FaaS invocation rate and payload limits.
    """
    import msgpack

    defaults = dask.config.merge(*dask.config.defaults)
    diff = _without_secrets(_config_diff(dask.config.config, defaults))
    out = {}
    for key, value in diff.items():
        try:
            msgpack.packb(value, use_bin_type=True)
        except (TypeError, ValueError):
            continue
        out[key] = value
    return out


_SECRET_KEY = re.compile(r"(secret|password|passphrase|token|access[-_]key|credential|private[-_]key)",
                         re.IGNORECASE)


def _without_secrets(config: dict) -> dict:
    """The config less every key that names a credential (at any depth).

    Workers get their cloud credentials from where they run (a function's role,
    a VM's instance profile), never from the client: a key copied into the
    launch payload would reach every invocation event, host file and log.
    """
    out = {}
    for key, value in config.items():
        if _SECRET_KEY.search(str(key)):
            continue
        out[key] = _without_secrets(value) if isinstance(value, dict) else value
    return out


def _config_diff(config: dict, defaults: dict) -> dict:
    out = {}
    for key, value in config.items():
        base = defaults.get(key, _MISSING)
        if isinstance(value, dict) and isinstance(base, dict):
            sub = _config_diff(value, base)
            if sub:
                out[key] = sub
        elif base is _MISSING or base != value:
            out[key] = value
    return out


_MISSING = object()


class LithopsCluster(SpecCluster):
    """Base of LocalhostCluster, ServerlessCluster and StandaloneCluster.

    Parameters shared by every mode (each falls back to ``lithops.cluster.*``):

    n_workers: int
        Workers to start with.
    threads_per_worker, memory_limit, nanny:
        As for ``distributed.LocalCluster``.
    security: Security or bool, tls: bool
        ``True``/``tls=True`` makes temporary TLS certificates; a
        ``Security`` is used as given.
    relay: bool
        Run workers behind the ``relay://`` comm (they accept no inbound connection).
    death_timeout, lifetime, lifetime_stagger:
        Worker exits this long after losing its scheduler; retires after ``lifetime``.
    dashboard_address, scheduler_host, scheduler_port, contact_address, scheduler_options:
        Where the in-process scheduler listens and the address workers dial.
    quiet: bool
        No console line per start-up phase (``lithops.cluster.quiet``); see
        :mod:`dask_lithops.progress`.
    """

    mode: ClassVar[str] = ""
    launcher: ClassVar[type[WorkerLauncher]] = WorkerLauncher
    name_prefix: ClassVar[str] = "worker"
    default_tls: ClassVar[bool] = True
    default_scheduler_host: ClassVar[str] = "127.0.0.1"

    def __init__(
        self,
        n_workers: int | None = None,
        *,
        threads_per_worker: int | None = None,
        memory_limit: str | int | None = "auto",
        nanny: bool = True,
        security: Security | bool | None = None,
        tls: bool | None = None,
        relay: bool = False,
        death_timeout: str | float | None = None,
        lifetime: str | float | None = None,
        lifetime_stagger: str | float | None = None,
        dashboard_address: str | None | _Unset = UNSET,
        scheduler_host: str | None = None,
        scheduler_port: int | None = None,
        contact_address: str | None = None,
        scheduler_options: dict | None = None,
        worker_options: dict | None = None,
        name: str | None = None,
        asynchronous: bool = False,
        loop=None,
        silence_logs: str | int | bool | None = None,
        shutdown_on_close: bool = True,
        worker_start_timeout: str | float | None = None,
        quiet: bool | None = None,
        crash_loop_limit: int | None = None,
    ):
        dashboard_disabled = dashboard_address is None  # an explicit None turns it off
        if dashboard_address is UNSET or dashboard_disabled:
            dashboard_address = None
        opts = config.section(
            "cluster", death_timeout=death_timeout, lifetime=lifetime,
            lifetime_stagger=lifetime_stagger, dashboard_address=dashboard_address,
            scheduler_host=scheduler_host, scheduler_port=scheduler_port,
            contact_address=contact_address, tls=tls, name=name,
            silence_logs=silence_logs, worker_start_timeout=worker_start_timeout, quiet=quiet,
            crash_loop_limit=crash_loop_limit,
        )
        if getattr(self, "progress", None) is None:  # a mode may make it earlier (for_cluster)
            self.progress = progress.for_cluster(opts["quiet"], opts["silence_logs"])
        if n_workers is not None and (not isinstance(n_workers, int) or n_workers < 0):
            raise config.ConfigError(f"n_workers = {n_workers!r} is invalid; allowed: integer >= 0")
        if threads_per_worker is not None and (
                not isinstance(threads_per_worker, int) or threads_per_worker < 1):
            raise config.ConfigError(
                f"threads_per_worker = {threads_per_worker!r} is invalid; allowed: integer >= 1")
        self.death_timeout = parse_timedelta(opts["death_timeout"])
        self.lifetime = parse_timedelta(opts["lifetime"]) if opts["lifetime"] else None
        self.lifetime_stagger = parse_timedelta(opts["lifetime_stagger"] or 0)
        self.worker_start_timeout = parse_timedelta(opts["worker_start_timeout"])
        self.nthreads = threads_per_worker or 1
        self.memory_limit = memory_limit
        self.nanny = nanny
        self.relay_enabled = bool(relay)
        self.relay_address: str | None = None
        self._relay_server = None
        self.contact_host = opts["contact_address"]
        self.worker_options = dict(worker_options or {})
        self.cluster_id = uuid.uuid4().hex[:10]
        self._local_code = None  # LocalCodeSync once started
        self._registration_report: asyncio.Future | None = None  # the "starting N workers" phase
        self.crash_loop_limit = int(opts["crash_loop_limit"])
        self.worker_failures: list[WorkerFailure] = []  # every unexpected end, with its reason
        self._failures_in_a_row = 0
        self._progress_mark = 0  # tasks finished (scheduler count) at the last failure
        self._logged_causes: set = set()
        self._gave_up: str | None = None
        self._ended: dict[str, dict] = {}  # spec name -> its launcher's end report
        self._down_checks: dict[str, asyncio.Task] = {}
        self._left_again: dict[str, str] = {}  # left again while its last end was checked
        self._reports_seen: dict[str, int] = {}  # worker name -> last report seq handled
        self._background: set[asyncio.Future] = set()
        self._names_used: set[str] = set()

        use_tls = opts["tls"] if opts["tls"] is not None else self.default_tls
        if isinstance(security, Security):
            self._security = security
        elif security is True or (security is None and use_tls):
            self._security = Security.temporary()
        else:
            self._security = Security()
        if self.relay_enabled:  # a copy: never put our token in the caller's Security
            from dask_lithops.relay import new_token, relay_security

            self._security = relay_security(new_token(), self._security)

        scheduler_options = dict(scheduler_options or {})
        scheduler_host = opts["scheduler_host"] or self.default_scheduler_host
        scheduler_spec = {
            "cls": LithopsScheduler,
            "options": {
                "host": scheduler_host,
                "port": opts["scheduler_port"],
                "protocol": "tls://" if self._security.require_encryption else "tcp://",
                "security": self._security,
                "dashboard_address": opts["dashboard_address"],
                "dashboard": (_dashboard_available() and not dashboard_disabled
                              and opts["dashboard_address"] is not None),
                **scheduler_options,
            },
        }
        if not scheduler_spec["options"]["dashboard"]:
            # no dashboard: the http server (health, metrics) still runs; a random
            # port keeps it off :8787 so it never collides with a real dashboard
            scheduler_spec["options"]["dashboard_address"] = ":0"
        self._worker_template = {"cls": self.launcher,
                                 "options": {"cluster": weakref.ref(self)}}
        level = opts["silence_logs"]
        level = _LOG_LEVELS.get(level, level) if isinstance(level, str) else level
        initial = {self._new_worker_name(i): self._worker_template for i in range(n_workers or 0)}
        super().__init__(
            workers=initial,
            scheduler=scheduler_spec,
            worker=self._worker_template,
            asynchronous=asynchronous,
            loop=loop,
            security=self._security,
            silence_logs=level or False,
            name=opts["name"],
            shutdown_on_close=shutdown_on_close,
        )

    # ------------------------------------------------------------------ lifecycle

    async def _start(self):
        await super()._start()
        from distributed.protocol.pickle import dumps

        # over RPC, not scheduler.add_plugin: the scheduler may run elsewhere
        await self.scheduler_comm.register_scheduler_plugin(
            plugin=dumps(FailureMonitor(mode=self.mode, limits=self.failure_limits())),
            name=PLUGIN_NAME, idempotent=True)
        # a scheduler on another host may run the relay beside it (RemoteScheduler(relay=...))
        remote_relay = getattr(self.scheduler, "relay_address", None)
        if self.relay_enabled and remote_relay:
            self.relay_address = remote_relay
        elif self.relay_enabled and self._relay_server is None:
            from dask_lithops.relay import RelayServer

            relay_host = config.get("relay.host") or \
                self.scheduler_spec["options"].get("host") or "127.0.0.1"
            self._relay_server = RelayServer(
                host=relay_host, port=config.get("relay.port"),
                token=self._security.extra_conn_args["relay_token"])
            await self._relay_server.start()
            self.relay_address = self._relay_contact_address(self._relay_server.address)

        if self._local_code is None and config.get("runtime.local_code"):
            await self._start_local_code_sync()
        if self._registration_report is None and self.worker_spec:
            self._registration_report = asyncio.ensure_future(self._report_registrations())

    async def _report_registrations(self) -> None:
        """One progress phase until the first workers registered (a bar on a terminal)."""
        expected = sum(len(self._members(n)) for n in self.worker_spec)
        deadline = asyncio.get_running_loop().time() + self.worker_start_timeout
        with self.progress.phase(f"starting {expected} workers", total=expected,
                                 unit="workers") as phase:
            seen = 0
            try:
                while seen < expected and asyncio.get_running_loop().time() < deadline:
                    await asyncio.sleep(0.2)
                    if self.status != Status.running:
                        break
                    now = min(expected, len(self.scheduler_info.get("workers", {})))
                    if now > seen:
                        phase.advance(now - seen)
                        seen = now
            except asyncio.CancelledError:
                pass
            phase.detail = f"{seen} of {expected} registered"

    async def _start_local_code_sync(self) -> None:
        """Ship the client's local modules now and whenever they change (docs/runtime.md)."""
        from tornado.ioloop import PeriodicCallback

        from dask_lithops.runtime.local_code import LocalCodeSync

        self._local_code = LocalCodeSync(self)
        try:
            await self._local_code.sync()
        except ValueError as e:  # too big to ship: say so; the workers' import error names it
            logger.warning("%s", e)
        busy = []

        async def rescan():
            if busy or self.status != Status.running:
                return
            busy.append(1)
            try:
                await self._local_code.sync()
            except Exception as e:  # noqa: BLE001 -- keep scanning; the reason is logged
                logger.warning("shipping local modules to the workers failed: %s", e)
            finally:
                busy.clear()

        pc = PeriodicCallback(rescan, 1000)
        self.periodic_callbacks["dask-lithops-local-code"] = pc
        pc.start()

    async def _close(self):
        if self._registration_report is not None:
            self._registration_report.cancel()
        for task in list(self._down_checks.values()):
            task.cancel()
        try:
            await super()._close()
        finally:
            if self._background:  # launchers of dead workers being closed
                await asyncio.wait(list(self._background), timeout=30)
        if self._relay_server is not None:
            await self._relay_server.close()
            self._relay_server = None

    async def _correct_state_internal(self) -> None:
        # SpecCluster retires with `workers=<names>`, but the scheduler's `workers=`
        # takes addresses, so nothing was retired gracefully (data on removed workers
        # was lost): retire by name.  The retirement, the close and `to_close` itself
        # belong to one hold of the lock: a scale-down arriving while an earlier one
        # retires would otherwise have its workers closed unretired (keys recomputed).
        async with self._lock:
            self._correct_state_waiting = None
            to_close = set(self.workers) - set(self.worker_spec)
            if to_close:
                if self.scheduler.status == Status.running and self.status == Status.running:
                    names = self._scheduler_names(to_close)
                    if names:
                        await self.scheduler_comm.retire_workers(names=names)
                await asyncio.gather(*(self.workers[w].close() for w in to_close
                                       if w in self.workers))
            for name in to_close:
                self.workers.pop(name, None)
            await self._open_launchers()

    async def _open_launchers(self) -> None:
        """Start a launcher for each spec entry without one (SpecCluster's own code)."""
        to_open = set(self.worker_spec) - set(self.workers)
        workers = []
        for name in to_open:
            d = self.worker_spec[name]
            cls, opts = d["cls"], dict(d.get("options", {}))
            opts.setdefault("name", name)
            if isinstance(cls, str):
                cls = import_term(cls)
            worker = cls(getattr(self.scheduler, "contact_address", None)
                         or self.scheduler.address, **opts)
            self._created.add(worker)
            workers.append(worker)
        if workers:
            futures = [asyncio.ensure_future(w) for w in workers]
            await asyncio.wait(futures)
            self.workers.update(dict(zip(to_open, workers)))
            for w in workers:
                w._cluster = weakref.ref(self)
            await asyncio.gather(*futures)  # raise a failed start after all have settled

    def _scheduler_names(self, spec_names) -> list[str]:
        """Worker names (as the scheduler knows them) of the given spec entries."""
        out = []
        for name in spec_names:
            spec = self.worker_spec.get(name) or {}
            group = spec.get("group")
            if group:
                out.extend(str(name) + suffix for suffix in group)
            else:
                out.append(str(name))
        registered = {w.get("name") for w in self.scheduler_info.get("workers", {}).values()}
        if hasattr(self.scheduler, "workers"):  # in-process scheduler: exact and current
            registered = {ws.name for ws in self.scheduler.workers.values()}
        return [n for n in out if n in registered or not registered]

    def _new_worker_name(self, worker_number: int) -> str:
        return f"{self.name_prefix}-{worker_number}"

    def new_worker_spec(self):
        # Never reuse a name: reports, logs and failures are per name, and an old
        # worker of that name may still be leaving.
        while True:
            name = self._new_worker_name(self._i)
            self._i += 1
            if name not in self.worker_spec and name not in self._names_used:
                return {name: self.new_spec}

    # ------------------------------------------------------------------ use after close

    def _check_open(self, what: str, closing_ok: bool = False) -> None:
        if self.status == Status.closed or (self.status == Status.closing and not closing_ok):
            raise ClusterClosedError(f"{type(self).__name__} {self.name!r} is closed: cannot "
                                     f"{what}; create a new cluster")

    def scale(self, n=0, memory=None, cores=None):
        self._check_open("scale()", closing_ok=True)  # SpecCluster._close scales to 0
        if n and n > len(self.worker_spec) and self._gave_up:
            # the user asks for workers again: a new crash-loop budget
            self._gave_up, self._failures_in_a_row = None, 0
        return super().scale(n, memory=memory, cores=cores)

    def __enter__(self):
        self._check_open("enter a `with` block")
        return super().__enter__()

    async def __aenter__(self):
        self._check_open("enter an `async with` block")
        return await super().__aenter__()

    def get_logs(self, cluster=True, scheduler=True, workers=True):
        self._check_open("get_logs()")
        return super().get_logs(cluster=cluster, scheduler=scheduler, workers=workers)

    # ------------------------------------------------------------------ lost workers

    def _update_worker_status(self, op, msg):
        # the scheduler's worker stream (also when the scheduler runs elsewhere)
        if op == "remove":
            name = (self.scheduler_info.get("workers", {}).get(msg) or {}).get("name")
            super()._update_worker_status(op, msg)
            if name is not None:
                self._worker_left(str(name))
            return
        if op == "add":
            for info in msg.get("workers", {}).values():
                if info.get("name") is not None:
                    self._names_used.add(str(info["name"]))
        super()._update_worker_status(op, msg)

    def worker_ended(self, spec_name: str, report: dict | None = None) -> None:
        """A launcher's worker(s) ended on their own; see :meth:`WorkerLauncher.report_end`."""
        self._ended[spec_name] = dict(report or {})
        self._worker_left(spec_name, spec_name)

    def _spec_name_of(self, worker_name: str) -> str | None:
        if worker_name in self.worker_spec:
            return worker_name
        for name, spec in self.worker_spec.items():
            if any(str(name) + suffix == worker_name for suffix in spec.get("group") or ()):
                return name
        return None

    def _members(self, spec_name: str) -> list[str]:
        group = (self.worker_spec.get(spec_name) or {}).get("group")
        return [str(spec_name) + s for s in group] if group else [str(spec_name)]

    def _registered_names(self) -> set[str]:
        return {str(w.get("name")) for w in self.scheduler_info.get("workers", {}).values()}

    def _worker_left(self, worker_name: str, spec_name: str | None = None) -> None:
        if self.status != Status.running:
            return
        spec_name = spec_name or self._spec_name_of(worker_name)
        if spec_name is None:
            return
        if worker_name in self._down_checks:
            self._left_again[worker_name] = spec_name
            return
        task = asyncio.ensure_future(self._check_down(spec_name, worker_name))
        self._down_checks[worker_name] = task
        task.add_done_callback(lambda _: self._check_done(worker_name))

    def _check_done(self, worker_name: str) -> None:
        self._down_checks.pop(worker_name, None)
        again = self._left_again.pop(worker_name, None)
        if again is not None:
            self._worker_left(worker_name, again if again in self.worker_spec else None)

    @property
    def restart_grace(self) -> float:
        """How long a worker that left may take to come back (its nanny restarts it)."""
        return 10.0 if self.nanny else 3.0

    async def _check_down(self, spec_name: str, worker_name: str) -> None:
        """Worker ``worker_name`` (of spec entry ``spec_name``) left the scheduler, or its
        launcher ended: record why, then replace it, or give up (crash loop)."""
        try:
            deadline = time.monotonic() + self.restart_grace
            back = False
            while time.monotonic() < deadline and self.status == Status.running:
                if spec_name in self._ended or spec_name not in self.worker_spec:
                    break  # its process is gone, or it was replaced/scaled down meanwhile
                if worker_name in self._registered_names():
                    back = True  # its nanny restarted it
                    break
                events = (await self._fetch_reports(worker_name, consume=False))[0]
                if events and (not self.nanny or any(e.get("final") for e in events)):
                    break  # it said why it ended, and its process has ended
                await asyncio.sleep(0.25)
            if self.status != Status.running:
                return
            if back:  # a nanny's report (memory kill, exit code) may arrive after the restart
                report_deadline = time.monotonic() + 2
                while time.monotonic() < report_deadline and \
                        not (await self._fetch_reports(worker_name, consume=False))[0]:
                    await asyncio.sleep(0.1)
            events, completed = await self._fetch_reports(worker_name)
            ended = self._ended.get(spec_name)
            if ended is not None:  # the launcher's word completes the worker's last report
                events = events[:-1] + [{**ended, **(events[-1] if events else {})}]
            if not events:
                if back:
                    return  # left and came back, nothing reported (client.restart())
                events = [{}]  # left without a word
            failures = [describe(worker_name, e, mode=self.mode, limits=self.failure_limits())
                        for e in events if e.get("kind") not in PLANNED]
            for failure in failures:
                self._record(failure)
            if back:
                return  # restarted by its nanny: not lost (dask's allowed-failures bounds the task)
            if failures and completed != self._progress_mark:
                self._progress_mark, self._failures_in_a_row = completed, 0
            self._failures_in_a_row += len(failures)
            if spec_name not in self.worker_spec:
                return  # replaced or removed already (another member of its group)
            if ended is None and set(self._members(spec_name)) & self._registered_names():
                return  # the rest of its group lives on
            if not failures:
                logger.info("worker %s ended (%s); starting a new one", worker_name,
                            events[-1].get("kind"))
                self._replace(spec_name, quiet=True)
            elif self._failures_in_a_row >= self.crash_loop_limit or self._gave_up:
                await self._give_up(spec_name, failures[-1])
            elif await self._replaceable(spec_name):
                self._replace(spec_name)
            else:
                self.worker_spec.pop(spec_name, None)
                self._drop_launcher(spec_name)
                logger.warning("worker %s is gone and cannot be replaced where it ran",
                               spec_name)
                self._correct_state()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("handling the end of worker %s failed", worker_name)
        finally:
            self._ended.pop(spec_name, None)

    async def _fetch_reports(self, worker_name: str, consume: bool = True
                             ) -> tuple[list[dict], int]:
        """New reports about ``worker_name`` (from itself, its nanny, its launcher) that
        reached the scheduler's FailureMonitor, and the scheduler's finished-task count."""
        since = self._reports_seen.get(worker_name, 0)
        try:
            out = await asyncio.wait_for(
                getattr(self.scheduler_comm, REPORTS_OP)(names=[worker_name], since=since), 10)
        except Exception as e:
            logger.debug("reading worker reports failed: %s", e)
            return [], self._progress_mark
        events = list((out.get("reports") or {}).get(worker_name) or ())
        if events and consume:
            self._reports_seen[worker_name] = max(e["seq"] for e in events)
        return events, int(out.get("completed") or 0)

    def failure_limits(self) -> dict:
        """What a failure's fix may mention for this mode (option names and maxima)."""
        return {"memory_option": "memory_limit"}

    def _record(self, failure: WorkerFailure) -> None:
        self.worker_failures.append(failure)
        if failure.cause in self._logged_causes:
            logger.info("%s", failure)
        else:
            self._logged_causes.add(failure.cause)
            logger.error("%s", failure)

    async def _replaceable(self, spec_name: str) -> bool:
        """Whether a lost spec entry can be started again (a mode may say no: its host is gone)."""
        return True

    def _replace(self, spec_name: str, quiet: bool = False) -> None:
        """Start a new worker (new name, same spec) instead of ``spec_name``."""
        spec = self.worker_spec.pop(spec_name)
        self._drop_launcher(spec_name)
        new_name = next(iter(self.new_worker_spec()), None) or spec_name
        self.worker_spec[new_name] = spec
        (logger.info if quiet else logger.warning)(
            "worker %s is gone; starting %s instead", spec_name, new_name)
        fut = asyncio.ensure_future(self._start_replacement(new_name))
        self._background.add(fut)
        fut.add_done_callback(self._background.discard)

    async def _start_replacement(self, name: str) -> None:
        try:
            await self._correct_state()
        except Exception as e:
            if self.status != Status.running or name in self.workers:
                return
            # it failed to start: that counts as a failure too, and the spec must not
            # keep an entry nothing runs for
            self.worker_spec.pop(name, None)
            failure = WorkerFailure(name, "error", f"replacement worker {name} failed to "
                                    f"start: {e}", "see the cluster's log (cluster.get_logs())")
            self._record(failure)
            self._failures_in_a_row += 1
            if self._failures_in_a_row >= self.crash_loop_limit:
                await self._give_up(name, failure)

    def _drop_launcher(self, spec_name: str) -> None:
        self._names_used.add(str(spec_name))
        launcher = self.workers.pop(spec_name, None)
        if launcher is not None:  # its worker is dead: closing it is quick
            fut = asyncio.ensure_future(launcher.close())
            self._background.add(fut)
            fut.add_done_callback(self._background.discard)

    async def _give_up(self, spec_name: str, failure: WorkerFailure) -> None:
        self.worker_spec.pop(spec_name, None)
        self._drop_launcher(spec_name)
        first = self._gave_up is None
        loop_msg = (f"{self._failures_in_a_row} workers in a row ended with no task finishing "
                    f"in between (lithops.cluster.crash_loop_limit = {self.crash_loop_limit})")
        self._gave_up = (f"{failure} [{loop_msg}: lost workers are not replaced any more; "
                         "cluster.scale(n) starts new ones]")
        if first:
            logger.error("%s: not replacing them; computations waiting for workers fail "
                         "(reason above)", loop_msg)
        self._correct_state()
        try:
            await asyncio.wait_for(getattr(self.scheduler_comm, FAIL_WAITING_OP)(
                message=self._gave_up), 10)
        except Exception as e:
            logger.warning("could not fail the computations waiting for workers: %s", e)

    # ------------------------------------------------------------------ workers

    @property
    def worker_scheduler_address(self) -> str:
        """The scheduler address as workers must dial it."""
        address = getattr(self.scheduler, "address", None) or self.scheduler_address
        if self.contact_host:
            from distributed.comm.addressing import parse_address, parse_host_port

            protocol, loc = parse_address(address)
            _, port = parse_host_port(loc)
            host = self.contact_host
            if "://" in host:
                return host
            return f"{protocol}://{host}:{port}"
        return address

    def _relay_contact_address(self, listen: str) -> str:
        """The relay's host:port as workers dial it (never a wildcard)."""
        from distributed.comm.addressing import parse_host_port, unparse_host_port

        host, port = parse_host_port(listen)
        if self.contact_host:
            contact = self.contact_host.split("://")[-1]
            host = parse_host_port(contact)[0] if ":" in contact else contact
        elif host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return unparse_host_port(host, port)

    def launch_payload(self, name: str) -> LaunchPayload:
        relay = None
        if self.relay_enabled:
            relay = {"address": self.relay_address,
                     "worker_id": f"{name}-{uuid.uuid4().hex[:8]}"}
        return LaunchPayload(
            scheduler_address=self.worker_scheduler_address,
            name=name,
            nthreads=self.nthreads,
            memory_limit=self.memory_limit,
            nanny=self.nanny,
            lifetime=self.lifetime,
            lifetime_stagger=self.lifetime_stagger,
            death_timeout=self.death_timeout,
            security=security_to_dict(self._security),
            relay=relay,
            config=inherited_config(),
            mode=self.mode,
            **self.worker_options,
        )

    def worker_command(self) -> list[str]:
        """The command a launcher runs (the payload travels separately)."""
        return [sys.executable, "-m", "dask_lithops.worker", "--payload", "-"]

    def job_script(self) -> str:
        """What a new worker would run, without running it (secrets redacted)."""
        payload = self.launch_payload(self._new_worker_name(self._i)).to_dict()
        if payload.get("security"):
            payload["security"] = {k: ("<redacted>" if isinstance(v, str) and "BEGIN" in v
                                       else v) for k, v in payload["security"].items()}
            if "extra_conn_args" in payload["security"]:
                payload["security"]["extra_conn_args"] = {
                    k: "<redacted>" for k in payload["security"]["extra_conn_args"]}
        payload["config"] = f"<{len(payload['config'])} dask config sections>"
        lines = [f"# {type(self).__name__} worker ({self.mode})",
                 " ".join(shlex.quote(c) for c in self.worker_command()), "# launch payload:"]
        lines += [f"#   {k}: {v!r}" for k, v in payload.items()]
        return "\n".join(lines)

    # ------------------------------------------------------------------ logs

    async def _get_logs(self, cluster=True, scheduler=True, workers=True):
        logs = await super()._get_logs(cluster=cluster, scheduler=scheduler, workers=workers)
        if workers:
            for name, launcher in self.workers.items():
                text = launcher.logs() if isinstance(launcher, WorkerLauncher) else None
                if text is not None:
                    logs[f"{name} (process)"] = text
        return logs

    def _repr_html_(self) -> str:
        html = super()._repr_html_()
        if getattr(self, "progress", None) is not None and self.progress.records:
            html += self.progress._repr_html_()
        return html

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, {self.scheduler_address!r}, "
                f"workers={len(self.workers)}, threads={self.nthreads}, status={self.status.name})")


def _dashboard_available() -> bool:
    try:
        import bokeh  # noqa: F401
        import distributed.dashboard  # noqa: F401
    except ImportError:
        return False
    return True


def cpu_count() -> int:
    from dask.system import CPU_COUNT

    return CPU_COUNT or os.cpu_count() or 1
