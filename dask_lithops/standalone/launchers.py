"""What runs on a prepared host: a worker group, or a remote scheduler.

Both work on a :class:`~.hosts.PreparedHost` (the host handle: connection,
runtime, the scheduler address its workers dial, reconnect) and on what their
options say; neither reads a cluster's state.  Every blocking SSH call runs in
the SSH thread pool.

* :class:`WorkerGroup` -- a ``SpecCluster`` worker spec entry: one host's
  ``processes`` detached processes of ``python -m dask_lithops.worker``.
* :class:`RemoteScheduler` -- a ``SpecCluster`` scheduler spec (or used on its
  own): a Dask scheduler, optionally with a ``relay://`` relay, on a host,
  reached through SSH tunnels and tethered to the SSH session.
"""

from __future__ import annotations

import json
import logging

from distributed.deploy.spec import ProcessInterface

from dask_lithops.cluster import WorkerLauncher, WorkerLaunchError, inherited_config
from dask_lithops.payload import SchedulerPayload, encode, security_to_dict

from .bootstrap import ensure_private_dirs, read_log, start_processes, stop_processes
from .hosts import PreparedHost
from .ssh_transport import SSHError, quote, run_in_ssh_thread

logger = logging.getLogger(__name__)

SCHEDULER_MARK = b"DASK_LITHOPS_SCHEDULER "
SCHEDULER_MODULE = "dask_lithops.standalone.remote_scheduler"


def _marked_line(buf: bytes) -> bytes | None:
    """The scheduler's report line, once complete."""
    for line in buf.split(b"\n")[:-1]:
        if line.startswith(SCHEDULER_MARK):
            return line
    return None


class WorkerGroup(WorkerLauncher):
    """One host's worker group: ``host.processes`` entry-point processes, detached.

    Spec entry options (besides SpecCluster's ``scheduler`` and ``name``):

    cluster: weakref to the cluster
        Only its public :meth:`~dask_lithops.cluster.LithopsCluster.launch_payload`
        is used (one payload per process ``<name>-<k>``).
    host: PreparedHost
        Where to run; ``host.scheduler_address()`` is what the workers dial.
    run_id: str
        Names the host's run and log directories (the cluster id).
    start_timeout: float
        Seconds for every process to report ready.
    stop_grace: float
        Seconds between SIGTERM and SIGKILL on stop.

    After start: ``pids`` (of the detached sessions), ``proc_names``, ``log_paths``.
    """

    def __init__(self, scheduler: str, name: str, cluster, host: PreparedHost, run_id: str,
                 start_timeout: float = 120.0, stop_grace: float = 10.0):
        super().__init__(scheduler, name, cluster)
        self.host = host
        self.run_id = run_id
        self.start_timeout = start_timeout
        self.stop_grace = stop_grace
        self.pids: list[int] = []
        self.proc_names = [f"{name}-{k}" for k in range(host.processes)]
        self.log_paths: dict[str, str] = {}
        self.marker = ""

    async def start(self) -> None:
        await self.launch(None)
        await ProcessInterface.start(self)

    async def launch(self, payload) -> None:
        h = self.host
        run_dir, log_dir = h.run_dir(self.run_id), h.log_dir(self.run_id)
        self.marker = f"{run_dir}/{self.name}-"
        scheduler_address = h.scheduler_address()
        payloads = {}
        for n in self.proc_names:
            p = self.cluster.launch_payload(n)
            p.scheduler_address = scheduler_address
            payloads[n] = encode(p)
        procs = []
        for n in self.proc_names:
            self.log_paths[n] = f"{log_dir}/{n}.log"
            procs.append({"name": n, "log": self.log_paths[n],
                          "argv": [h.runtime.python, "-m", "dask_lithops.worker",
                                   "--payload-file", f"{run_dir}/{n}.payload"]})

        def go():
            conn = h.conn
            ensure_private_dirs(conn, run_dir, log_dir)
            for n, data in payloads.items():
                conn.put(data, f"{run_dir}/{n}.payload", mode=0o600)
            return start_processes(conn, h.runtime, procs, cwd=h.runtime.remote_dir,
                                   timeout=self.start_timeout)

        result = await run_in_ssh_thread(go)
        self.pids = result["pids"]
        if result["errors"]:
            await self.stop()
            detail = "; ".join(f"{n}: {e.get('type')}: {e.get('message', '')[-1500:]}"
                               for n, e in result["errors"].items())
            raise WorkerLaunchError(f"{h}: worker group {self.name} failed to start: {detail}")
        ready = list(result["ready"].values())
        self.address = ready[0]["address"] if ready else None
        logger.info("%s: started %d workers (pids %s)", h, len(self.pids), self.pids)

    async def stop(self) -> None:
        if not self.pids:
            return
        pids, self.pids = self.pids, []
        h = self.host

        def go():
            return stop_processes(h.ensure_connected(), h.runtime, pids, self.marker,
                                  grace=self.stop_grace)

        try:
            remaining = await run_in_ssh_thread(go)
        except (SSHError, OSError, EOFError) as e:
            logger.warning("%s: could not stop worker group %s (pids %s): host unreachable: "
                           "%s", h, self.name, pids, e)
            return
        if remaining:
            raise WorkerLaunchError(f"{h}: processes {remaining} of worker group "
                                    f"{self.name} survived SIGKILL")

    def fetch_logs(self) -> dict[str, str]:
        """Each process' log file on the host (blocking)."""
        return {n: read_log(self.host.conn, p) for n, p in self.log_paths.items()}


