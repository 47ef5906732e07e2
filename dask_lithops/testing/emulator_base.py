"""What the offline emulators (Lambda, Cloud Run functions) share: server lifecycle and processes.

An emulator keeps all its state on one asyncio/tornado event loop in a
background thread; blocking work (namespaces, cgroups, process start and
teardown) goes to a thread pool.  :class:`EmulatorServer` owns that loop, the
pool, the work directory and the :class:`~.sandbox.Sandboxes`; it starts and
stops them, answers thread-safe views (:meth:`EmulatorServer._call`) and
watches the processes of the units (Lambda environments, Cloud Run instances)
a subclass runs.  A subclass provides ``_listen`` (bind its API on the loop),
``_shutdown`` (on the loop, at stop) and ``_reap`` (periodic idle reaping).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

from tornado.httpserver import HTTPServer

from .sandbox import Sandboxes, filesystem_unavailable


class EmulatorServer:
    """Base of an emulator's main class; a subclass names itself with these:"""

    #: the emulator in messages ("Lambda emulator")
    display_name: str
    #: what it runs processes for, in messages ("environments")
    unit_name: str
    #: prefix of its threads' names, and of its work directory's name
    thread_prefix: str
    workdir_prefix: str
    logger: logging.Logger

    def _init_server(self, sandboxes: Sandboxes, tag: str, host: str, port: int,
                     log_dir: str | os.PathLike | None, idle_timeout: float,
                     isolate_filesystem: bool | None) -> None:
        self.host, self.port_arg = host, int(port)
        self.log_dir_arg = log_dir
        self.idle_timeout = float(idle_timeout)
        self.isolate_filesystem = isolate_filesystem
        self.filesystem_isolated = False
        self.sandboxed = False
        self.sandbox_reason: str | None = None
        self.started = False
        self.port = 0
        self.workdir: Path | None = None
        self.log_dir: Path | None = None
        self._tag = tag
        self._sandboxes = sandboxes
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._servers: list[HTTPServer] = []
        self._tasks: set[asyncio.Task] = set()
        self._teardowns: set[concurrent.futures.Future] = set()
        self._reaper = None
        self._closing = False
        self._stop_lock = threading.Lock()

    # ------------------------------------------------------------ lifecycle

    def start(self):
        if self.started:
            return self
        fs_reason = filesystem_unavailable() if self.isolate_filesystem is not False else None
        if self.isolate_filesystem and fs_reason:
            raise RuntimeError(f"the {self.display_name} cannot give {self.unit_name} a "
                               f"filesystem of their own here: {fs_reason}")
        self.filesystem_isolated = self.isolate_filesystem is not False and fs_reason is None
        self._prepare()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.workdir_prefix}{self._tag}-"))
        if self.log_dir_arg is not None:
            self.log_dir = Path(self.log_dir_arg)
            self.log_dir.mkdir(parents=True, exist_ok=True)
        else:
            self.log_dir = self.workdir / "logs"
            self.log_dir.mkdir()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=16, thread_name_prefix=self.thread_prefix)
        try:
            self._sandboxes.open()
            self.sandboxed = self._sandboxes.sandboxed
            self.sandbox_reason = self._sandboxes.reason
            ready = threading.Event()
            failure: list[BaseException] = []
            self._thread = threading.Thread(target=self._run_loop, args=(ready, failure),
                                            name=f"{self.thread_prefix}-{self._tag}",
                                            daemon=True)
            self._thread.start()
            ready.wait()
            if failure:
                raise failure[0]
            self._listening()
            self._executor.submit(self._sandboxes.refill)
        except BaseException:
            self._cleanup_host_resources()
            raise
        self.started = True
        atexit.register(self.stop)
        self.logger.info("%s at %s (%s)", self.display_name, self.endpoint_url,
                         self._start_summary())
        return self

    def _prepare(self) -> None:
        """Before anything is made on the host (e.g. fetch a runtime)."""

    def _listening(self) -> None:
        """The API listens and the sandboxes are open; the emulator is not yet started."""

    def _start_summary(self) -> str:
        return f"sandboxed={self.sandboxed}"

    def _run_loop(self, ready: threading.Event, failure: list) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            self._listen()
        except BaseException as e:
            failure.append(e)
            ready.set()
            loop.close()
            return
        from tornado.ioloop import PeriodicCallback

        self._reaper = PeriodicCallback(self._reap, min(1000.0, self.idle_timeout * 250))
        self._reaper.start()
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    def stop(self) -> None:
        """Kill every process by PID; remove every namespace, cgroup and temp dir."""
        with self._stop_lock:
            if not self.started:
                return
            self.started = False
            try:
                atexit.unregister(self.stop)
            except Exception:
                pass
            if self._loop is not None and self._loop.is_running():
                fut = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
                try:
                    fut.result(timeout=60)
                except Exception:
                    self.logger.exception("%s: error while shutting down", self.display_name)
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(timeout=10)
            self._cleanup_host_resources()

    def _stop_serving(self) -> None:
        """At the start of ``_shutdown``: no more requests, no more reaping."""
        self._closing = True
        if self._reaper is not None:
            self._reaper.stop()
        for server in self._servers:
            server.stop()

    async def _teardowns_done(self) -> None:
        """At the end of ``_shutdown``: wait for the pool's process teardowns."""
        pending = [asyncio.wrap_future(f) for f in list(self._teardowns)]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    def _cleanup_host_resources(self) -> None:
        for f in list(self._teardowns):
            try:
                f.result(timeout=30)
            except Exception:
                pass
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        self._sandboxes.close()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def endpoint_url(self) -> str:
        """The emulator's API for clients on this host."""
        return self.local_url(self.port)

    def local_url(self, port: int) -> str:
        """``http://`` URL of a port the emulator listens on ``host``, for this host."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{port}"

    @property
    def host_address(self) -> str:
        """This host as the sandboxes reach it (the bridge's gateway; loopback unsandboxed)."""
        return self._sandboxes.host_address

    @property
    def memory_limit_mode(self) -> str:
        return self._sandboxes.memory_limit_mode

    # --------------------------------------------------- thread-safe views

    def _call(self, fn, *args):
        """``fn(*args)`` on the event loop (directly when it does not run), its result here."""
        if self._loop is None or not self._loop.is_running():
            return fn(*args)
        fut = concurrent.futures.Future()

        def run():
            try:
                fut.set_result(fn(*args))
            except BaseException as e:
                fut.set_exception(e)

        self._loop.call_soon_threadsafe(run)
        return fut.result(timeout=30)

    def _status_fields(self) -> dict:
        """The emulator as its ``/_emulator/status`` endpoint describes it (on the loop)."""
        return {"endpoint_url": self.endpoint_url,
                "host_address": self.host_address,
                "sandboxed": self.sandboxed,
                "memory_limit": self.memory_limit_mode}

    def _host_resources(self, pids: list[int]) -> dict:
        """What this emulator made on the host (for leak checks; on the loop)."""
        return {"pids": pids,
                "namespaces": self._sandboxes.names(),
                "bridge": self._sandboxes.bridge.name if self._sandboxes.bridge else None,
                "cgroup": (str(self._sandboxes.cgroups.parent) if self._sandboxes.cgroups
                           else None),
                "workdir": str(self.workdir) if self.workdir else None}

    # ------------------------------------- processes of environments/instances
    # A unit (Lambda environment, Cloud Run instance) has ``handle`` (its
    # sandbox.ProcessHandle, None while starting), ``pidfd`` and ``log_file``.

    def _watch_process(self, unit, on_output, on_exit) -> None:
        """Call ``on_output(unit)`` when its process writes, ``on_exit(unit)`` when it exits."""
        h = unit.handle
        self._loop.add_reader(h.stdout_fd, on_output, unit)
        unit.pidfd = os.pidfd_open(h.pid)
        self._loop.add_reader(unit.pidfd, on_exit, unit)

    def _unwatch_exit(self, unit) -> None:
        if unit.pidfd is not None:
            self._loop.remove_reader(unit.pidfd)
            os.close(unit.pidfd)
            unit.pidfd = None

    def _exit_code(self, unit) -> int:
        """In the exit handler: stop watching the exit and reap the process's return code."""
        self._unwatch_exit(unit)
        proc = unit.handle.proc
        rc = proc.poll()
        if rc is None:
            try:
                rc = proc.wait(timeout=1)
            except Exception:
                rc = -9
        return rc

    def _unwatch_process(self, unit) -> None:
        self._unwatch_exit(unit)
        if unit.handle is not None:
            try:
                self._loop.remove_reader(unit.handle.stdout_fd)
            except Exception:
                pass

    def _release_process(self, unit, teardown, *args) -> None:
        """Close the unit's log; tear its process and sandbox down (``teardown(handle, *args)``
        in the pool; :meth:`stop` waits for it)."""
        if unit.log_file is not None:
            unit.log_file.close()
            unit.log_file = None
        if unit.handle is not None:
            f = self._executor.submit(teardown, unit.handle, *args)
            self._teardowns.add(f)
            f.add_done_callback(self._teardowns.discard)
