"""The shared base of the three modes, on ``distributed.SpecCluster``.

A mode is a :class:`LithopsCluster` subclass that names its config section and
its :class:`WorkerLauncher` (one spec entry = one launch of the worker entry
point, :mod:`dask_lithops.worker`).  The base owns what every mode shares:
option resolution, the launch payload, TLS and the relay, graceful scale-down
by worker name, and logs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sys
import uuid
import weakref
from typing import ClassVar

import dask
import dask.config
from dask.utils import parse_timedelta
from distributed.core import Status
from distributed.deploy.spec import ProcessInterface, SpecCluster
from distributed.scheduler import Scheduler
from distributed.security import Security
from distributed.utils import import_term

from dask_lithops import config, progress
from dask_lithops.payload import LaunchPayload, security_to_dict

logger = logging.getLogger(__name__)

_LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
               "error": logging.ERROR, "critical": logging.CRITICAL}


class _Unset:
    def __repr__(self):
        return "<unset>"


UNSET = _Unset()  # keyword not given (None can mean "off", e.g. dashboard_address=None)


class WorkerLaunchError(RuntimeError):
    """A worker could not be started; the message says where and why."""


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
    diff = _config_diff(dask.config.config, defaults)
    out = {}
    for key, value in diff.items():
        try:
            msgpack.packb(value, use_bin_type=True)
        except (TypeError, ValueError):
            continue
        out[key] = value
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
            "cls": Scheduler,
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
        if self.relay_enabled and self._relay_server is None:
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

    async def _start_local_code_sync(self) -> None:
        """Ship the client's local modules now and whenever they change (docs/runtime.md)."""
        from tornado.ioloop import PeriodicCallback

        from dask_lithops.runtime.local_code import LocalCodeSync

        self._local_code = LocalCodeSync(self)
        await self._local_code.sync()
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
        await super()._close()
        if self._relay_server is not None:
            await self._relay_server.close()
            self._relay_server = None

    async def _correct_state_internal(self) -> None:
        # SpecCluster's version retires with `workers=<names>`, but the
        # scheduler's `workers=` takes addresses, so nothing was retired
        # gracefully and data on removed workers was lost.  Retire by name.
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

            to_open = set(self.worker_spec) - set(self.workers)
            workers = []
            for name in to_open:
                d = self.worker_spec[name]
                cls, opts = d["cls"], dict(d.get("options", {}))
                opts.setdefault("name", name)
                if isinstance(cls, str):
                    cls = import_term(cls)
                worker = cls(self.worker_scheduler_address, **opts)
                self._created.add(worker)
                workers.append(worker)
            if workers:
                futs = [asyncio.ensure_future(w) for w in workers]
                await asyncio.wait(futs)
                self.workers.update(dict(zip(to_open, workers)))
                for w in workers:
                    w._cluster = weakref.ref(self)
                await asyncio.gather(*futs)

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
