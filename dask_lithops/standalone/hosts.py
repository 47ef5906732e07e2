"""Hosts ready to run Dask processes: connected over SSH, runtime prepared.

A provider (:mod:`.providers`) hands out :class:`~.ssh_transport.HostSpec`\\ s;
:class:`HostSetup` turns each into a :class:`PreparedHost` -- the *host handle*
the launchers (:mod:`.launchers`) work with -- by connecting and preparing the
host's runtime (:func:`~.remote_runtime.prepare_host`: the host's Python used
as it is, or a per-runtime venv built once).  Many hosts are prepared in
parallel; a failure names every host that failed and closes what was opened.

Nothing here belongs to a cluster: :class:`~.cluster.StandaloneCluster` uses it
for its worker hosts, and any cluster that wants a scheduler on a host of its
own (e.g. a serverless cluster whose functions cannot reach the client) uses it
the same way with a :class:`~.providers.base.HostProvider`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from dask_lithops.progress import SILENT, Progress

from .remote_runtime import HostRuntime, RuntimeSpec, client_runtime, prepare_host
from .ssh_transport import (
    HostSpec,
    SSHConnection,
    combine_errors,
    connect,
    connect_defaults,
    run_in_ssh_thread,
)

RECONNECT_TIMEOUT = 5.0  # seconds: a dropped connection is re-opened quickly or not at all


@dataclass(eq=False)
class PreparedHost:
    """The host handle: one host as the launchers see it.

    ``spec`` (where), ``conn`` (an open :class:`~.ssh_transport.SSHConnection`),
    ``runtime`` (the :class:`~.remote_runtime.HostRuntime`: python, env,
    ``remote_dir``, addresses), ``processes`` (worker processes it runs) and
    ``index`` (its number in its cluster, for names).

    :meth:`scheduler_address` is the address this host's workers dial (set by
    whoever runs the scheduler, through ``scheduler_address_of``);
    :meth:`reconnect` replaces a dropped connection.  Blocking methods: call
    them in the SSH thread pool (:func:`~.ssh_transport.run_in_ssh_thread`).
    """

    index: int
    spec: HostSpec
    conn: SSHConnection
    runtime: HostRuntime
    processes: int = 1
    connect_options: dict = field(default_factory=dict, repr=False)
    scheduler_address_of: Callable[[PreparedHost], str] | None = field(default=None, repr=False)

    def __str__(self) -> str:
        return str(self.spec)

    def scheduler_address(self) -> str:
        """The scheduler address as this host's workers must dial it."""
        if self.scheduler_address_of is None:
            raise RuntimeError(f"{self}: no scheduler address yet (the scheduler is not running)")
        return self.scheduler_address_of(self)

    def run_dir(self, run_id: str) -> str:
        """Directory (0700) for one cluster's payloads on this host."""
        return f"{self.runtime.remote_dir}/run/{run_id}"

    def log_dir(self, run_id: str) -> str:
        """Directory (0700) for one cluster's logs on this host."""
        return f"{self.runtime.remote_dir}/logs/{run_id}"

    def ensure_connected(self) -> SSHConnection:
        """The connection, re-opened first if it dropped (blocking)."""
        if not self.conn.is_active():
            self.reconnect()
        return self.conn

    def reconnect(self) -> SSHConnection:
        """Open a new connection (short timeout) in place of ``conn`` (blocking)."""
        old = self.conn
        self.conn = connect(self.spec, **{**self.connect_options,
                                          "connect_timeout": RECONNECT_TIMEOUT})
        try:
            old.close()
        except Exception:
            pass
        return self.conn

    def close(self) -> None:
        self.conn.close()


def _processes(value, cores: int) -> int:
    if value is None or str(value).upper() == "AUTO":
        return max(1, cores)
    return int(value)


@dataclass
class HostSetup:
    """How to connect to and prepare hosts (the resolved standalone options).

    ``connect_options``: keywords of :func:`~.ssh_transport.connect` (a host's
    own :class:`~.ssh_transport.HostSpec` fields override them);
    ``runtime_spec``: what the client expects on every host; ``remote_dir``,
    ``remote_python``, ``install_runtime``: see :func:`~.remote_runtime.prepare_host`;
    ``worker_processes``: per host, ``AUTO``/None for its cores.
    """

    connect_options: dict
    runtime_spec: RuntimeSpec
    remote_dir: str = "~/.dask-lithops"
    remote_python: str | None = None
    install_runtime: bool = True
    worker_processes: int | str | None = "AUTO"
    progress: Progress = SILENT

    @classmethod
    def from_options(cls, ssh: dict, standalone: dict, package_sync: bool | None = None,
                     extra_packages=(), progress: Progress = SILENT) -> HostSetup:
        """From resolved ``lithops.ssh`` and ``lithops.standalone`` options.

        ``package_sync`` (None: ``lithops.runtime.package_sync``) and ``extra_packages``
        decide what the runtime holds (docs/runtime.md); ``progress`` reports its phases.
        """
        extras = [*(standalone.get("extra_python_packages") or ()), *(extra_packages or ())]
        return cls(connect_defaults(ssh),
                   client_runtime(extras, package_sync, progress),
                   remote_dir=standalone["remote_dir"], remote_python=standalone["remote_python"],
                   install_runtime=bool(standalone["install_runtime"]),
                   worker_processes=standalone.get("worker_processes"), progress=progress)

    def prepare(self, spec: HostSpec, index: int = 0,
                reach_port: int | None = None) -> PreparedHost:
        """Connect to ``spec`` and prepare its runtime (blocking).

        ``reach_port``: a port listening on the client; the host reports
        whether it can reach it (``runtime.client_reachable``).
        """
        options = spec.connect_kwargs(self.connect_options)
        conn = connect(spec, **options)
        try:
            rt = prepare_host(conn, self.runtime_spec, remote_dir=self.remote_dir,
                              remote_python=self.remote_python,
                              install_runtime=self.install_runtime, reach_port=reach_port,
                              progress=self.progress)
        except BaseException:
            conn.close()
            raise
        return PreparedHost(index, spec, conn, rt, _processes(self.worker_processes, rt.cpu_count),
                            options)

    async def prepare_many(self, specs: list[HostSpec], first_index: int = 0,
                           reach_port: int | None = None) -> list[PreparedHost]:
        """Prepare hosts in parallel (indices from ``first_index``); raise naming every failure.

        On failure every host that did connect is closed again.
        """
        with self.progress.phase(f"preparing {len(specs)} hosts", total=len(specs),
                                 unit="hosts") as phase:
            def prepare(spec, index):
                host = self.prepare(spec, index, reach_port)
                phase.advance()
                return host

            results = await asyncio.gather(
                *(run_in_ssh_thread(prepare, s, first_index + k) for k, s in enumerate(specs)),
                return_exceptions=True)
            phase.detail = self._describe([r for r in results if isinstance(r, PreparedHost)])
        errors = {str(s): r for s, r in zip(specs, results) if isinstance(r, BaseException)}
        if errors:
            for r in results:
                if isinstance(r, PreparedHost):
                    r.close()
            raise combine_errors(errors)
        return list(results)

    def _describe(self, hosts: list[PreparedHost]) -> str:
        key = self.runtime_spec.key
        installed = sum(h.runtime.installed for h in hosts)
        in_venv = sum(f"/runtimes/{key}/" in h.runtime.python for h in hosts)
        return f"runtime {key}, " + (f"venv installed by {installed} hosts" if installed else
                                     "venv reused" if in_venv else "hosts' Python used as it is")
