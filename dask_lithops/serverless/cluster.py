"""ServerlessCluster: Dask workers as FaaS function invocations.

Each worker is one invocation of a function running the shared entry point
without a nanny (an ``Event`` invocation on Lambda, a request held open on
Cloud Run functions).  Workers dial out to the scheduler and sit behind the
relay (functions accept no inbound connection), with TLS on by default.  A
worker retires before its function's deadline; the cluster starts its
replacement first, so computations may run far longer than one function.

Everything specific to one platform lives in its backend package
(``serverless/backends/<name>/``); this module knows backends only through
:class:`~dask_lithops.serverless.backends.base.FaaSBackend`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import inspect
import logging
import random
import time
import uuid
from typing import ClassVar

from dask.utils import parse_timedelta
from distributed.core import Status
from distributed.diagnostics.plugin import SchedulerPlugin

from dask_lithops import config
from dask_lithops.cluster import (
    LithopsCluster,
    WorkerLauncher,
    WorkerLaunchError,
    inherited_config,
)
from dask_lithops.failures import FAIL_WAITING_OP, PLUGIN_NAME, WorkerFailure, describe
from dask_lithops.payload import (
    LaunchPayload,
    RuntimeMismatch,
    describe_mismatch,
    encode_b64,
    runtime_key,
    runtime_mismatch,
)
from dask_lithops.progress import format_bytes
from dask_lithops.serverless import placement as placements
from dask_lithops.serverless import reachability
from dask_lithops.serverless.backends import BACKENDS, backend_class
from dask_lithops.serverless.backends.base import Invocation, ThrottledError
from dask_lithops.serverless.handler import _SAFETY as _HANDLER_SAFETY
from dask_lithops.serverless.handler import EXIT_REPORT_OP
from dask_lithops.serverless.usage import UsageTracker

logger = logging.getLogger(__name__)

__all__ = ["BACKENDS", "FunctionWorker", "PayloadTooLarge", "ServerlessCluster", "backend_class"]

_STOP_WAIT = 15.0  # for a stopped worker's exit report
_END_WAIT = 5.0  # then for its invocation to return (a held request), before cutting it off
LIFETIME_ATTEMPTS = 2  # workers a task may outlive before it fails (it cannot finish in time)
SHUFFLE_RESTARTS = 3  # rotations a p2p shuffle may be restarted by before it fails
THROTTLED_RETRY = 10.0  # seconds before a worker the platform refused is invoked again
_GOLDEN = 0.6180339887498949
_PAYLOAD_FIELDS = tuple(f.name for f in dataclasses.fields(LaunchPayload))
_CLUSTER_OPTIONS = frozenset(inspect.signature(LithopsCluster.__init__).parameters) - {"self"}


def _invocation_failure(report: dict, memory_mb: int) -> dict:
    """The failure report of an invocation that ended in a platform error."""
    error = str(report.get("error") or "")
    if "OutOfMemory" in error or "memory limit" in error.lower():
        return {"kind": "out-of-memory", "limit": memory_mb * 2**20, "error": error}
    return {"kind": "error", "error": error or report.get("reason")}


class _ProbeWarningFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("TLS handshake failed" in text and "EOF" in text)


class PayloadTooLarge(config.ConfigError):
    """The launch payload does not fit in one worker invocation."""


class FunctionWorker(WorkerLauncher):
    """One worker = one invocation of the runtime's function (see ``FaaSBackend.start_invocation``)."""

    invoked_at: float | None = None
    invocation: Invocation | None = None
    retire_early: float = 0.0  # seconds this worker retires before the others (see launch)

    @property
    def request_id(self) -> str | None:
        return self.invocation.request_id if self.invocation else None

    async def launch(self, payload: LaunchPayload) -> None:
        cluster = self.cluster
        event = cluster.worker_event(payload)
        self.invoked_at = time.monotonic()
        # Workers launched together would all reach their deadline at once: with their
        # replacements late (slow cold starts), each would retire while the others retire
        # too, and none could take their data.  Consecutive workers retire up to one lead
        # apart instead (a low-discrepancy sequence over the worker number).
        number = int(self.name.rsplit("-", 1)[-1]) if self.name.rsplit("-", 1)[-1].isdigit() \
            else random.randrange(1000)
        self.retire_early = (number * _GOLDEN) % 1.0 * cluster.retire_spread
        cluster.usage_tracker.invoked(self.name, cluster.memory)
        try:
            self.invocation = await cluster.start_invocation(self.name, event)
            cluster._invocations[self.name] = self.invocation
        except ThrottledError as e:  # no capacity (after the backend's retries): not a crash
            cluster.usage_tracker.forget(self.name)
            asyncio.get_running_loop().call_soon(
                cluster._throttled, self.name, {"reason": "throttled", "error": str(e)})
        except Exception as e:
            cluster.usage_tracker.forget(self.name)
            raise WorkerLaunchError(f"worker {self.name}: invocation failed: {e}") from e

    async def stop(self) -> None:
        cluster = self.cluster
        await cluster.stop_worker(self.name)
        if self.invocation is not None:
            registered = self.name in cluster._addresses or self.name in cluster._exited
            await self.invocation.end(_END_WAIT if registered else 0.0)
            cluster._invocations.pop(self.name, None)



class _Tracker(SchedulerPlugin):
    """Tells the cluster when a worker joins or leaves (the in-process scheduler)."""

    name = "dask-lithops-serverless"

    def __init__(self, cluster: ServerlessCluster):
        self.cluster = cluster

    def add_worker(self, scheduler, worker: str) -> None:
        ws = scheduler.workers.get(worker)
        if ws is not None:
            self.cluster._on_worker_added(str(ws.name), worker)

    def remove_worker(self, scheduler, worker: str, **kwargs) -> None:
        for name, addr in list(self.cluster._addresses.items()):
            if addr == worker:
                self.cluster._on_worker_removed(name)


