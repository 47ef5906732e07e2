"""The emulator: Lambda's control API (as boto3 calls it) and the dispatcher behind it.

Everything that touches state runs on one asyncio/tornado event loop in a
background thread; blocking work (unzipping, namespaces, cgroups, process
start and teardown) goes to a thread pool.  Event invocations are queued and
answered 202 at once; RequestResponse invocations wait for their result.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import ipaddress
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import urllib.parse
import uuid
from pathlib import Path

from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from ..sandbox import Sandboxes, TcpForwarder, filesystem_unavailable
from .control import ControlAPI
from .credentials import RoleCredentials
from .dispatch import Dispatcher
from .environments import EnvironmentManager
from .handlers import control_application
from .managed_runtime import ensure_runtime
from .model import (
    ACCOUNT_ID,
    Environment,
    EnvironmentInfo,
    Function,
    Invocation,
    InvocationRecord,
    LayerVersion,
)

logger = logging.getLogger("dask_lithops.lambda_emulator")

__all__ = ["ACCOUNT_ID", "EnvironmentInfo", "InvocationRecord", "LambdaEmulator"]


class LambdaEmulator(ControlAPI, Dispatcher, EnvironmentManager):
    """An offline AWS Lambda: boto3's ``lambda`` client against ``endpoint_url`` works.

    Parameters
    ----------
    sandbox:
        Run every environment in an outbound-only network namespace.  ``None``
        (default) does so when possible (root, ``ip netns``, ``nft``) and says
        once when it cannot; ``True`` requires it; ``False`` never sandboxes.
    account_concurrency:
        The account's concurrent-executions limit.
    log_dir:
        Where environments' log streams are written (one file per stream, like
        CloudWatch); kept after ``stop()``.  Default: a temporary directory
        that ``stop()`` removes.
    idle_timeout:
        Seconds an idle (warm) environment is kept before it is reaped.
    host, port:
        Where the control API listens (it also listens on the sandbox bridge's
        gateway so functions can call it).
    prewarm:
        Namespaces made ahead of need (each takes ~50-100 ms to make).
    event_retry_delays:
        Delays before the retries of a failed Event invocation (Lambda: 60 s,
        120 s); the number of retries is the function's MaximumRetryAttempts.
    invoke_rate_limit:
        Event invokes accepted per second (a token bucket holding one second's
        worth); above it they get 429 ``TooManyRequestsException`` like Lambda's
        request-rate throttling.  ``None``: no limit.  May be changed while running.
    host_reachable:
        ``False``: environments reach no address of this host except what Lambda
        itself provides (their Runtime API, the Lambda API) and ``aws_endpoint_url``
        -- a client behind NAT as seen from Lambda -- while they still reach other
        namespaces ("the internet": the EC2 world's VMs).  Needs the sandbox.
    aws_endpoint_url:
        The test world's AWS endpoint (moto).  Environments get credentials of their
        function's execution role from its STS (``AssumeRole``) and reach it as
        ``AWS_ENDPOINT_URL`` (a loopback endpoint is forwarded from the bridge's
        gateway).  Without it they get dummy credentials.
    isolate_filesystem:
        Give every environment a root of its own: its code at ``/var/task``, layers at
        ``/opt``, a private ``/tmp``, the system's ``/usr``/``/etc`` read-only, running
        as Lambda's unprivileged user -- none of the client's files.  ``None``
        (default): when running as root; ``True`` requires it.
    """

    def __init__(self, sandbox: bool | None = None, account_concurrency: int = 100,
                 log_dir: str | os.PathLike | None = None, idle_timeout: float = 300.0,
                 host: str = "127.0.0.1", port: int = 0, region: str = "us-east-1",
                 prewarm: int = 2, event_retry_delays: tuple = (60.0, 120.0),
                 runtime_cache: str | os.PathLike | None = None,
                 invoke_rate_limit: float | None = None, host_reachable: bool = True,
                 aws_endpoint_url: str | None = None, isolate_filesystem: bool | None = None):
        self.sandbox_requested = sandbox
        self.host_reachable = bool(host_reachable)
        self.aws_endpoint_url = aws_endpoint_url
        self.sandbox_aws_endpoint_url: str | None = None
        self.isolate_filesystem = isolate_filesystem
        self.filesystem_isolated = False
        self._role_credentials = RoleCredentials(aws_endpoint_url, region)
        self._forwarder = None
        self.invoke_rate_limit = invoke_rate_limit
        self._rate_tokens = 0.0
        self._rate_time = 0.0
        self.account_concurrency = int(account_concurrency)
        self.log_dir_arg = log_dir
        self.idle_timeout = float(idle_timeout)
        self.host = host
        self.port_arg = int(port)
        self.region = region
        self.prewarm = prewarm
        self.event_retry_delays = tuple(event_retry_delays)
        self.runtime_cache = runtime_cache
        self.sandboxed = False
        self.sandbox_reason: str | None = None
        self.started = False
        self.port = 0
        self.host_address = "127.0.0.1"
        self.workdir: Path | None = None
        self.log_dir: Path | None = None
        self._tag = uuid.uuid4().hex[:8]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._sandboxes = Sandboxes(self._tag, sandbox, prewarm, "Lambda emulator",
                                    host_reachable=self.host_reachable)
        self._python: Path | None = None
        self._servers: list[HTTPServer] = []
        self._functions: dict[str, Function] = {}
        self._layers: dict[str, list[LayerVersion]] = {}
        self._envs: dict[str, Environment] = {}
        self._invocations: collections.OrderedDict[str, Invocation] = collections.OrderedDict()
        self._pump_scheduled = False
        self._unreserved_in_flight = 0
        self._tasks: set[asyncio.Task] = set()
        self._teardowns: set[concurrent.futures.Future] = set()
        self._reaper = None
        self._closing = False
        self._stop_lock = threading.Lock()
        self.stats = collections.Counter()

    # ------------------------------------------------------------ lifecycle

    def start(self) -> LambdaEmulator:
        if self.started:
            return self
        fs_reason = filesystem_unavailable() if self.isolate_filesystem is not False else None
        if self.isolate_filesystem and fs_reason:
            raise RuntimeError(f"the Lambda emulator cannot give environments a filesystem of "
                               f"their own here: {fs_reason}")
        self.filesystem_isolated = self.isolate_filesystem is not False and fs_reason is None
        self._python = ensure_runtime(self.runtime_cache)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"dask-lithops-emulator-{self._tag}-"))
        if self.log_dir_arg is not None:
            self.log_dir = Path(self.log_dir_arg)
            self.log_dir.mkdir(parents=True, exist_ok=True)
        else:
            self.log_dir = self.workdir / "logs"
            self.log_dir.mkdir()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=16, thread_name_prefix="lambda-emulator")
        try:
            self._sandboxes.open()
            self.sandboxed = self._sandboxes.sandboxed
            self.sandbox_reason = self._sandboxes.reason
            self.host_address = self._sandboxes.host_address
            ready = threading.Event()
            failure: list[BaseException] = []
            self._thread = threading.Thread(target=self._run_loop, args=(ready, failure),
                                            name=f"lambda-emulator-{self._tag}", daemon=True)
            self._thread.start()
            ready.wait()
            if failure:
                raise failure[0]
            self._sandboxes.allow(self.host_address, self.port)  # Lambda's API is public
            if self.aws_endpoint_url:
                self._expose_aws_endpoint()
            self._executor.submit(self._sandboxes.refill)
        except BaseException:
            self._cleanup_host_resources()
            raise
        self.started = True
        atexit.register(self.stop)
        logger.info("Lambda emulator at %s (sandboxed=%s, memory limit=%s)", self.endpoint_url,
                    self.sandboxed, self.memory_limit_mode)
        return self

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

    def _listen(self) -> None:
        app = control_application(self)
        wildcard = self.host in ("0.0.0.0", "")
        for _ in range(20):
            socks = bind_sockets(self.port_arg, self.host, family=socket.AF_INET)
            port = socks[0].getsockname()[1]
            if self.sandboxed and not wildcard:
                try:
                    socks += bind_sockets(port, self.host_address, family=socket.AF_INET)
                except OSError:
                    for s in socks:
                        s.close()
                    if self.port_arg:
                        raise
                    continue
            break
        else:
            raise RuntimeError("could not bind the emulator's control API")
        server = HTTPServer(app, max_body_size=80 * 1024 * 1024)
        server.add_sockets(socks)
        self._servers.append(server)
        self.port = port

    def _expose_aws_endpoint(self) -> None:
        """Make the test world's AWS endpoint reachable from environments (and only it)."""
        u = urllib.parse.urlsplit(self.aws_endpoint_url)
        port = u.port or (443 if u.scheme == "https" else 80)
        address = socket.gethostbyname(u.hostname)
        if self.sandboxed and ipaddress.ip_address(address).is_loopback:
            # a loopback service is not reachable from a namespace: forward to it from the
            # bridge's gateway
            fwd = TcpForwarder(self.host_address, (address, port))
            asyncio.run_coroutine_threadsafe(fwd.start(), self._loop).result(timeout=10)
            self._forwarder = fwd
            address, port = self.host_address, fwd.port
        self._sandboxes.allow(address, port)
        self.sandbox_aws_endpoint_url = f"{u.scheme}://{address}:{port}"

    @property
    def endpoint_url(self) -> str:
        """The control API for boto3 on this host."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def sandbox_endpoint_url(self) -> str:
        """The control API as functions see it (``AWS_ENDPOINT_URL_LAMBDA`` inside)."""
        return f"http://{self.host_address}:{self.port}"

    @property
    def memory_limit_mode(self) -> str:
        return self._sandboxes.memory_limit_mode

    def stop(self) -> None:
        """Kill every environment by PID; remove every namespace, cgroup and temp dir."""
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
                    logger.exception("Lambda emulator: error while shutting down")
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(timeout=10)
            self._cleanup_host_resources()

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

    async def _shutdown(self) -> None:
        self._closing = True
        if self._forwarder is not None:
            self._forwarder.close()
        if self._reaper is not None:
            self._reaper.stop()
        for server in self._servers:
            server.stop()
        for fn in self._functions.values():
            while fn.queue:
                inv = fn.queue.popleft()
                inv.done = True
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        envs = list(self._envs.values())
        for env in envs:
            if env.inv is not None and not env.inv.done:
                self._complete(env.inv, json.dumps({
                    "errorType": "ServiceException",
                    "errorMessage": "the Lambda emulator stopped"}).encode(), "Unhandled",
                    "failed")
            self._retire(env, teardown_now=True)
        pending = [asyncio.wrap_future(f) for f in list(self._teardowns)]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    def __enter__(self) -> LambdaEmulator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --------------------------------------------------- thread-safe views

    def _call(self, fn, *args):
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

    @property
    def environments(self) -> list[EnvironmentInfo]:
        """Live execution environments (pid, state, cold/warm invocation counts, ...)."""
        return self._call(self._environment_infos)

    def _environment_infos(self) -> list[EnvironmentInfo]:
        out = []
        for env in self._envs.values():
            h = env.handle
            out.append(EnvironmentInfo(
                id=env.id, function=env.function.name, pid=h.pid if h else None,
                state=env.state, cold_invocations=env.cold_invocations,
                warm_invocations=env.warm_invocations,
                netns=h.netns.name if h and h.netns else None,
                address=h.netns.address if h and h.netns else None,
                memory_limit=h.memory_mode if h else self.memory_limit_mode,
                runtime_api=f"{self.host_address}:{env.port}", log_stream=env.stream))
        return out

    def invocation_log(self, request_id: str) -> str:
        """The log lines of one invocation (START ... END, REPORT), like CloudWatch."""
        def get():
            inv = self._invocations.get(request_id)
            if inv is None:
                raise KeyError(f"no invocation {request_id!r} is known to the emulator")
            return "\n".join(inv.log) + "\n"
        return self._call(get)

    def invocation(self, request_id: str) -> InvocationRecord:
        def get():
            inv = self._invocations.get(request_id)
            if inv is None:
                raise KeyError(f"no invocation {request_id!r} is known to the emulator")
            return InvocationRecord(inv.request_id, inv.function.name, inv.kind, inv.status,
                                    inv.cold, inv.duration_ms, inv.init_ms, inv.function_error,
                                    inv.env.id if inv.env else None)
        return self._call(get)

    def invocations(self, function: str | None = None) -> list[InvocationRecord]:
        def get():
            return [InvocationRecord(i.request_id, i.function.name, i.kind, i.status, i.cold,
                                     i.duration_ms, i.init_ms, i.function_error,
                                     i.env.id if i.env else None)
                    for i in self._invocations.values()
                    if function is None or i.function.name == function]
        return self._call(get)

    def loop_cpu_time(self) -> float:
        """CPU seconds the emulator's event-loop thread has used (for benchmarks)."""
        return self._call(time.thread_time)

    def resources(self) -> dict:
        """What this emulator made on the host (for leak checks)."""
        def get():
            pids = [e.handle.pid for e in self._envs.values() if e.handle]
            return {"pids": pids,
                    "namespaces": self._sandboxes.names(),
                    "bridge": self._sandboxes.bridge.name if self._sandboxes.bridge else None,
                    "cgroup": (str(self._sandboxes.cgroups.parent) if self._sandboxes.cgroups
                               else None),
                    "firewall": (self._sandboxes.firewall.table if self._sandboxes.firewall
                                 else None),
                    "workdir": str(self.workdir) if self.workdir else None}
        return self._call(get)

    def client(self, **config):
        """A boto3 ``lambda`` client for this emulator (dummy credentials, no retries)."""
        import boto3
        from botocore.config import Config
        config.setdefault("retries", {"total_max_attempts": 1})
        config.setdefault("read_timeout", 910)
        return boto3.client("lambda", endpoint_url=self.endpoint_url, region_name=self.region,
                            aws_access_key_id="testing", aws_secret_access_key="testing",
                            config=Config(**config))