class RemoteScheduler(ProcessInterface):
    """A Dask scheduler (optionally with a relay) on a prepared host, reached through SSH.

    Use it as a ``SpecCluster`` scheduler spec, ``{"cls": RemoteScheduler,
    "options": {...}}``, or on its own (``s = await RemoteScheduler(...)``,
    ``await s.close()``) with any host a
    :class:`~.providers.base.HostProvider` gave and
    :meth:`~.hosts.HostSetup.prepare` prepared.

    Parameters
    ----------
    host: PreparedHost
        Where it runs.
    run_id: str
        Names the host's run and log directories.
    security: distributed.Security, optional
        TLS material (shipped as PEM in a 0600 file, deleted once read); the
        scheduler serves with its own certificate, else the worker's.
    port, protocol:
        Where it listens on the host (port 0: any; protocol ``tls://``/``tcp://``).
    listen_host: str, optional
        Interface to listen on (default: the host's address as the client
        reached it; ``"0.0.0.0"`` for every interface).
    dashboard: bool
        Serve the dashboard (on the host's loopback, tunnelled to the client).
    relay: dict, optional
        Run a ``relay://`` relay in the same process: ``{"host": None,
        "port": 0}`` (host None: ``listen_host``).  Its token is the
        ``relay_token`` in ``security.extra_conn_args``
        (:func:`dask_lithops.relay.relay_security`).
    config: dict, optional
        Dask config for the scheduler (default: the client's, as workers get it).
    idle_timeout: float, optional
        The scheduler closes after this long without work.
    start_timeout: float
        Seconds to wait for it to report its address.

    After ``start()``
    -----------------
    address: the scheduler as the client reaches it (a local SSH tunnel,
    ``tls://127.0.0.1:<port>``); worker_address: as the host's network sees it
    (what workers dial); dashboard_port: local port of the dashboard tunnel, or
    None; relay_address: ``host:port`` of the relay on the host's network, or
    None; relay_local_address: ``127.0.0.1:<port>`` tunnel to the relay, or None;
    pid, log_path; :meth:`read_log`.

    Lifetime: it runs until its SSH session's stdin closes (the client closed
    it or died) or SIGTERM; :meth:`close` ends it and verifies on the host that
    no process of it remains.
    """

    def __init__(self, host: PreparedHost, run_id: str, security=None, port: int | None = 0,
                 protocol: str | None = None, listen_host: str | None = None,
                 dashboard: bool = False, relay: dict | None = None, config: dict | None = None,
                 idle_timeout: float | None = None, start_timeout: float = 120.0):
        super().__init__()
        self.host = host
        self.run_id = run_id
        self.security = security
        self.port = port or 0
        self.protocol = protocol
        self.listen_host = listen_host
        self.dashboard = dashboard
        self.relay = relay
        self.config = config
        self.idle_timeout = idle_timeout
        self.start_timeout = start_timeout
        self.channel = None
        self.pid: int | None = None
        self.worker_address: str | None = None
        self.dashboard_port: int | None = None
        self.relay_address: str | None = None
        self.relay_local_address: str | None = None
        self.log_path: str | None = None
        self.tunnels = []

    def payload(self) -> SchedulerPayload:
        h = self.host
        listen = self.listen_host or h.runtime.server_address or h.spec.host
        relay = None
        if self.relay is not None:
            relay = {"host": self.relay.get("host") or listen, "port": self.relay.get("port") or 0}
            token = (getattr(self.security, "extra_conn_args", None) or {}).get("relay_token")
            if not token:
                raise ValueError("RemoteScheduler(relay=...) needs a relay token in "
                                 "security.extra_conn_args (dask_lithops.relay.relay_security)")
        return SchedulerPayload(
            host=listen, port=self.port, protocol=self.protocol,
            security=security_to_dict(self.security, scheduler=True),
            dashboard_address="127.0.0.1:0" if self.dashboard else None,
            config=inherited_config() if self.config is None else self.config,
            idle_timeout=self.idle_timeout, relay=relay)

    async def start(self) -> None:
        h = self.host
        run_dir, log_dir = h.run_dir(self.run_id), h.log_dir(self.run_id)
        self.log_path = f"{log_dir}/scheduler.log"
        pfile = f"{run_dir}/scheduler.payload"
        data = self.payload().encode()
        cmd = (f"cd {quote(h.runtime.remote_dir)} && "
               f"PYTHONPATH={quote(h.runtime.env['PYTHONPATH'])} exec "
               f"{quote(h.runtime.python)} -m {SCHEDULER_MODULE} "
               f"--payload-file {quote(pfile)} 2>>{quote(self.log_path)}")

        def go():
            conn = h.conn
            ensure_private_dirs(conn, run_dir, log_dir)
            conn.put(data, pfile, mode=0o600)
            chan = conn.exec_channel(cmd)
            buf = b""
            chan.settimeout(self.start_timeout)
            while (line := _marked_line(buf)) is None:
                chunk = chan.recv(4096)
                if not chunk:
                    log = read_log(conn, self.log_path, 20000)
                    chan.close()
                    raise WorkerLaunchError(f"{h}: remote scheduler failed to start:\n"
                                            f"{log[-3000:]}")
                buf += chunk
            chan.settimeout(None)
            return chan, json.loads(line[len(SCHEDULER_MARK):])

        self.channel, info = await run_in_ssh_thread(go)
        self.pid = info["pid"]
        self.worker_address = info["address"]
        protocol, rest = info["address"].split("://")
        rhost, rport = rest.rsplit(":", 1)
        t = h.conn.forward_local(rhost, int(rport))
        self.tunnels.append(t)
        self.address = f"{protocol}://127.0.0.1:{t.local_port}"
        if info.get("dashboard_port"):
            d = h.conn.forward_local("127.0.0.1", info["dashboard_port"])
            self.tunnels.append(d)
            self.dashboard_port = d.local_port
        if info.get("relay_address"):
            rhost, rport = info["relay_address"].rsplit(":", 1)
            if rhost in ("0.0.0.0", "[::]"):  # every interface: name the one the client reached
                rhost = h.runtime.server_address or h.spec.host
            self.relay_address = f"{rhost}:{rport}"
            r = h.conn.forward_local(rhost, int(rport))
            self.tunnels.append(r)
            self.relay_local_address = f"127.0.0.1:{r.local_port}"
        await super().start()

    def read_log(self) -> str:
        """The scheduler's log on the host (blocking)."""
        return read_log(self.host.conn, self.log_path) if self.log_path else ""

    async def close(self) -> None:
        h = self.host

        def go():
            if self.channel is not None:
                self.channel.close()  # stdin EOF: the scheduler shuts down
            for t in self.tunnels:
                t.close()
            if self.pid:
                remaining = stop_processes(h.ensure_connected(), h.runtime, [self.pid],
                                           SCHEDULER_MODULE, grace=10)
                if remaining:
                    raise WorkerLaunchError(f"{h}: scheduler processes {remaining} survived")

        try:
            await run_in_ssh_thread(go)
        except (SSHError, OSError, EOFError) as e:
            logger.warning("remote scheduler: could not verify its stop: %s", e)
        await super().close()

    def __repr__(self) -> str:
        return f"<RemoteScheduler on {self.host}: {self.address or 'not started'}>"