def drain_on_scheduler(name: str, dask_scheduler=None) -> list:
    """(Runs on the scheduler.) Give worker ``name`` no new tasks; return the keys it runs."""
    for ws in list(dask_scheduler.workers.values()):
        if str(ws.name) == name:
            if ws.status == Status.running:
                dask_scheduler.handle_worker_status_change(
                    Status.closing_gracefully, ws, stimulus_id=f"dask-lithops-rotate-{name}")
            return [ts.key for ts in ws.processing]
    return []


def _count_toward(counts: dict, items, bound: int) -> list:
    """One more for each of ``items`` in ``counts``; the items that reached ``bound``."""
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return [item for item in items if counts[item] >= bound]


def p2p_shuffles_on(name: str, dask_scheduler=None) -> list:
    """(Runs on the scheduler.) Ids of the active p2p shuffles worker ``name`` takes part
    in: retiring it restarts them (distributed's shuffle plugin does)."""
    addresses = {ws.address for ws in dask_scheduler.workers.values() if str(ws.name) == name}
    plugin = dask_scheduler.plugins.get("shuffle")
    try:
        return [sid for sid, state in plugin.active_shuffles.items()
                if set(state.participating_workers) & addresses]
    except AttributeError:  # no p2p extension (or one of another shape): nothing to count
        return []


def p2p_restarted_keys(shuffle_id: str, dask_scheduler=None) -> list:
    """(Runs on the scheduler.) The tasks of a restarted p2p shuffle that are running or
    waiting to run again (its transfer tasks, its barrier): failing them fails the shuffle."""
    barrier = dask_scheduler.tasks.get(f"shuffle-barrier-{shuffle_id}")
    if barrier is None:
        return []
    return [ts.key for ts in (*barrier.dependencies, barrier)
            if ts.state in ("no-worker", "queued", "processing")]


