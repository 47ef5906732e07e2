"""LocalhostCluster: workers are local OS processes running the shared entry point."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import tempfile
from typing import ClassVar

from distributed.deploy.utils import nprocesses_nthreads

from dask_lithops import config
from dask_lithops.cluster import LithopsCluster, WorkerLauncher, WorkerLaunchError, cpu_count
from dask_lithops.payload import LaunchPayload, encode
from dask_lithops.worker import ERROR_MARK, READY_MARK

_STOP_GRACE = 10.0


class LocalhostWorker(WorkerLauncher):
    """``python -m dask_lithops.worker --payload -`` as a child process."""

    process: asyncio.subprocess.Process | None = None
    log_path: str | None = None
    _stdout_log = None
    _stopping = False

    async def launch(self, payload: LaunchPayload) -> None:
        cluster = self.cluster
        self.log_path = os.path.join(cluster.log_directory, f"{self.name}.log")
        log = open(self.log_path, "ab")
        try:
            self.process = await asyncio.create_subprocess_exec(
                *cluster.worker_command(),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
                start_new_session=True,  # its own process group: we stop nanny and worker together
            )
        finally:
            log.close()
        self.process.stdin.write(encode(payload))
        await self.process.stdin.drain()
        self.process.stdin.close()
        try:
            info = await asyncio.wait_for(self._read_marker(), cluster.worker_start_timeout)
        except asyncio.TimeoutError:
            await self.stop()
            raise WorkerLaunchError(
                f"worker {self.name} did not start within {cluster.worker_start_timeout:.0f}s "
                f"(lithops.cluster.worker_start_timeout); log {self.log_path}:\n{self._tail()}"
            ) from None
        if info is None or "error" in info:
            await self.stop()
            error = (info or {}).get("error") or {}
            raise WorkerLaunchError(
                f"worker {self.name} failed to start: "
                f"{error.get('type', 'exit code %s' % self.process.returncode)}: "
                f"{error.get('message', '')}\n{self._tail()}")
        self.address = info["address"]
        self._drain = asyncio.ensure_future(self._copy_stdout())
        self._watch = asyncio.ensure_future(self._watch_exit())

    async def _watch_exit(self) -> None:
        """The process ended without stop(): tell the cluster how (exit code or signal)."""
        code = await self.process.wait()
        if self._stopping:
            return
        self.report_end({"kind": "signal", "signal": -code} if code < 0 else
                        {"kind": "exit" if code else "finished", "exitcode": code})

    async def _read_marker(self) -> dict | None:
        while True:
            line = await self.process.stdout.readline()
            if not line:
                await self.process.wait()
                return None
            text = line.decode(errors="replace").rstrip("\n")
            if text.startswith(READY_MARK + " "):
                return json.loads(text[len(READY_MARK) + 1:])
            if text.startswith(ERROR_MARK + " "):
                return {"error": json.loads(text[len(ERROR_MARK) + 1:])}
            self._append_log(line)

    async def _copy_stdout(self) -> None:
        # Task output (print) goes to the worker's stdout: keep it in its log.
        while self.process and self.process.stdout:
            line = await self.process.stdout.readline()
            if not line:
                return
            self._append_log(line)

    def _append_log(self, line: bytes) -> None:
        if self._stdout_log is None:  # opened once: chatty tasks print line by line
            self._stdout_log = open(self.log_path, "ab", buffering=0)
        self._stdout_log.write(line)

    def _tail(self, n: int = 30) -> str:
        text = self.logs() or ""
        return "\n".join(text.splitlines()[-n:])

    async def stop(self) -> None:
        self._stopping = True
        try:
            await self._stop_process()
            drain = getattr(self, "_drain", None)
            if drain is not None:  # the last lines of output, then EOF
                await asyncio.wait([drain], timeout=5)
        finally:
            if self._stdout_log is not None:
                self._stdout_log.close()
                self._stdout_log = None

    async def _stop_process(self) -> None:
        proc = self.process
        if proc is None or proc.returncode is not None:
            self._kill_group(signal.SIGKILL)
            return
        self._kill_group(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), _STOP_GRACE)
        except asyncio.TimeoutError:
            pass
        self._kill_group(signal.SIGKILL)
        await proc.wait()

    def _kill_group(self, sig: int) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def logs(self) -> str | None:
        if not self.log_path or not os.path.exists(self.log_path):
            return None
        with open(self.log_path, errors="replace") as f:
            return f.read()


class LocalhostCluster(LithopsCluster):
    """Dask workers as local processes, each started through the dask-lithops entry point.

    Defaults mirror ``distributed.LocalCluster``: cores and memory split among
    workers, a nanny per worker, dashboard on :8787 when bokeh is installed.

    Parameters
    ----------
    n_workers: int, optional
        Worker processes (``lithops.localhost.n_workers``; Lithops' key
        ``worker_processes``, where ``AUTO`` is one per core, is also read).
    threads_per_worker: int, optional
    memory_limit: str or int
        Per worker; ``"auto"`` splits the machine's memory by threads.
    worker_processes: int or "AUTO"
        Lithops' name for ``n_workers``.
    runtime: str, optional
        The Python interpreter that runs workers (default: this one).
    relay: bool
        Workers behind the ``relay://`` comm, as in serverless mode.
    **kwargs:
        Shared options of :class:`dask_lithops.cluster.LithopsCluster`.

    Examples
    --------
    >>> from distributed import Client
    >>> client = Client(LocalhostCluster(n_workers=2))  # doctest: +SKIP
    """

    mode: ClassVar[str] = "localhost"
    launcher = LocalhostWorker
    name_prefix = "localhost"
    default_tls = False
    default_scheduler_host = "127.0.0.1"

    def __init__(self, n_workers=None, threads_per_worker=None, memory_limit=None,
                 worker_processes=None, nanny=None, relay=None, runtime=None, **kwargs):
        opts = config.section(
            "localhost", n_workers=n_workers, threads_per_worker=threads_per_worker,
            memory_limit=memory_limit, worker_processes=worker_processes, nanny=nanny,
            relay=relay, runtime=runtime)
        n, threads = opts["n_workers"], opts["threads_per_worker"]
        processes = opts["worker_processes"]
        if n is None and processes is not None:
            n = cpu_count() if str(processes).upper() == "AUTO" else int(processes)
        if n is None and threads is None:
            n, threads = nprocesses_nthreads(cpu_count())
        elif n is None:
            n = max(1, cpu_count() // threads)
        elif threads is None:
            threads = max(1, cpu_count() // max(n, 1))
        self.runtime = opts["runtime"] or sys.executable
        self._log_dir = tempfile.TemporaryDirectory(prefix="dask-lithops-logs-")
        self.log_directory = self._log_dir.name
        super().__init__(
            n_workers=n, threads_per_worker=threads, memory_limit=opts["memory_limit"],
            nanny=opts["nanny"], relay=opts["relay"], **kwargs)

    def worker_command(self) -> list[str]:
        return [self.runtime, "-m", "dask_lithops.worker", "--payload", "-"]

    async def _close(self):
        try:
            await super()._close()
        finally:
            self._log_dir.cleanup()
