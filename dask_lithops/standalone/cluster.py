"""StandaloneCluster: machines reachable over SSH become a Dask cluster.

Where the machines come from is the host provider's business
(:mod:`.providers`: ``ssh`` = given hosts, ``aws_ec2`` = VMs).  On start the
provider's hosts are connected to and probed in parallel (runtime prepared:
host Python used as is, or a per-runtime venv built once); then the scheduler
starts (in this process, or on the first host behind an SSH tunnel) and every
host gets one worker group: ``worker_processes`` detached processes of the
shared entry point ``python -m dask_lithops.worker``.  One spec entry is one
host (``group`` = its processes), so ``scale()`` adds or removes whole hosts,
retiring their workers gracefully; ``close()`` stops every process it started
and verifies on each host that none remains.

This module holds only the cluster's own state (hosts held, scaling, release):
hosts are prepared by :mod:`.hosts`, processes run by :mod:`.launchers` (which
see a host handle, not this class), SSH is :mod:`.ssh_transport`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import weakref
from typing import ClassVar

from distributed.core import Status

from dask_lithops import config, progress
from dask_lithops.cluster import LithopsCluster

from .hosts import HostSetup, PreparedHost
from .launchers import RemoteScheduler, WorkerGroup
from .providers.base import BACKENDS, HostSpec, provider_class
from .ssh_transport import run_in_ssh_thread

logger = logging.getLogger(__name__)

SSH_KEYWORDS = ("hosts", "ssh_username", "ssh_key_filename", "known_hosts", "trust_unknown_hosts",
                "connect_timeout")  # lithops.ssh; the other keywords are lithops.standalone's
SCHEDULER_HOST = -1  # host index of a provider's own scheduler host (aws_ec2: the master VM)


def _import_dashboard() -> None:
    try:
        import distributed.dashboard.scheduler  # noqa: F401
    except ImportError:
        pass


class StandaloneCluster(LithopsCluster):
    """Dask on machines reachable over SSH: given hosts or VMs a backend creates.

    ``backend`` (``lithops.backend``; default ``ssh``) picks the host provider
    (:data:`~dask_lithops.standalone.providers.base.BACKENDS`): ``ssh`` uses the
    ``hosts`` given, ``aws_ec2`` creates, reuses or consumes EC2 VMs.  Every
    host is then prepared and run the same way.

    Keywords fall back to ``lithops.ssh.*`` (SSH logins: ``hosts``,
    ``ssh_username``, ``ssh_key_filename``, ``known_hosts``,
    ``trust_unknown_hosts``, ``connect_timeout``) and ``lithops.standalone.*``
    (everything else; the VM keys too); a VM backend's own keys to its section
    (``lithops.aws_ec2.*``).

    Parameters
    ----------
    backend: "ssh" or "aws_ec2"
    hosts: list of str
        ``ssh``: ``user@host:port`` entries (user defaults to ``ssh_username``
        or the local user, port to 22).
    worker_processes: int or "AUTO"
        Worker processes per host (Lithops' key); ``AUTO`` = the host's cores.
    threads_per_worker: int
        Threads per worker process.
    scheduler: "auto", "local" or "remote"
        ``local``: in this process (hosts dial the address they see the client
        at); ``remote``: on the first host, reached through an SSH tunnel;
        ``auto``: local when every host can reach the client, else remote.
    n_hosts: int, optional
        Hosts to start workers on at first (default: all acquired at start).
    ssh_key_filename, known_hosts, trust_unknown_hosts, connect_timeout:
        Authentication and host key checking; unknown host keys are rejected
        unless ``trust_unknown_hosts=True``.
    remote_dir: str
        Directory on the hosts for runtimes, code, payloads and logs (``~/.dask-lithops``).
    remote_python: str, optional
        The host's Python (default: ``python3.X`` matching the client, or ``python3``).
    install_runtime: bool
        Install the client's exact package versions into a venv where hosts differ.
    extra_python_packages, extra_packages: list of str
        More packages for the hosts' runtime venv (installed on the client: shipped at
        the client's version).
    package_sync: bool
        The hosts' runtime venv gets every distribution of the client's environment
        (``lithops.runtime.package_sync``, default true); false: dask-lithops'
        dependencies and the extra packages only.  See docs/runtime.md.
    exec_mode, n_vms, soft_dismantle_timeout, hard_dismantle_timeout, start_timeout,
    start_retries, region, endpoint_url, worker_instance_type, target_ami, ...:
        ``aws_ec2`` (``lithops.standalone.*`` / ``lithops.aws_ec2.*``, Lithops' key
        names; ``worker_processes``, ``ssh_username``, ``ssh_key_filename`` are
        then the ``aws_ec2`` ones): see docs/standalone-ec2.md.
    **kwargs:
        Shared options of :class:`dask_lithops.cluster.LithopsCluster` (security/tls,
        death_timeout, lifetime, dashboard_address, ...).
    """

    mode: ClassVar[str] = "standalone"
    launcher = WorkerGroup
    name_prefix = "ssh"
    default_tls = True
    default_scheduler_host = None

    def __init__(self, backend: str | None = None, hosts: list[str] | None = None,
                 worker_processes: int | str | None = None, threads_per_worker: int | None = None,
                 scheduler: str | None = None, n_hosts: int | None = None,
                 memory_limit: str | int | None = None, nanny: bool | None = None,
                 ssh_username: str | None = None, ssh_key_filename: str | None = None,
                 known_hosts: str | None = None, trust_unknown_hosts: bool | None = None,
                 connect_timeout: float | None = None, remote_dir: str | None = None,
                 remote_python: str | None = None, install_runtime: bool | None = None,
                 extra_python_packages: list[str] | None = None,
                 stop_grace: float | None = None, package_sync: bool | None = None,
                 extra_packages: list[str] | None = None, **kwargs):
        if backend is None:
            default = config.get("backend")
            backend = default if default in BACKENDS else "ssh"
        provider_cls = provider_class(backend)
        given = dict(hosts=hosts, worker_processes=worker_processes,
                     threads_per_worker=threads_per_worker, scheduler=scheduler,
                     memory_limit=memory_limit, nanny=nanny, ssh_username=ssh_username,
                     ssh_key_filename=ssh_key_filename, known_hosts=known_hosts,
                     trust_unknown_hosts=trust_unknown_hosts, connect_timeout=connect_timeout,
                     remote_dir=remote_dir, remote_python=remote_python,
                     install_runtime=install_runtime,
                     extra_python_packages=extra_python_packages, stop_grace=stop_grace)
        # keywords the backend claims (aws_ec2: its own worker_processes, ssh_username, ...)
        backend_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in provider_cls.keywords}
        backend_kw.update({k: given.pop(k) for k in list(given)
                           if k in provider_cls.keywords and given[k] is not None})
        others = {k for name in BACKENDS for k in provider_class(name).keywords} & set(kwargs)
        if others:
            raise config.ConfigError(f"{', '.join(sorted(others))}: not options of backend "
                                     f"{backend!r}; allowed backends for them: "
                                     f"{', '.join(n for n in BACKENDS if others & set(provider_class(n).keywords))}")  # noqa: E501
        ssh = config.section("ssh", **{k: given.pop(k) for k in SSH_KEYWORDS if k in given})
        opts = config.section("standalone", **given)
        provider = provider_cls.from_keywords(ssh, **backend_kw)  # validates; no I/O
        if provider.worker_processes is not None:
            opts["worker_processes"] = provider.worker_processes
        if n_hosts is not None and not 0 <= n_hosts <= provider.initial:
            raise config.ConfigError(f"n_hosts = {n_hosts!r} is invalid; allowed: 0.."
                                     f"{provider.initial}")
        self.backend = provider.name
        self.provider = provider
        self.name_prefix = provider.name_prefix
        self.standalone_options = opts
        self.scheduler_placement = opts["scheduler"]
        self.stop_grace = float(opts["stop_grace"])
        self._initial_hosts = provider.initial if n_hosts is None else n_hosts
        self._host_states: dict[int, PreparedHost] = {}
        self._next_index = 0
        self._target_hosts: int | None = None  # what scale() asked for, while hosts are acquired
        self._acquiring = 0                     # hosts being acquired for scale()
        self._grows: set[asyncio.Task] = set()
        self._used: set[int] = set()            # hosts given workers (released when they lose them)
        self._scheduler_host: PreparedHost | None = None  # a remote scheduler's own host, if any
        self.progress = progress.for_cluster(kwargs.get("quiet"), kwargs.get("silence_logs")
                                             or config.get("cluster.silence_logs"))
        self._setup = HostSetup.from_options(ssh, opts, package_sync=package_sync,
                                             extra_packages=extra_packages, progress=self.progress)
        self._runtime_spec = self._setup.runtime_spec
        kwargs.setdefault("n_workers", 0)
        super().__init__(threads_per_worker=opts["threads_per_worker"] or 1,
                         memory_limit=opts["memory_limit"], nanny=opts["nanny"], **kwargs)

    @property
    def host_specs(self) -> list[HostSpec]:
        """The hosts held now, in order."""
        return [self._host_states[i].spec for i in sorted(self._host_states)]

    @property
    def vms(self):
        """The VMs held (VM backends); ``[]`` for given hosts."""
        return list(getattr(self.provider, "vms", []))

    # ------------------------------------------------------------------ start
    async def _prepare_specs(self, specs: list[HostSpec],
                             reach_port: int | None = None) -> list[PreparedHost]:
        """Connect to and prepare hosts in parallel; raise naming every host that failed."""
        first, self._next_index = self._next_index, self._next_index + len(specs)
        hosts = await self._setup.prepare_many(specs, first, reach_port)
        for h in hosts:
            h.scheduler_address_of = self._scheduler_address_for
        return hosts

    async def _prepare_hosts(self) -> None:
        self.provider.cluster_id = self.cluster_id
        self.provider.runtime = self._runtime_spec.key
        probe = None
        reach_port = None

        async def workers():
            if hasattr(self.provider, "vms"):  # VMs boot: minutes, say so
                with self.progress.phase(f"starting {self.provider.initial} "
                                         f"{self.provider.name} VMs") as phase:
                    specs = await self.provider.acquire(self.provider.initial)
                    phase.detail = f"{len(specs)} reachable over SSH"
            else:
                specs = await self.provider.acquire(self.provider.initial)
            return await self._prepare_specs(specs, reach_port)

        try:
            if self.scheduler_placement == "auto":
                probe = socket.socket()
                probe.bind(("0.0.0.0", 0))
                probe.listen(64)
                reach_port = probe.getsockname()[1]
            jobs = [workers()]
            if self.scheduler_placement == "remote":  # its own host starts meanwhile
                jobs.append(self._acquire_scheduler_host())
            results = await asyncio.gather(*jobs, return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                for r in results:
                    if isinstance(r, list):
                        for h in r:
                            h.close()
                if self._scheduler_host is not None:
                    self._scheduler_host.close()
                    self._scheduler_host = None
                raise errors[0]
            states = results[0]
        except BaseException:
            await self.provider.close()  # nothing acquired outlives a failed start
            raise
        finally:
            if probe is not None:
                probe.close()
        self._host_states = {h.index: h for h in states}

    async def _start(self):
        if self.status in (Status.running, Status.closed):
            return await super()._start()
        if not self._host_states:
            # the in-process scheduler's dashboard import (bokeh) takes seconds: overlap it
            # with connecting to and probing the hosts instead of blocking the loop later
            warm = [run_in_ssh_thread(_import_dashboard)] \
                if self.scheduler_spec["options"].get("dashboard") else []
            await asyncio.gather(self._prepare_hosts(), *warm)
        placement = self.scheduler_placement
        if placement == "auto":
            unreachable = [str(h.conn) for h in self._host_states.values()
                           if h.runtime.client_reachable is False]
            placement = "remote" if unreachable else "local"
            if unreachable:
                logger.info("hosts %s cannot reach this client: scheduler on %s",
                            unreachable, self._host_states[0].conn)
        if placement == "remote" and self._scheduler_host is None:
            await self._prepare_scheduler_host()
        if placement == "remote" and self._scheduler_host is None and 0 not in self._host_states:
            await self.provider.close()
            raise config.ConfigError("scheduler 'remote' needs a host; the provider gave none")
        self.scheduler_placement = placement
        options = self.scheduler_spec["options"]
        if placement == "remote":
            host = self._scheduler_host or self._host_states[0]
            self.scheduler_spec = {"cls": RemoteScheduler, "options": {
                "host": host, "run_id": self.cluster_id, "port": options.get("port"),
                "protocol": options.get("protocol"), "security": self._security,
                "dashboard": bool(options.get("dashboard")),
                "start_timeout": self.worker_start_timeout}}
        elif not options.get("host"):
            seen = {h.runtime.client_address for h in self._host_states.values()}
            options["host"] = seen.pop() if len(seen) == 1 and None not in seen else "0.0.0.0"
        for i in sorted(self._host_states)[:self._initial_hosts]:
            self.worker_spec[self._host_key(i)] = self._host_spec(i)
            self._used.add(i)
        return await super()._start()

    async def _acquire_scheduler_host(self) -> None:
        """Get and prepare the provider's own host for the scheduler, if it has one."""
        spec = await self.provider.acquire_scheduler_host()
        if spec is not None:
            self._scheduler_host = await run_in_ssh_thread(self._setup.prepare, spec,
                                                           SCHEDULER_HOST)

    async def _prepare_scheduler_host(self) -> None:
        try:
            await self._acquire_scheduler_host()
        except BaseException:
            await self.provider.close()  # nothing acquired outlives a failed start
            raise

    def _host_key(self, i: int) -> str:
        return f"{self.name_prefix}-{i}"

    def _host_spec(self, i: int) -> dict:
        h = self._host_states[i]
        return {"cls": WorkerGroup,
                "options": {"cluster": weakref.ref(self), "host": h, "run_id": self.cluster_id,
                            "start_timeout": self.worker_start_timeout,
                            "stop_grace": self.stop_grace},
                "group": [f"-{k}" for k in range(h.processes)]}

    def _scheduler_address_for(self, h: PreparedHost) -> str:
        if isinstance(self.scheduler, RemoteScheduler):
            return self.scheduler.worker_address
        if self.contact_host:
            return self.worker_scheduler_address
        address = self.scheduler.address
        protocol, rest = address.split("://")
        port = rest.rsplit(":", 1)[1]
        host = h.runtime.client_address or rest.rsplit(":", 1)[0]
        return f"{protocol}://{host}:{port}"

    # ------------------------------------------------------------------ scaling
    def new_worker_spec(self):
        for i in sorted(self._host_states):
            if self._host_key(i) not in self.worker_spec:
                self._used.add(i)
                return {self._host_key(i): self._host_spec(i)}
        return {}

    def _processes_per_new_host(self) -> int:
        wp = self.standalone_options["worker_processes"]
        if wp is not None and str(wp).upper() != "AUTO":
            return int(wp)
        return max((h.processes for h in self._host_states.values()), default=1)

    def scale(self, n: int | None = None, hosts: int | None = None, memory=None, cores=None):
        """Scale to ``hosts`` hosts, or to enough hosts for ``n`` workers (whole hosts).

        Beyond the hosts held, the provider is asked for more (up to its
        ``maximum``: EC2 creates VMs); hosts whose workers are removed go back
        to the provider (EC2: terminated or stopped).
        """
        if hosts is None:
            n = n or 0
            if memory is not None or cores is not None:
                return super().scale(n, memory=memory, cores=cores)
            order = [int(k.rsplit("-", 1)[1]) for k in self.worker_spec] + \
                [i for i in sorted(self._host_states) if self._host_key(i) not in self.worker_spec]
            total, hosts = 0, 0
            for i in order:
                if total >= n:
                    break
                total += self._host_states[i].processes
                hosts += 1
            if total < n:
                per = self._processes_per_new_host()
                hosts += -(-(n - total) // per)
        hosts = max(0, min(int(hosts), self.provider.maximum))
        self._target_hosts = hosts
        while len(self.worker_spec) > hosts:
            self.worker_spec.popitem()
        grow = None
        if self.status not in (Status.closing, Status.closed):
            while len(self.worker_spec) < hosts:
                new = self.new_worker_spec()
                if not new:
                    break
                self.worker_spec.update(new)
            more = min(hosts - len(self.worker_spec) - self._acquiring,
                       self.provider.maximum - len(self._host_states) - self._acquiring)
            if more > 0:
                self._acquiring += more
                grow = more
        self.loop.add_callback(self._correct_state)
        if self.asynchronous:
            from distributed.utils import NoOpAwaitable

            return self._spawn_grow(grow) if grow else NoOpAwaitable()
        if grow:
            self.loop.add_callback(self._spawn_grow, grow)

    def _spawn_grow(self, n: int) -> asyncio.Task:
        task = asyncio.ensure_future(self._grow(n))
        self._grows.add(task)
        task.add_done_callback(self._grows.discard)
        return task

    async def _grow(self, n: int) -> None:
        """Acquire ``n`` more hosts from the provider, prepare them, give them workers."""
        specs: list[HostSpec] = []
        try:
            if self.status in (Status.closing, Status.closed):
                return
            specs = await self.provider.acquire(n)
            states = await self._prepare_specs(specs) if specs else []
        except Exception as e:
            logger.warning("scale: could not add %d hosts: %s", n, e)
            if specs:
                await self.provider.release(specs)
            return
        finally:
            self._acquiring -= n
        if self.status in (Status.closing, Status.closed):
            await self._release_states(states)
            return
        self._host_states.update({h.index: h for h in states})
        target = self._target_hosts if self._target_hosts is not None else len(self.worker_spec)
        while len(self.worker_spec) < target:
            new = self.new_worker_spec()
            if not new:
                break
            self.worker_spec.update(new)
        surplus = [h for h in states if h.index not in self._used]
        if surplus:  # scaled down meanwhile: hold nothing idle
            for h in surplus:
                del self._host_states[h.index]
            await self._release_states(surplus)
        await self._correct_state()

    async def _replaceable(self, spec_name: str) -> bool:
        # a worker group is started again only on a host that still answers
        launcher = self.workers.get(spec_name)
        host = getattr(launcher, "host", None)
        if host is None:
            return True
        try:
            await asyncio.wait_for(run_in_ssh_thread(lambda: host.ensure_connected().run("true")),
                                   15)
            return True
        except Exception as e:
            logger.warning("%s: host lost (%s): its workers are not replaced there", host, e)
            return False

    async def _correct_state_internal(self) -> None:
        await super()._correct_state_internal()
        if self.status != Status.running:
            return  # closing: the provider releases everything at once
        gone = [i for i in self._used
                if i in self._host_states and self._host_key(i) not in self.worker_spec
                and self._host_key(i) not in self.workers
                and not (i == 0 and isinstance(self.scheduler, RemoteScheduler))]
        self._used -= set(gone)
        if gone:
            await self._release_states([self._host_states.pop(i) for i in gone])

    async def _release_states(self, states: list[PreparedHost]) -> None:
        await asyncio.gather(*(run_in_ssh_thread(h.close) for h in states),
                             return_exceptions=True)
        try:
            await self.provider.release([h.spec for h in states])
        except Exception as e:
            logger.warning("could not release hosts %s: %s", [str(h.spec) for h in states], e)

    # ------------------------------------------------------------------ info, logs, close
    @property
    def dashboard_link(self):
        if isinstance(self.scheduler, RemoteScheduler):
            if not self.scheduler.dashboard_port:
                return ""
            from distributed.utils import format_dashboard_link

            return format_dashboard_link("127.0.0.1", self.scheduler.dashboard_port)
        return super().dashboard_link

    async def _get_logs(self, cluster=True, scheduler=True, workers=True):
        logs = await super()._get_logs(cluster=cluster, scheduler=scheduler, workers=workers)
        groups = [w for w in self.workers.values() if isinstance(w, WorkerGroup)]
        if workers and groups:
            results = await asyncio.gather(*(run_in_ssh_thread(g.fetch_logs) for g in groups),
                                           return_exceptions=True)
            for r in results:
                if isinstance(r, dict):
                    for name, text in r.items():
                        logs[f"{name} (host log)"] = text
        if scheduler and isinstance(self.scheduler, RemoteScheduler):
            logs["scheduler (host log)"] = await run_in_ssh_thread(self.scheduler.read_log)
        return logs

    def remote_processes(self) -> dict[str, list[int]]:
        """PIDs this cluster started and still tracks, by worker group."""
        return {name: list(w.pids) for name, w in self.workers.items()
                if isinstance(w, WorkerGroup)}

    async def _close(self):
        try:
            await super()._close()
        finally:
            states, self._host_states = list(self._host_states.values()), {}
            if self._scheduler_host is not None:
                states.append(self._scheduler_host)
                self._scheduler_host = None
            try:
                await asyncio.gather(*(run_in_ssh_thread(h.close) for h in states),
                                     *self._grows, return_exceptions=True)  # grows release
            finally:
                await self.provider.close()

    def __repr__(self) -> str:
        return (f"StandaloneCluster(backend={self.backend!r}, {self.scheduler_address!r}, "
                f"{self.provider.summary()}, "
                f"workers={len(self.scheduler_info.get('workers', {}))}, "
                f"status={self.status.name})")