class ServerlessCluster(LithopsCluster):
    """A Dask cluster whose workers are FaaS function invocations.

    Parameters
    ----------
    backend: str
        ``"aws_lambda"`` (default) or ``"gcp_functions"`` (``lithops.backend``).
    n_workers: int
        Workers to start with (``lithops.serverless.n_workers``, default 0).
    runtime, runtime_memory, runtime_timeout, max_workers, invoke_pool_threads, endpoint_url,
    extra_packages, requirements_file:
        ``lithops.<backend>.*`` (Lithops' key names): runtime name (default
        ``"default"``), function memory (MB) and timeout (s), most concurrent
        invocations, threads issuing them; ``endpoint_url`` points the backend
        at another API (the offline emulators).
    **backend options:
        any other key of the backend's sections, e.g. ``region``,
        ``execution_role``, ``architecture`` (``lithops.aws_lambda.*``,
        ``lithops.aws.*``) or ``project_name``, ``runtime_cpu``,
        ``credentials_path`` (``lithops.gcp_functions.*``, ``lithops.gcp.*``).
    package_sync: bool
        The function carries the client's installed versions of dask's optional
        dependencies (numpy, pandas, pyarrow, ...) besides ``extra_packages``
        (``lithops.runtime.package_sync``, default true).  See docs/runtime.md.
    scheduler: "auto", "local", "aws_ec2" or "ssh"
        Where the scheduler and the relay run (``lithops.serverless.scheduler``):
        ``local`` in this process (functions must reach ``contact_address``);
        ``aws_ec2`` on a small EC2 VM, ``ssh`` on ``scheduler_host``, both
        reached through an SSH tunnel; ``auto`` (default): ``local`` when a
        contact address is known, else ``aws_ec2``.  See docs/serverless.md.
    scheduler_host: str
        ``"user@host[:port]"`` for ``scheduler="ssh"``.
    scheduler_options: dict
        ``aws_ec2``/``ssh``: the host's options, StandaloneCluster's keys
        (``lithops.aws_ec2.*``, ``lithops.standalone.*``, ``lithops.ssh.*``:
        ``master_instance_type``, ``exec_mode``, ``soft_dismantle_timeout``,
        ``ssh_key_filename``, ...).  ``local``: keywords of the Scheduler.
    contact_address: str
        ``local``: the host workers dial (the scheduler and the relay listen on
        ``0.0.0.0``): a public or VPC address of this host.  With an emulator
        it defaults to the host as its sandboxes see it.
    threads_per_worker: int
        Default: one per vCPU the platform gives the function's memory.
    lifetime_margin, replacement_lead:
        Workers retire ``lifetime_margin`` before the function timeout (default
        ``min(60s, 25%)``); their replacement is invoked ``replacement_lead``
        before that.
    usage_report: bool
        Log the GB-seconds report on close.
    **kwargs:
        Shared options of :class:`dask_lithops.cluster.LithopsCluster`.

    Examples
    --------
    >>> from distributed import Client
    >>> cluster = ServerlessCluster(backend="aws_lambda", runtime_memory=2048,
    ...                             contact_address="203.0.113.10")  # doctest: +SKIP
    >>> cluster.scale(8)                                               # doctest: +SKIP
    >>> client = Client(cluster)                                       # doctest: +SKIP
    """

    mode: ClassVar[str] = "serverless"
    launcher = FunctionWorker
    name_prefix = "function"  # the backend's worker_name_prefix, set in __init__
    default_tls = True
    default_scheduler_host = "0.0.0.0"

    def __init__(self, n_workers: int | None = None, *, backend: str | None = None,
                 runtime: str | None = None, runtime_memory: int | None = None,
                 runtime_timeout: int | None = None, max_workers: int | None = None,
                 invoke_pool_threads: int | None = None, endpoint_url: str | None = None,
                 extra_packages: list | None = None, requirements_file: str | None = None,
                 threads_per_worker: int | None = None, lifetime_margin=None,
                 replacement_lead=None, usage_report: bool | None = None,
                 contact_address: str | None = None, package_sync: bool | None = None,
                 scheduler: str | None = None, scheduler_host: str | None = None, **kwargs):
        if kwargs.pop("relay", True) is False:
            raise config.ConfigError("relay=False is not possible in serverless mode: functions "
                                     "accept no inbound connection")
        if kwargs.pop("nanny", False):
            raise config.ConfigError("nanny=True is not possible in serverless mode (function "
                                     "sandboxes have no /dev/shm)")
        backend = config.get("backend", backend) or config.DEFAULT_BACKEND["serverless"]
        cls = backend_class(backend)
        backend_options = {k: kwargs.pop(k) for k in list(kwargs) if k in cls.option_names()}
        unknown = sorted(set(kwargs) - _CLUSTER_OPTIONS)
        if unknown:
            raise config.ConfigError(
                f"{', '.join(unknown)}: not an option of ServerlessCluster(backend={backend!r}); "
                f"its backend options: {', '.join(sorted(cls.option_names()))}")
        sopts = config.section("serverless", n_workers=n_workers,
                               threads_per_worker=threads_per_worker,
                               lifetime_margin=lifetime_margin,
                               replacement_lead=replacement_lead, usage_report=usage_report)
        bcfg = cls.resolve_config(
            runtime=runtime, runtime_memory=runtime_memory, runtime_timeout=runtime_timeout,
            max_workers=max_workers, invoke_pool_threads=invoke_pool_threads,
            endpoint_url=endpoint_url, extra_packages=extra_packages,
            requirements_file=requirements_file, **backend_options)
        self.package_sync = bool(config.get("runtime.package_sync", package_sync))
        self.backend = cls(bcfg)  # validates: bad input fails before anything is started
        self.backend_config = bcfg
        self.name_prefix = cls.worker_name_prefix
        self.runtime_name = self.backend.runtime_name
        self.memory = self.backend.memory
        self.timeout = self.backend.timeout
        self.max_workers = int(bcfg["max_workers"])
        self.usage_report_on_close = bool(sopts["usage_report"])
        if (sopts["n_workers"] or 0) > self.max_workers:
            raise config.ConfigError(f"n_workers = {sopts['n_workers']} is more than "
                                     f"{cls.key('max_workers')} = {self.max_workers}")

        margin = sopts["lifetime_margin"]
        self.lifetime_margin = (parse_timedelta(margin) if margin is not None
                                else min(60.0, 0.25 * self.timeout))
        lead = sopts["replacement_lead"]
        self.replacement_lead = (parse_timedelta(lead) if lead is not None
                                 else min(30.0, max(3.0, 0.25 * self.timeout)))
        self.worker_lifetime = self.timeout - self.lifetime_margin
        if self.worker_lifetime - self.replacement_lead < 2:
            raise config.ConfigError(
                f"{cls.key('runtime_timeout')} = {self.timeout} leaves no time to work "
                f"after the lifetime margin ({self.lifetime_margin:.0f}s) and replacement lead "
                f"({self.replacement_lead:.0f}s); allowed: a longer timeout or smaller margins")
        # workers retire up to this much apart (never leaving less than 2 s of work)
        self.retire_spread = min(self.replacement_lead,
                                 self.worker_lifetime - self.replacement_lead - 2)

        placement, scheduler_options = placements.resolve(
            scheduler, scheduler_host, kwargs.pop("scheduler_options", None))
        contact = config.get("cluster.contact_address", contact_address)
        if not contact and placement in ("auto", "local"):
            contact = self.backend.default_contact_address()
        auto = placement == "auto"
        if auto:
            placement = "local" if contact else (self.backend.auto_scheduler_placement or "local")
        if placement == "local" and not contact:
            raise config.ConfigError(
                f"lithops.cluster.contact_address is required with scheduler="
                f"{'auto' if auto else 'local'!r} on {backend}: the address of this host that "
                "functions can reach (a public or VPC address; TLS and the relay token keep "
                "strangers out); or scheduler='aws_ec2' (a small VM runs the scheduler) or "
                "scheduler='ssh' with scheduler_host='user@host' (lithops.serverless.scheduler)")
        self.scheduler_placement = placement
        self.remote_host: placements.SchedulerHost | None = None
        if placement in placements.REMOTE:
            if contact_address:
                raise config.ConfigError(f"contact_address is for scheduler='local'; with "
                                         f"scheduler={placement!r} functions dial its host")
            contact = None
            self.remote_host = placements.SchedulerHost(placement, scheduler_options,
                                                           scheduler_host)
            scheduler_options = {}

        self.usage_tracker = UsageTracker(
            self.backend.price_per_gb_second, self.backend.price_per_request,
            price_per_vcpu_second=self.backend.price_per_vcpu_second, vcpus=self.backend.vcpus)
        self._invoke_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=int(bcfg["invoke_pool_threads"]), thread_name_prefix="dask-lithops-invoke")
        self._addresses: dict[str, str] = {}  # registered worker name -> address
        self._exited: dict[str, asyncio.Event] = {}
        self._exit_reports: dict[str, dict] = {}
        self._retiring: dict[str, FunctionWorker] = {}
        self._invocations: dict[str, Invocation] = {}  # worker name -> its invocation
        self._lifetime_attempts: dict = {}  # task key -> workers it outlived
        self._shuffle_restarts: dict = {}  # p2p shuffle id -> rotations that restarted it
        self._rotation_task: asyncio.Task | None = None
        self._report_task: asyncio.Task | None = None
        self._payload_template: LaunchPayload | None = None
        self.function_name: str | None = None
        self.runtime_package = None
        self.throttle_warnings = 0
        self.throttled = 0  # worker invocations the platform refused for want of capacity
        self._throttle_retries: set[asyncio.Task] = set()
        self._throttled_alone_since: float | None = None  # throttled, no worker registered
        self._waiting_failed = False  # the waiting computations failed: no worker starts
        self._unreachable_warned = False
        kwargs.setdefault("lifetime", None)
        super().__init__(
            n_workers=sopts["n_workers"],
            threads_per_worker=(sopts["threads_per_worker"]
                                or self.backend.threads_for_memory(self.memory)),
            memory_limit=self.memory * 1024 * 1024, nanny=False, relay=True,
            contact_address=contact, scheduler_options=scheduler_options, **kwargs)
        self.lifetime = self.worker_lifetime
        self.lifetime_stagger = 0.0

    # ------------------------------------------------------------------ runtime

    def ensure_runtime(self) -> str:
        """Build/deploy the runtime if needed and check its versions (blocking)."""
        pkg = self.backend.build_runtime(self.runtime_name, log=logger.info,
                                         package_sync=self.package_sync, progress=self.progress)
        self.runtime_package = pkg
        name = self.backend.get_runtime_key(pkg.name, self.memory, pkg.version)
        info = self.backend.get_runtime_info(name)
        if info is None:
            with self.progress.phase(f"deploying function {name}") as phase:
                self.backend.deploy_runtime(pkg, self.memory, self.timeout)
                layers = getattr(pkg, "layer_zips", None)
                phase.detail = f"{format_bytes(pkg.zipped_bytes)} zipped" + (
                    f", {len(layers)} layers" if layers is not None else "")
        elif info.timeout != self.timeout:
            raise config.ConfigError(
                f"function {name} exists with runtime_timeout = {info.timeout}, but "
                f"{self.timeout} was asked; delete it first (dask-lithops runtime delete "
                f"{self.runtime_name} --backend {self.backend.name}) or use its timeout")
        meta = self.backend.get_runtime_meta(name)
        theirs = (meta or {}).get("runtime_key") or {}
        diff = runtime_mismatch(runtime_key(), theirs)
        if diff or not theirs:
            raise RuntimeMismatch(
                describe_mismatch(diff, where=f"function {name}") if diff else
                f"function {name} did not report its runtime: {meta!r}")
        self.function_name = name
        self.backend.prepare_invoke(name)
        return name

    # ------------------------------------------------------------------ lifecycle

    async def _start(self):
        # SpecCluster.__init__ runs _start (and launches n_workers) before our __init__ ends
        self.lifetime = self.worker_lifetime
        self.lifetime_stagger = 0.0
        if self.status == Status.created or self.function_name is None:
            jobs = [asyncio.get_running_loop().run_in_executor(self._invoke_pool,
                                                               self.ensure_runtime)]
            if self.remote_host is not None and self.remote_host.host is None:
                jobs.append(self.remote_host.acquire(self.cluster_id))  # meanwhile
            results = await asyncio.gather(*jobs, return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                if self.remote_host is not None:
                    await self.remote_host.release()
                raise errors[0]
        if self.remote_host is not None:
            self.scheduler_spec = self._remote_scheduler_spec()
        await super()._start()
        try:
            remote = self.remote_scheduler
            if remote is not None and remote.relay_address:  # functions dial the host's address
                self.relay_address = f"{self.remote_host.address}:" \
                                     f"{remote.relay_address.rsplit(':', 1)[1]}"
            await self._check_reachable()
            await self._install_scheduler_side()
        except BaseException:
            await self._close()  # nothing was invoked yet: nothing else to stop
            raise
        self.worker_event(self.launch_payload("size-check"))  # too big: fail before invoking
        self._rotation_task = asyncio.ensure_future(self._rotation_loop())

    def _remote_scheduler_spec(self) -> dict:
        from dask_lithops.standalone.launchers import RemoteScheduler

        options = self.scheduler_spec["options"]
        port = options.get("port") or placements.DEFAULT_SCHEDULER_PORT
        relay_port = config.get("relay.port") or placements.DEFAULT_RELAY_PORT
        return {"cls": RemoteScheduler, "options": {
            "host": self.remote_host.host, "run_id": self.cluster_id,
            "security": self._security, "port": port, "protocol": options.get("protocol"),
            "listen_host": "0.0.0.0", "dashboard": bool(options.get("dashboard")),
            "relay": {"host": "0.0.0.0", "port": relay_port},
            "start_timeout": self.worker_start_timeout}}

    async def _install_scheduler_side(self) -> None:
        """Worker tracking and exit reports, on the scheduler wherever it runs."""
        if self.remote_scheduler is None:
            monitor = self.scheduler.plugins.get(PLUGIN_NAME)

            def on_exit_report(report=None, **kwargs):  # the cluster's bookkeeping, and why
                if monitor is not None:
                    monitor.on_report(report=report)
                self._on_exit_report(report=report)

            self.scheduler.handlers[EXIT_REPORT_OP] = on_exit_report
            self.scheduler.add_plugin(_Tracker(self), name=_Tracker.name)
            return
        # remote: workers come and go through the cluster's worker-status stream
        # (_update_worker_status); exit reports are kept by the base's FailureMonitor
        # plugin on the scheduler, collected from there
        self._report_task = asyncio.ensure_future(self._collect_exit_reports())

    async def _collect_exit_reports(self) -> None:
        from dask_lithops.failures import REPORTS_OP

        seen = 0
        while self.status not in (Status.closed, Status.failed):
            try:
                answer = await getattr(self.scheduler_comm, REPORTS_OP)(since=seen)
            except (OSError, asyncio.TimeoutError) as e:
                logger.debug("collecting exit reports: %s", e)
                answer = {}
            for events in (answer or {}).get("reports", {}).values():
                for report in events:
                    seen = max(seen, int(report.get("seq") or 0))
                    self._on_exit_report(report=report)
            await asyncio.sleep(0.5)

    def _update_worker_status(self, op, msg):
        if self.remote_scheduler is not None:
            if op == "add":
                for addr, info in (msg.get("workers") or {}).items():
                    self._on_worker_added(str(info.get("name")), addr)
            elif op == "remove":
                for name, addr in list(self._addresses.items()):
                    if addr == msg:
                        self._on_worker_removed(name)
        super()._update_worker_status(op, msg)

    @property
    def remote_scheduler(self):
        """The scheduler on its own host (``aws_ec2``/``ssh``), or None."""
        from dask_lithops.standalone.launchers import RemoteScheduler

        return self.scheduler if isinstance(self.scheduler, RemoteScheduler) else None

    @property
    def worker_scheduler_address(self) -> str:
        remote = self.remote_scheduler
        if remote is not None and remote.worker_address:
            protocol = remote.worker_address.split("://")[0]
            port = remote.worker_address.rsplit(":", 1)[1]
            return f"{protocol}://{self.remote_host.address}:{port}"
        return super().worker_scheduler_address

    @property
    def dashboard_link(self):
        remote = self.remote_scheduler
        if remote is not None:
            if not remote.dashboard_port:
                return ""
            from distributed.utils import format_dashboard_link

            return format_dashboard_link("127.0.0.1", remote.dashboard_port)
        return super().dashboard_link

    def dial_targets(self) -> dict[str, str]:
        """The addresses workers dial: the scheduler's and the relay's."""
        return reachability.dial_targets(self.worker_scheduler_address, self.relay_address)

    async def _check_reachable(self) -> None:
        """Before any worker is invoked: can a function dial the scheduler and the relay?"""
        timeout = max(1.0, min(10.0, self.worker_start_timeout / 3))
        # the probe is a bare TCP connect: the scheduler's TLS listener would warn that
        # it closed before a handshake; that one line says nothing to the user
        tcp_log = logging.getLogger("distributed.comm.tcp")
        quiet = _ProbeWarningFilter()
        tcp_log.addFilter(quiet)
        try:
            await asyncio.get_running_loop().run_in_executor(
                self._invoke_pool, reachability.check, self.backend, self.function_name,
                self.dial_targets(), timeout)
            await asyncio.sleep(0.2)  # the listener notices the probe's close
        finally:
            tcp_log.removeFilter(quiet)

    async def _close(self):
        if self._rotation_task is not None:
            self._rotation_task.cancel()
            self._rotation_task = None
        for task in list(self._throttle_retries):
            task.cancel()
        try:
            if self._retiring:
                await asyncio.gather(*(w.close() for w in list(self._retiring.values())),
                                     return_exceptions=True)
            await super()._close()
        finally:
            if self._report_task is not None:
                self._report_task.cancel()
                self._report_task = None
            try:
                await self.backend.aclose()  # ends any invocation still held
            finally:
                self._invoke_pool.shutdown(wait=False, cancel_futures=True)
                if self.remote_host is not None:
                    try:
                        await self.remote_host.release()  # EC2: terminated (reuse: stopped)
                    except Exception as e:
                        logger.error("could not release the scheduler host %s: %s",
                                     self.remote_host, e)
            if self.usage_report_on_close:
                logger.warning("dask-lithops usage: %s", self.usage_tracker.summary())

    def new_worker_spec(self):
        # Never reuse a name: an old invocation with that name may still be leaving.
        while True:
            name = self._new_worker_name(self._i)
            self._i += 1
            if name not in self.worker_spec and name not in self.usage_tracker.records:
                return {name: self.new_spec}

    # ------------------------------------------------------------------ invocations

    def launch_payload(self, name: str) -> LaunchPayload:
        # Everything but the name and the relay id is the same for every worker; building
        # it (runtime versions from package metadata, config difference) took ~5 ms, more
        # than the invoke itself.  The config is snapshotted by scale() (see there).
        template = self._payload_template
        if template is None or template.scheduler_address != self.worker_scheduler_address \
                or template.lifetime != self.lifetime:
            template = self._payload_template = super().launch_payload(name)
        relay = None
        if template.relay is not None:
            relay = {"address": template.relay["address"],
                     "worker_id": f"{name}-{uuid.uuid4().hex[:8]}"}
        return dataclasses.replace(template, name=name, relay=relay)

    def worker_event(self, payload: LaunchPayload) -> bytes:
        """The worker invocation's JSON body (encoded once: its size is checked here)."""
        # a shallow dict: dataclasses.asdict deep-copies the TLS material (~0.2 ms); and
        # base64 needs no JSON escaping (json.dumps scans the whole string)
        data = {name: getattr(payload, name) for name in _PAYLOAD_FIELDS}
        not_after = time.time() + max(300.0, 2 * self.timeout)
        event = b'{"dask_lithops":"worker","payload":"%s","not_after":%r}' % (
            encode_b64(data).encode(), not_after)
        size = len(event)
        if size > self.backend.max_event_payload:
            raise PayloadTooLarge(
                f"the worker launch payload is {size} bytes, over the {self.backend.name} "
                f"invocation limit of {self.backend.max_event_payload} bytes; "
                "it carries the dask config: trim large dask config values")
        return event

    async def start_invocation(self, name: str, event: bytes) -> Invocation:
        if self.function_name is None:
            raise WorkerLaunchError("the runtime is not deployed yet")
        running = self.usage_tracker.running
        if running > self.max_workers:
            raise WorkerLaunchError(f"max_workers = {self.max_workers} invocations reached")
        return await self.backend.start_invocation(
            self.function_name, event, name=name, executor=self._invoke_pool,
            on_accepted=self._on_accepted, on_end=self._on_invocation_end)

    def _on_accepted(self, name: str, request_id: str | None, when: float) -> None:
        record = self.usage_tracker.records.get(name)
        if record is not None:
            record.request_id = request_id or record.request_id
            record.accepted = when

    def _on_invocation_end(self, name: str, report: dict) -> None:
        """A held invocation returned (its response carries the exit report, or the error)."""
        self._invocations.pop(name, None)
        record = self.usage_tracker.records.get(name)
        never_joined = record is not None and record.registered is None
        if report.get("name") == name:
            self._on_exit_report(report)
        else:  # no exit report: the invocation failed, or was cut off after the report
            self.usage_tracker.ended(name, None if record and record.reason else report)
            self._exited.setdefault(name, asyncio.Event()).set()
        if report.get("reason") == "throttled":
            self._throttled(name, report)
            return
        if report.get("reason") == "scheduler-unreachable" and self.status == Status.running:
            # planned for a closed cluster; here the scheduler runs: the path to it refuses
            report = {**report, "error": f"it could not reach the scheduler at "
                      f"{self.worker_scheduler_address} (refused, or no answer), which the "
                      "cluster's start check reached: has the path from the functions to "
                      "it changed (a firewall, a forwarder on the way)?"}
        failed = report.get("reason") in ("error", "scheduler-unreachable")
        if failed and self.status == Status.running:
            logger.warning("worker %s: invocation failed%s: %s", name,
                           " before the worker started" if never_joined else "",
                           report.get("error"))
            if name in self.worker_spec and name not in self._addresses:
                self.worker_ended(name, _invocation_failure(report, self.memory))

    def _throttled(self, name: str, report: dict) -> None:
        """The platform refused worker ``name``'s invocation for want of capacity (the
        function's max instances, the account's or project's concurrency), after the
        backend's retries with backoff.

        Not a crash: it does not count toward crash_loop_limit (else scaling past the
        limit would make the cluster give up while its other workers compute).  The spec
        entry stays and is invoked again every THROTTLED_RETRY seconds under a new name,
        until capacity frees, the cluster scales down or closes: a requested worker waits
        for capacity, as Lambda keeps an Event invocation queued over its concurrency, a
        Kubernetes pod stays Pending, a batch job stays queued (dask-jobqueue), and
        Lithops retries a throttled call.  Dropping the entry instead would shrink the
        cluster for good at every refusal, e.g. at each rotation of a cluster that runs
        at its function's limit.  One warning says so; the computations go on with the
        workers that started.  Only when no worker at all could start within
        worker_start_timeout do the computations waiting for workers fail (with the
        limit and the fix; until a worker joins): never an endless wait."""
        if self.status != Status.running or name not in self.worker_spec or \
                name in self._addresses:
            return
        self.throttled += 1
        now = time.monotonic()
        if self._addresses:
            self._throttled_alone_since = None
        elif self._throttled_alone_since is None:
            self._throttled_alone_since = now
        elif now - self._throttled_alone_since >= self.worker_start_timeout and \
                not self._waiting_failed:
            self._waiting_failed = True
            task = asyncio.ensure_future(self._fail_waiting(self._throttled_message(report)))
            self._throttle_retries.add(task)
            task.add_done_callback(self._throttle_retries.discard)
        if self.throttled == 1:
            logger.warning(
                "worker %s: %s. The cluster computes with the workers that started and "
                "invokes the others again every %.0fs until there is capacity. Fix: fewer "
                "workers (cluster.scale(n), %s), or raise the function's max instances or "
                "the account's concurrency limit", name,
                str(report.get("error") or "invocation throttled").rstrip("."),
                THROTTLED_RETRY, self.backend.key("max_workers"))
        else:
            logger.info("worker %s: invocation throttled again", name)
        task = asyncio.ensure_future(self._retry_throttled(name))
        self._throttle_retries.add(task)
        task.add_done_callback(self._throttle_retries.discard)

    def _throttled_message(self, report: dict) -> str:
        return (
            f"no worker could start within worker_start_timeout "
            f"({self.worker_start_timeout:.0f}s): {self.backend.name} refused every "
            f"invocation for want of capacity "
            f"({str(report.get('error') or 'throttled').rstrip('.')}). Fix: raise the "
            f"function's max instances or the account's concurrency limit, or run fewer "
            f"workers elsewhere on it ({self.backend.key('max_workers')}); the cluster "
            f"keeps invoking its workers every {THROTTLED_RETRY:.0f}s")

    async def _fail_waiting(self, message: str) -> None:
        """No worker can start: fail the computations waiting for workers (and those that
        come later, until a worker joins) with ``message``."""
        logger.error("%s: computations waiting for workers fail until one starts", message)
        await self._fail_on_scheduler(message)

    async def _fail_on_scheduler(self, message: str, keys: list | None = None) -> None:
        """Fail ``keys`` (None: the tasks waiting for workers) with ``message``, through the
        FailureMonitor wherever the scheduler runs."""
        try:
            await asyncio.wait_for(getattr(self.scheduler_comm, FAIL_WAITING_OP)(
                message=message, keys=keys), 10)
        except Exception as e:
            logger.warning("could not fail %s: %s", "the computations waiting for workers"
                           if keys is None else f"tasks {keys[:5]}", e)

    async def _retry_throttled(self, name: str) -> None:
        await asyncio.sleep(THROTTLED_RETRY)
        if self.status != Status.running or name not in self.worker_spec or \
                name in self._addresses:
            return
        spec = self.worker_spec.pop(name)
        self._drop_launcher(name)
        new_name = next(iter(self.new_worker_spec()))
        self.worker_spec[new_name] = spec
        logger.info("invoking worker %s again as %s (it was throttled)", name, new_name)
        await self._start_replacement(new_name)

    def scale(self, n=0, memory=None, cores=None):
        if n > self.max_workers:
            logger.warning("scale(%d) capped at %s = %d", n, self.backend.key("max_workers"),
                           self.max_workers)
            n = self.max_workers
        # The workers get the dask config in effect now (the launches happen later, on
        # the event loop): e.g. ``with dask.config.set(...): cluster.scale(4)``.
        if self._payload_template is not None:
            self._payload_template = dataclasses.replace(self._payload_template,
                                                         config=inherited_config())
        return super().scale(n, memory=memory, cores=cores)

    # ------------------------------------------------------------------ worker tracking

    def _on_worker_added(self, name: str, address: str) -> None:
        self._addresses[name] = address
        self._throttled_alone_since, self._waiting_failed = None, False
        invocation = self._invocations.get(name)
        if invocation is not None:
            invocation.joined = True
        self._exited.setdefault(name, asyncio.Event())
        self.usage_tracker.registered(name)
        if name not in self.worker_spec and name not in self._retiring and \
                self.status == Status.running:
            # an invocation that started after its spec entry was removed (e.g. queued
            # behind a concurrency limit): it is not wanted any more
            logger.info("closing unexpected worker %s", name)
            asyncio.ensure_future(self._close_registered(name))

    def _on_worker_removed(self, name: str) -> None:
        # a worker that left on its own is replaced by the base (LithopsCluster._check_down)
        self._addresses.pop(name, None)
        self.usage_tracker.ended(name, self._exit_reports.get(name))

    def failure_limits(self) -> dict:
        low, high = self.backend.memory_range
        return {"memory_option": "runtime_memory",
                "max_memory": f"{high} MB on {self.backend.name}",
                "timeout": self.timeout, "max_timeout": self.backend.max_timeout}

    def _on_exit_report(self, report: dict | None = None, **kwargs) -> None:
        report = report or {}
        name = report.get("name")
        if not name:
            return
        self._exit_reports[name] = report
        self.usage_tracker.ended(name, report)
        self._exited.setdefault(name, asyncio.Event()).set()

    async def _close_registered(self, name: str) -> None:
        """Close registered worker ``name`` (a planned stop: its running tasks go back to
        the scheduler without counting toward allowed-failures), wherever the scheduler
        runs.  Not retire_workers: the last worker has nowhere to move its data, and
        retiring it would not close it."""
        addr = self._addresses.get(name)
        if not addr:
            return
        try:
            await asyncio.wait_for(self.scheduler_comm.unregister(
                address=addr, close=True, expected=True,
                stimulus_id=f"dask-lithops-stop-{name}-{time.time()}"), _STOP_WAIT)
        except Exception as e:
            logger.debug("closing worker %s: %s", name, e)

    def _known_dead(self) -> set[str]:
        return {f.name for f in self.worker_failures}

    async def stop_worker(self, name: str) -> None:
        """Close worker ``name`` and wait until its invocation has returned."""
        registered = name in self._addresses
        await self._close_registered(name)
        record = self.usage_tracker.records.get(name)
        if record is None:
            return
        if not registered and record.registered is None:
            # never joined (queued or still starting): it finds its spec entry gone, or
            # its scheduler gone, and ends at once
            return
        ev = self._exited.setdefault(name, asyncio.Event())
        if not ev.is_set() and name in self._known_dead():
            # it crashed (its end was handled): its invocation is over, no report comes
            self.usage_tracker.ended(name, self._exit_reports.get(name))
            return
        try:
            await asyncio.wait_for(ev.wait(), _STOP_WAIT)
        except asyncio.TimeoutError:
            logger.warning("worker %s did not report its end within %.0fs", name, _STOP_WAIT)
        self.usage_tracker.ended(name, self._exit_reports.get(name))

    # ------------------------------------------------------------------ rotation

    def retire_deadline(self, w: FunctionWorker) -> float:
        """When (monotonic) worker ``w`` retires, its replacement there or not."""
        return w.invoked_at + self.worker_lifetime - w.retire_early

    async def _rotation_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            if self.status != Status.running:
                continue
            now = time.monotonic()
            for name, w in list(self.workers.items()):
                if not isinstance(w, FunctionWorker) or w.invoked_at is None:
                    continue
                if now >= self.retire_deadline(w) - self.replacement_lead and \
                        name in self.worker_spec:
                    self._rotate(name, w)
            self._warn_waiting(now)

    def _rotate(self, name: str, old: FunctionWorker) -> None:
        """Start ``name``'s replacement now; retire ``name`` once it is there."""
        self._retiring[name] = old
        spec = self.worker_spec.pop(name)
        self.workers.pop(name, None)
        new_name = next(iter(self.new_worker_spec()))
        self.worker_spec[new_name] = spec
        logger.info("rotating %s -> %s (function timeout %ds)", name, new_name, self.timeout)
        asyncio.ensure_future(self._correct_state())
        asyncio.ensure_future(self._retire_rotated(name, old, new_name))

    async def _retire_rotated(self, name: str, old: FunctionWorker, new_name: str) -> None:
        deadline = self.retire_deadline(old)
        # the function itself lives on until its timeout less the handler's safety margin
        # (counted here from the invoke, before the function even started: conservative)
        last_moment = old.invoked_at + self.timeout - _HANDLER_SAFETY - 1.0
        try:
            # 1. the replacement is there (or we are out of time; while no other worker
            #    could take this one's data, until the last moment)
            while new_name not in self._addresses and self.status == Status.running and (
                    time.monotonic() < deadline or (time.monotonic() < last_moment
                                                    and not self._data_recipients(name))):
                await asyncio.sleep(0.2)
            # 2. drain: no new tasks for the old worker; let its running ones finish
            running = []
            while name in self._addresses and self.status == Status.running:
                running = await self._run_on_scheduler(drain_on_scheduler, name)
                if not running or time.monotonic() >= deadline:
                    break
                await asyncio.sleep(0.2)
            # tasks still running now would be cut off: count it; past the bound they fail
            if running and self.status == Status.running:
                await self._tasks_outlived_worker(name, running)
            # 3. retire: its data moves to peers, then it closes and its invocation returns
            #    (the p2p shuffles it takes part in restart: counted, bounded)
            shuffles = []
            if name in self._addresses and self.status == Status.running:
                shuffles = await self._run_on_scheduler(p2p_shuffles_on, name)
                await self.scheduler_comm.retire_workers(
                    names=[name], close_workers=True, remove=True,
                    stimulus_id=f"dask-lithops-rotate-{name}-{uuid.uuid4().hex[:6]}")
            if shuffles and self.status == Status.running:
                await self._shuffles_outlived_worker(name, shuffles)
            await old.close()
        except Exception:
            logger.exception("rotating out worker %s failed", name)
        finally:
            self._retiring.pop(name, None)

    async def _tasks_outlived_worker(self, name: str, keys: list) -> None:
        """Tasks still running when their worker must retire are restarted on another
        worker; a task that outlives ``LIFETIME_ATTEMPTS`` workers fails (it never ends
        within a function's time limit) instead of being retried forever."""
        over = _count_toward(self._lifetime_attempts, keys, LIFETIME_ATTEMPTS)
        if not over:
            logger.warning("worker %s retires before its function's timeout with %d tasks "
                           "still running: they start again on another worker", name, len(keys))
            return
        failure = describe(name, {
            "kind": "timeout", "timeout": self.timeout, "keys": [str(k) for k in over[:5]],
            "error": f"(tasks still running after {LIFETIME_ATTEMPTS} workers' lifetimes of "
                     f"{self.worker_lifetime:.0f}s each: {', '.join(map(str, over[:3]))})"},
            mode=self.mode, limits=self.failure_limits())
        self._record(failure)
        await self._fail_on_scheduler(str(failure), over)

    async def _shuffles_outlived_worker(self, name: str, shuffle_ids: list) -> None:
        """Retiring ``name`` restarted these p2p shuffles (distributed restarts a shuffle
        when a worker taking part leaves).  A shuffle longer than the time between two
        rotations would restart forever: after ``SHUFFLE_RESTARTS`` it fails, naming the
        fix."""
        over = _count_toward(self._shuffle_restarts, shuffle_ids, SHUFFLE_RESTARTS)
        if not over:
            logger.warning("worker %s retired before its function's timeout during p2p "
                           "shuffle %s, which restarts", name, ", ".join(shuffle_ids))
            return
        every = self.worker_lifetime / max(1, len(self.worker_spec))
        failure = WorkerFailure(
            name, "timeout",
            f"p2p shuffle {over[0]} was restarted {SHUFFLE_RESTARTS} times because workers "
            f"taking part reached the end of their lifetime (function timeout "
            f"{self.timeout}s; with {len(self.worker_spec)} workers one retires about every "
            f"{every:.0f}s): it takes longer than the time between two rotations",
            "use the task-based shuffle, which survives rotations: dask.config.set("
            "{'dataframe.shuffle.method': 'tasks', 'array.rechunk.method': 'tasks'}); or "
            f"raise runtime_timeout (up to the backend's limit of "
            f"{self.backend.max_timeout}s); or use StandaloneCluster",
            detail={"shuffles": over, "timeout": self.timeout})
        self._record(failure)
        keys = []
        for sid in over:
            keys += await self._run_on_scheduler(p2p_restarted_keys, sid)
        await self._fail_on_scheduler(str(failure), keys)

    async def _run_on_scheduler(self, function, *args):
        """``function(*args, dask_scheduler=...)`` where the scheduler runs: here, or on its
        own host (through ``run_function``; the result comes back pickled, keys intact)."""
        if self.remote_scheduler is None:
            return function(*args, dask_scheduler=self.scheduler)
        from distributed.protocol.pickle import dumps

        answer = await self.scheduler_comm.run_function(
            function=dumps(function), args=dumps(args), kwargs=dumps({}))
        return answer["result"]

    def _data_recipients(self, name: str) -> bool:
        """Is a worker other than ``name`` registered and not being retired: one that can
        take data?"""
        return any(n != name and n not in self._retiring for n in self._addresses)

    def _warn_waiting(self, now: float) -> None:
        """Say so when invocations do not turn into workers (unreachable, or throttled)."""
        waiting = [n for n, w in self.workers.items() if isinstance(w, FunctionWorker)
                   and w.invoked_at and n not in self._addresses
                   and self.usage_tracker.records.get(n)
                   and self.usage_tracker.records[n].registered is None
                   and now - w.invoked_at > self.worker_start_timeout]
        if waiting and not self._unreachable_warned and not any(
                r.registered for r in self.usage_tracker.records.values()):
            # the check at start passed, yet nothing ever joined: the path may have closed since
            self._unreachable_warned = True
            logger.warning("no worker registered within worker_start_timeout (%.0fs) of its "
                           "invocation: %s", self.worker_start_timeout,
                           reachability.explain(self.backend, self.dial_targets()))
        if waiting and not self._addresses and not self._waiting_failed and \
                self._throttled_alone_since is None and self.status == Status.running:
            # (refused invocations, when the platform refuses: see _throttled)
            # none of the cluster's workers runs, and its invocations have not started
            # within worker_start_timeout: Lambda queues Event invocations over the
            # function's reserved or the account's concurrency (it does not refuse them),
            # for hours; computations must not wait that long in silence
            self._waiting_failed = True
            task = asyncio.ensure_future(self._fail_waiting(self._not_started_message(waiting)))
            self._throttle_retries.add(task)
            task.add_done_callback(self._throttle_retries.discard)
        if waiting and len(waiting) != self.throttle_warnings:
            self.throttle_warnings = len(waiting)
            logger.warning(
                "%d worker invocations have not started after %.0fs (throttled by the "
                "function's or account's concurrency limit?): %s", len(waiting),
                self.worker_start_timeout, ", ".join(sorted(waiting)[:10]))

    def _not_started_message(self, waiting: list) -> str:
        return (
            f"no worker has started within worker_start_timeout "
            f"({self.worker_start_timeout:.0f}s) of its invocation ({len(waiting)} "
            f"invocations of {self.function_name} waiting): the platform holds invocations "
            f"over the function's reserved concurrency or the account's concurrency limit "
            f"in its queue (other functions or clusters may use it all), or cold starts take "
            f"longer than that. Fix: free or raise the concurrency available to "
            f"{self.function_name} (its reserved concurrency, the account's limit), run fewer "
            f"workers "
            f"({self.backend.key('max_workers')}), or raise worker_start_timeout; the "
            f"invocations stay queued and computations wait for workers again once one joins")

    # ------------------------------------------------------------------ usage

    def usage(self) -> dict:
        """Per-invocation duration and memory, GB-seconds, vCPU-seconds and the estimated cost."""
        return self.usage_tracker.report()

    def __repr__(self) -> str:
        return (f"ServerlessCluster({self.name!r}, {self.scheduler_address!r}, "
                f"function={self.function_name!r}, workers={len(self.workers)}, "
                f"memory={self.memory}MB, status={self.status.name})")
