"""The emulator: Lambda's control API (as boto3 calls it) and the dispatcher behind it.

Everything that touches state runs on one asyncio/tornado event loop in a
background thread; blocking work (unzipping, namespaces, cgroups, process
start and teardown) goes to a thread pool.  Event invocations are queued and
answered 202 at once; RequestResponse invocations wait for their result.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import json
import logging
import os
import socket
import time
import urllib.parse
import uuid
from pathlib import Path

from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from ..emulator_base import EmulatorServer
from ..sandbox import Sandboxes, TcpForwarder
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


class LambdaEmulator(ControlAPI, Dispatcher, EnvironmentManager, EmulatorServer):
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

    display_name = "Lambda emulator"
    unit_name = "environments"
    thread_prefix = "lambda-emulator"
    workdir_prefix = "dask-lithops-emulator-"
    logger = logger

    def __init__(self, sandbox: bool | None = None, account_concurrency: int = 100,
                 log_dir: str | os.PathLike | None = None, idle_timeout: float = 300.0,
                 host: str = "127.0.0.1", port: int = 0, region: str = "us-east-1",
                 prewarm: int = 2, event_retry_delays: tuple = (60.0, 120.0),
                 runtime_cache: str | os.PathLike | None = None,
                 invoke_rate_limit: float | None = None, host_reachable: bool = True,
                 aws_endpoint_url: str | None = None, isolate_filesystem: bool | None = None):
        tag = uuid.uuid4().hex[:8]
        self._init_server(Sandboxes(tag, sandbox, prewarm, "Lambda emulator",
                                    host_reachable=bool(host_reachable)),
                          tag, host, port, log_dir, idle_timeout, isolate_filesystem)
        self.sandbox_requested = sandbox
        self.host_reachable = bool(host_reachable)
        self.aws_endpoint_url = aws_endpoint_url
        self.sandbox_aws_endpoint_url: str | None = None
        self._role_credentials = RoleCredentials(aws_endpoint_url, region)
        self._forwarder = None
        self.invoke_rate_limit = invoke_rate_limit
        self._rate_tokens = 0.0
        self._rate_time = 0.0
        self.account_concurrency = int(account_concurrency)
        self.region = region
        self.prewarm = prewarm
        self.event_retry_delays = tuple(event_retry_delays)
        self.runtime_cache = runtime_cache
        self._python: Path | None = None
        self._functions: dict[str, Function] = {}
        self._layers: dict[str, list[LayerVersion]] = {}
        self._envs: dict[str, Environment] = {}
        self._invocations: collections.OrderedDict[str, Invocation] = collections.OrderedDict()
        self._pump_scheduled = False
        self._unreserved_in_flight = 0
        self.stats = collections.Counter()

    # ------------------------------------------------------------ lifecycle

    def _prepare(self) -> None:
        self._python = ensure_runtime(self.runtime_cache)

    def _listening(self) -> None:
        self._sandboxes.allow(self.host_address, self.port)  # Lambda's API is public
        if self.aws_endpoint_url:
            self._expose_aws_endpoint()

    def _start_summary(self) -> str:
        return f"sandboxed={self.sandboxed}, memory limit={self.memory_limit_mode}"

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
    def sandbox_endpoint_url(self) -> str:
        """The control API as functions see it (``AWS_ENDPOINT_URL_LAMBDA`` inside)."""
        return f"http://{self.host_address}:{self.port}"

    async def _shutdown(self) -> None:
        self._stop_serving()
        if self._forwarder is not None:
            self._forwarder.close()
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
        await self._teardowns_done()

    # --------------------------------------------------- thread-safe views

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
            return {**self._host_resources([e.handle.pid for e in self._envs.values()
                                            if e.handle]),
                    "firewall": (self._sandboxes.firewall.table if self._sandboxes.firewall
                                 else None)}
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


