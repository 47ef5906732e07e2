"""The emulator: Lambda's control API (as boto3 calls it) and the dispatcher behind it.

Everything that touches state runs on one asyncio/tornado event loop in a
background thread; blocking work (unzipping, namespaces, cgroups, process
start and teardown) goes to a thread pool.  Event invocations are queued and
answered 202 at once; RequestResponse invocations wait for their result.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import collections
import concurrent.futures
import datetime
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from tornado import httputil
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application, HTTPError, RequestHandler

from . import environments as envmod
from .managed_runtime import PYTHON_RUNTIMES, ensure_runtime
from .runtime_api import runtime_application

logger = logging.getLogger("dask_lithops.lambda_emulator")

ACCOUNT_ID = "123456789012"
SYNC_PAYLOAD_LIMIT = 6 * 1024 * 1024  # 6291456: RequestResponse request and response
ASYNC_PAYLOAD_LIMIT = 1024 * 1024  # Event
RESPONSE_LIMIT = 6291556
INIT_TIMEOUT = 10.0
LOG_TAIL_BYTES = 4096
MAX_KEPT_INVOCATIONS = 20000
MAX_EVENT_QUEUE = 1_000_000
ENV_VARS_LIMIT = 4096
FUNCTION_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
LAYER_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,140}$")
HANDLER_RE = re.compile(r"^[^\s]+\.[^\s.]+$")
RESERVED_ENV_KEYS = frozenset({
    "_HANDLER", "_X_AMZN_TRACE_ID", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_EXECUTION_ENV",
    "AWS_LAMBDA_FUNCTION_NAME", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
    "AWS_LAMBDA_FUNCTION_VERSION", "AWS_LAMBDA_INITIALIZATION_TYPE",
    "AWS_LAMBDA_LOG_GROUP_NAME", "AWS_LAMBDA_LOG_STREAM_NAME", "AWS_ACCESS_KEY",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "AWS_LAMBDA_RUNTIME_API", "LAMBDA_TASK_ROOT", "LAMBDA_RUNTIME_DIR",
})

_unsandboxed_warned = False


# ------------------------------------------------------------------- errors


class LambdaError(Exception):
    """An error answered in Lambda's shape, so botocore raises the modeled class."""

    def __init__(self, code: str, status: int, message: str, *, message_key: str = "message",
                 headers: dict | None = None, **fields):
        super().__init__(message)
        self.code, self.status, self.message = code, status, message
        self.message_key, self.headers, self.fields = message_key, headers or {}, fields

    def body(self) -> dict:
        return {"Type": "User", self.message_key: self.message, **self.fields}


def _invalid(message: str) -> LambdaError:
    return LambdaError("InvalidParameterValueException", 400, message)


def _conflict(message: str) -> LambdaError:
    return LambdaError("ResourceConflictException", 409, message)


def _not_found(message: str) -> LambdaError:
    return LambdaError("ResourceNotFoundException", 404, message, message_key="Message")


def _now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "+0000"


def _log_ts() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


# -------------------------------------------------------------------- model


@dataclass
class LayerVersion:
    name: str
    version: int
    arn: str
    layer_arn: str
    directory: Path
    zip_path: Path
    sha256: str
    size: int
    description: str
    created: str
    compatible_runtimes: list
    license_info: str | None

    def describe(self, endpoint: str) -> dict:
        d = {
            "Content": {"Location": f"{endpoint}/_emulator/layers/{self.name}/{self.version}/code",
                        "CodeSha256": self.sha256, "CodeSize": self.size},
            "LayerArn": self.layer_arn, "LayerVersionArn": self.arn,
            "Description": self.description, "CreatedDate": self.created,
            "Version": self.version, "CompatibleRuntimes": self.compatible_runtimes,
        }
        if self.license_info:
            d["LicenseInfo"] = self.license_info
        return d

    def list_item(self) -> dict:
        d = {"LayerVersionArn": self.arn, "Version": self.version,
             "Description": self.description, "CreatedDate": self.created,
             "CompatibleRuntimes": self.compatible_runtimes}
        if self.license_info:
            d["LicenseInfo"] = self.license_info
        return d


@dataclass
class EnvSpec:
    """What one generation of a function's environments runs (fixed at env start)."""

    revision: int
    handler: str
    runtime: str
    memory: int
    timeout: int
    variables: dict
    task_root: Path
    opt_dir: Path


class Function:
    def __init__(self, name: str, arn: str):
        self.name, self.arn = name, arn
        self.runtime = self.role = self.handler = ""
        self.description = ""
        self.timeout, self.memory = 3, 128
        self.variables: dict = {}
        self.layers: list[LayerVersion] = []
        self.code_sha256, self.code_size = "", 0
        self.zip_path: Path | None = None
        self.task_root: Path | None = None
        self.opt_dir: Path | None = None
        self.revision = 0
        self.revision_id = str(uuid.uuid4())
        self.last_modified = _now_iso()
        self.state, self.state_reason, self.state_reason_code = "Pending", None, None
        self.last_update_status = "Successful"
        self.last_update_reason = None
        self.reserved: int | None = None
        self.event_retries = 2
        self.event_max_age = 21600
        self.envs: list[Environment] = []
        self.idle: list[Environment] = []
        self.queue: collections.deque[Invocation] = collections.deque()
        self.in_flight = 0
        self.deleted = False

    def spec(self) -> EnvSpec:
        return EnvSpec(self.revision, self.handler, self.runtime, self.memory, self.timeout,
                       dict(self.variables), self.task_root, self.opt_dir)

    def configuration(self) -> dict:
        c = {
            "FunctionName": self.name, "FunctionArn": self.arn, "Runtime": self.runtime,
            "Role": self.role, "Handler": self.handler, "CodeSize": self.code_size,
            "Description": self.description, "Timeout": self.timeout,
            "MemorySize": self.memory, "LastModified": self.last_modified,
            "CodeSha256": self.code_sha256, "Version": "$LATEST",
            "TracingConfig": {"Mode": "PassThrough"}, "RevisionId": self.revision_id,
            "State": self.state, "LastUpdateStatus": self.last_update_status,
            "PackageType": "Zip", "Architectures": ["x86_64"],
            "EphemeralStorage": {"Size": 512},
            "LoggingConfig": {"LogFormat": "Text", "LogGroup": f"/aws/lambda/{self.name}"},
            "SnapStart": {"ApplyOn": "None", "OptimizationStatus": "Off"},
        }
        if self.variables:
            c["Environment"] = {"Variables": dict(self.variables)}
        if self.layers:
            c["Layers"] = [{"Arn": lv.arn, "CodeSize": lv.size} for lv in self.layers]
        if self.state_reason:
            c["StateReason"], c["StateReasonCode"] = self.state_reason, self.state_reason_code
        if self.last_update_reason:
            c["LastUpdateStatusReason"] = self.last_update_reason
        return c


class Invocation:
    __slots__ = ("request_id", "function", "payload", "kind", "tail", "client_context",
                 "trace_id", "future", "env", "cold", "init_ms", "started", "deadline_ms",
                 "timer", "done", "result", "function_error", "log", "duration_ms",
                 "enqueued", "status", "attempt", "timeout")

    def __init__(self, function: Function, payload: bytes, kind: str, tail: bool = False,
                 client_context: str | None = None):
        self.request_id = str(uuid.uuid4())
        self.function = function
        self.payload = payload
        self.kind = kind
        self.tail = tail
        self.client_context = client_context
        self.trace_id = (f"Root=1-{int(time.time()):08x}-{uuid.uuid4().hex[:24]};"
                         f"Parent={uuid.uuid4().hex[:16]};Sampled=0")
        self.future: asyncio.Future | None = None
        self.env: Environment | None = None
        self.cold = False
        self.init_ms: float | None = None
        self.started: float | None = None
        self.deadline_ms = 0
        self.timer = None
        self.done = False
        self.result = b""
        self.function_error: str | None = None
        self.log: list[str] = []
        self.duration_ms = 0.0
        self.enqueued = time.monotonic()
        self.status = "queued"
        self.attempt = 0
        self.timeout = function.timeout


class Environment:
    def __init__(self, function: Function, spec: EnvSpec):
        self.id = uuid.uuid4().hex[:12]
        self.function = function
        self.spec = spec
        self.state = "starting"  # starting | idle | busy | dead
        self.handle: envmod.ProcessHandle | None = None
        self.inv: Invocation | None = None
        self.pending: Invocation | None = None
        self.waiter: asyncio.Future | None = None
        self.created = time.monotonic()
        self.idle_since = self.created
        self.initialized = False
        self.init_error: bytes | None = None
        self.init_lines: list[str] = []
        self.cold_invocations = 0
        self.warm_invocations = 0
        day = datetime.datetime.now(datetime.timezone.utc).strftime("%Y/%m/%d")
        self.stream = f"{day}/[$LATEST]{uuid.uuid4().hex}"
        self.http: HTTPServer | None = None
        self.port = 0
        self.log_file = None
        self.out_buf = b""
        self.pidfd: int | None = None
        self.init_timer = None
        self.exited = False


@dataclass
class EnvironmentInfo:
    """A snapshot of one execution environment (``LambdaEmulator.environments``)."""

    id: str
    function: str
    pid: int | None
    state: str
    cold_invocations: int
    warm_invocations: int
    netns: str | None
    address: str | None
    memory_limit: str
    runtime_api: str
    log_stream: str


@dataclass
class InvocationRecord:
    request_id: str
    function: str
    kind: str
    status: str
    cold: bool
    duration_ms: float
    init_ms: float | None
    function_error: str | None
    environment: str | None = None
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------- emulator


class LambdaEmulator:
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
    """

    def __init__(self, sandbox: bool | None = None, account_concurrency: int = 100,
                 log_dir: str | os.PathLike | None = None, idle_timeout: float = 300.0,
                 host: str = "127.0.0.1", port: int = 0, region: str = "us-east-1",
                 prewarm: int = 2, event_retry_delays: tuple = (60.0, 120.0),
                 runtime_cache: str | os.PathLike | None = None,
                 invoke_rate_limit: float | None = None):
        self.sandbox_requested = sandbox
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
        self._bridge = None
        self._pool: envmod.SandboxPool | None = None
        self._cgroups: envmod.CgroupV1Memory | None = None
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
        global _unsandboxed_warned
        reason = envmod.sandbox_unavailable() if self.sandbox_requested is not False else \
            "sandbox=False"
        if self.sandbox_requested and reason:
            raise RuntimeError(f"the Lambda emulator cannot sandbox environments here: {reason}")
        self.sandboxed = reason is None
        self.sandbox_reason = reason
        if not self.sandboxed and self.sandbox_requested is None and not _unsandboxed_warned:
            _unsandboxed_warned = True
            logger.warning("Lambda emulator: environments run unsandboxed (they accept inbound "
                           "connections, unlike Lambda): %s", reason)
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
            self._cgroups = envmod.CgroupV1Memory.detect(self._tag)
            if self.sandboxed:
                from ..netns import Bridge
                self._bridge = Bridge().create()
                self.host_address = self._bridge.gateway
                self._pool = envmod.SandboxPool(self._bridge, prewarm=self.prewarm)
            ready = threading.Event()
            failure: list[BaseException] = []
            self._thread = threading.Thread(target=self._run_loop, args=(ready, failure),
                                            name=f"lambda-emulator-{self._tag}", daemon=True)
            self._thread.start()
            ready.wait()
            if failure:
                raise failure[0]
            if self._pool is not None:
                self._executor.submit(self._pool.refill)
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
        return "cgroup-v1" if self._cgroups is not None else "rlimit-as"

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
        if self._pool is not None:
            self._pool.close()
        if self._bridge is not None:
            self._bridge.delete()
        if self._cgroups is not None:
            self._cgroups.close()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    async def _shutdown(self) -> None:
        self._closing = True
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
                    "namespaces": self._pool.names() if self._pool else [],
                    "bridge": self._bridge.name if self._bridge else None,
                    "cgroup": str(self._cgroups.parent) if self._cgroups else None,
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

    def arn(self, name: str) -> str:
        return f"arn:aws:lambda:{self.region}:{ACCOUNT_ID}:function:{name}"

    # --------------------------------------------------------------- functions

    def resolve(self, raw: str, qualifier: str | None = None) -> Function:
        name, q = raw, qualifier
        parts = raw.split(":")
        if raw.startswith("arn:"):
            if len(parts) < 7 or parts[5] != "function":
                raise _invalid(f"Invalid function ARN: {raw}")
            name = parts[6]
            q = parts[7] if len(parts) > 7 else q
        elif len(parts) >= 3 and parts[1] == "function":
            name = parts[2]
            q = parts[3] if len(parts) > 3 else q
        elif len(parts) == 2:
            name, q = parts
        fn = self._functions.get(name)
        if fn is None or (q not in (None, "", "$LATEST")):
            arn = self.arn(name) + (f":{q}" if q else "")
            raise _not_found(f"Function not found: {arn}")
        return fn

    def _validate_config(self, body: dict, fn: Function | None) -> dict:
        out = {}
        if "Runtime" in body or fn is None:
            rt = body.get("Runtime")
            if rt not in PYTHON_RUNTIMES:
                raise _invalid(f"Value {rt!r} at 'runtime' failed to satisfy constraint: the "
                               f"emulator runs Lambda's managed Python runtimes only "
                               f"({', '.join(PYTHON_RUNTIMES)})")
            out["runtime"] = rt
        if "Handler" in body or fn is None:
            h = body.get("Handler")
            if not isinstance(h, str) or not HANDLER_RE.match(h) or len(h) > 128:
                raise _invalid(f"Value {h!r} at 'handler' failed to satisfy constraint: Member "
                               f"must satisfy regular expression pattern: [^\\s]+")
            out["handler"] = h
        if "MemorySize" in body:
            m = body["MemorySize"]
            if not isinstance(m, int) or not 128 <= m <= 10240:
                raise _invalid(f"'MemorySize' value failed to satisfy constraint: Member must "
                               f"have value between 128 and 10240 (got {m!r})")
            out["memory"] = m
        if "Timeout" in body:
            t = body["Timeout"]
            if not isinstance(t, int) or not 1 <= t <= 900:
                raise _invalid(f"'Timeout' value failed to satisfy constraint: Member must have "
                               f"value between 1 and 900 (got {t!r})")
            out["timeout"] = t
        if "Role" in body or fn is None:
            role = body.get("Role")
            if not isinstance(role, str) or not role.startswith("arn:"):
                raise _invalid(f"The role defined for the function is not a valid ARN: {role!r}")
            out["role"] = role
        if "Description" in body:
            out["description"] = str(body["Description"])
        if "Environment" in body:
            variables = (body["Environment"] or {}).get("Variables") or {}
            reserved = sorted(set(variables) & RESERVED_ENV_KEYS)
            if reserved:
                raise _invalid(
                    "Lambda was unable to configure your environment variables because the "
                    "environment variables you have provided contains reserved keys that are "
                    "currently not supported for modification. Reserved keys used in this "
                    f"request: {', '.join(reserved)}")
            if len(json.dumps(variables)) > ENV_VARS_LIMIT:
                raise _invalid(
                    "Lambda was unable to configure your environment variables because the "
                    "environment variables you have provided exceeded the 4KB limit.")
            out["variables"] = {str(k): str(v) for k, v in variables.items()}
        if "Layers" in body:
            arns = body["Layers"] or []
            if len(arns) > 5:
                raise _invalid("Cannot reference more than 5 layers.")
            out["layers"] = [self._layer_by_arn(a) for a in arns]
        return out

    def _layer_by_arn(self, arn: str) -> LayerVersion:
        parts = arn.split(":")
        if len(parts) == 8 and parts[5] == "layer":
            for lv in self._layers.get(parts[6], []):
                if str(lv.version) == parts[7]:
                    return lv
        raise _invalid(f"Layer version {arn} does not exist.")

    def _decode_zip(self, code: dict) -> bytes:
        if not code or "ZipFile" not in code:
            if code and ("S3Bucket" in code or "ImageUri" in code):
                raise _invalid("The Lambda emulator accepts ZipFile code only "
                               "(no S3 or container image locations).")
            raise _invalid("Please provide a source for function code.")
        try:
            data = base64.b64decode(code["ZipFile"], validate=False)
            zipfile.ZipFile(io.BytesIO(data)).testzip()
        except Exception:
            raise _invalid("Could not unzip uploaded file. Please check your file, then try "
                           "to upload again.") from None
        return data

    def _prepare_code(self, fn_name: str, revision: int, data: bytes | None,
                      prev_zip: Path | None, layers: list[LayerVersion]) -> tuple:
        """Blocking: extract the zip and merge the layers (the /opt equivalent)."""
        base = self.workdir / "functions" / fn_name / str(revision)
        task = base / "task"
        opt = base / "opt"
        task.mkdir(parents=True)
        opt.mkdir()
        zip_path = base / "code.zip"
        if data is not None:
            zip_path.write_bytes(data)
        else:
            shutil.copyfile(prev_zip, zip_path)
        with zipfile.ZipFile(zip_path) as z:
            z.extractall(task)
        for lv in layers:  # later layers override earlier ones, as in /opt
            shutil.copytree(lv.directory, opt, dirs_exist_ok=True, symlinks=True)
        return task, opt, zip_path

    async def create_function(self, body: dict) -> dict:
        name = body.get("FunctionName", "")
        if not FUNCTION_NAME_RE.match(name or ""):
            raise _invalid(f"Value {name!r} at 'functionName' failed to satisfy constraint")
        if name in self._functions:
            raise _conflict(f"Function already exist: {name}")
        cfg = self._validate_config(body, None)
        data = self._decode_zip(body.get("Code") or {})
        fn = Function(name, self.arn(name))
        for k, v in cfg.items():
            setattr(fn, k, v)
        fn.code_sha256 = base64.b64encode(hashlib.sha256(data).digest()).decode()
        fn.code_size = len(data)
        fn.revision = 1
        fn.state, fn.state_reason, fn.state_reason_code = (
            "Pending", "The function is being created.", "Creating")
        self._functions[name] = fn
        self._spawn_task(self._finish_update(fn, data, creating=True))
        return fn.configuration()

    async def _finish_update(self, fn: Function, data: bytes | None, creating: bool = False):
        loop = asyncio.get_running_loop()
        revision = fn.revision
        try:
            task, opt, zip_path = await loop.run_in_executor(
                self._executor, self._prepare_code, fn.name, revision, data, fn.zip_path,
                list(fn.layers))
        except Exception as e:
            logger.exception("preparing code of %s failed", fn.name)
            if creating:
                fn.state, fn.state_reason, fn.state_reason_code = "Failed", str(e), "InternalError"
            else:
                fn.last_update_status, fn.last_update_reason = "Failed", str(e)
            return
        if fn.deleted or fn.revision != revision:
            return
        fn.task_root, fn.opt_dir, fn.zip_path = task, opt, zip_path
        fn.state, fn.state_reason, fn.state_reason_code = "Active", None, None
        fn.last_update_status, fn.last_update_reason = "Successful", None
        self._retire_stale(fn)
        self._schedule_pump()

    def _begin_update(self, fn: Function) -> None:
        if fn.state == "Pending" or fn.last_update_status == "InProgress":
            raise _conflict(f"The operation cannot be performed at this time. An update is in "
                            f"progress for resource: {fn.arn}")
        fn.revision += 1
        fn.revision_id = str(uuid.uuid4())
        fn.last_modified = _now_iso()
        fn.last_update_status = "InProgress"

    async def update_code(self, fn: Function, body: dict) -> dict:
        if body.get("RevisionId") and body["RevisionId"] != fn.revision_id:
            raise LambdaError("PreconditionFailedException", 412,
                              "The Revision Id provided does not match the latest Revision Id. "
                              "Call the GetFunction/GetAlias API to retrieve the latest "
                              "Revision Id")
        data = self._decode_zip({k: v for k, v in body.items()
                                 if k in ("ZipFile", "S3Bucket", "ImageUri")})
        self._begin_update(fn)
        fn.code_sha256 = base64.b64encode(hashlib.sha256(data).digest()).decode()
        fn.code_size = len(data)
        self._spawn_task(self._finish_update(fn, data))
        return fn.configuration()

    async def update_configuration(self, fn: Function, body: dict) -> dict:
        cfg = self._validate_config(body, fn)
        self._begin_update(fn)
        for k, v in cfg.items():
            setattr(fn, k, v)
        self._spawn_task(self._finish_update(fn, None))
        return fn.configuration()

    def delete_function(self, fn: Function) -> None:
        fn.deleted = True
        del self._functions[fn.name]
        while fn.queue:
            fn.queue.popleft().status = "dropped"
        for env in list(fn.envs):
            if env.inv is None:
                self._retire(env)

    def put_concurrency(self, fn: Function, n) -> dict:
        if not isinstance(n, int) or n < 0:
            raise _invalid("ReservedConcurrentExecutions must be a non-negative integer")
        others = sum(f.reserved or 0 for f in self._functions.values() if f is not fn)
        if others + n > self.account_concurrency:
            raise _invalid(
                "Specified ReservedConcurrentExecutions for function decreases account's "
                "UnreservedConcurrentExecution below its minimum value of [0].")
        self._set_reserved(fn, n)
        return {"ReservedConcurrentExecutions": n}

    def _set_reserved(self, fn: Function, n: int | None) -> None:
        if (fn.reserved is None) != (n is None):
            self._unreserved_in_flight += fn.in_flight if n is None else -fn.in_flight
        fn.reserved = n
        self._schedule_pump()

    def account_settings(self) -> dict:
        reserved = sum(f.reserved or 0 for f in self._functions.values())
        return {
            "AccountLimit": {
                "TotalCodeSize": 80530636800, "CodeSizeUnzipped": 262144000,
                "CodeSizeZipped": 52428800, "ConcurrentExecutions": self.account_concurrency,
                "UnreservedConcurrentExecutions": self.account_concurrency - reserved},
            "AccountUsage": {
                "TotalCodeSize": sum(f.code_size for f in self._functions.values()),
                "FunctionCount": len(self._functions)},
        }

    # ------------------------------------------------------------------ layers

    async def publish_layer(self, name: str, body: dict) -> dict:
        if not LAYER_NAME_RE.match(name):
            raise _invalid(f"Value {name!r} at 'layerName' failed to satisfy constraint")
        data = self._decode_zip(body.get("Content") or {})
        versions = self._layers.setdefault(name, [])
        version = (versions[-1].version if versions else 0) + 1
        layer_arn = f"arn:aws:lambda:{self.region}:{ACCOUNT_ID}:layer:{name}"
        directory = self.workdir / "layers" / name / str(version)

        def extract():
            directory.mkdir(parents=True)
            (directory.parent / f"{version}.zip").write_bytes(data)
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                z.extractall(directory)

        await asyncio.get_running_loop().run_in_executor(self._executor, extract)
        lv = LayerVersion(
            name=name, version=version, arn=f"{layer_arn}:{version}", layer_arn=layer_arn,
            directory=directory, zip_path=directory.parent / f"{version}.zip",
            sha256=base64.b64encode(hashlib.sha256(data).digest()).decode(), size=len(data),
            description=body.get("Description", ""), created=_now_iso(),
            compatible_runtimes=list(body.get("CompatibleRuntimes") or []),
            license_info=body.get("LicenseInfo"))
        versions.append(lv)
        return lv.describe(self.endpoint_url)

    def layer_version(self, name: str, version: str) -> LayerVersion:
        for lv in self._layers.get(name, []):
            if str(lv.version) == str(version):
                return lv
        raise _not_found("The resource you requested does not exist.")

    # ------------------------------------------------------------- invocations

    def invoke(self, fn: Function, payload: bytes, kind: str, tail: bool,
               client_context: str | None) -> Invocation:
        if fn.state != "Active":
            raise _conflict(f"The operation cannot be performed at this time. The function is "
                            f"currently in the following state: {fn.state}")
        inv = Invocation(fn, payload, kind, tail, client_context)
        self.stats["invocations"] += 1
        if kind == "Event":
            if self.invoke_rate_limit and not self._take_rate_token():
                self.stats["rate_throttles"] += 1
                raise LambdaError("TooManyRequestsException", 429, "Rate Exceeded.",
                                  headers={"Retry-After": "1"}, Reason="CallerRateLimitExceeded")
            if len(fn.queue) >= MAX_EVENT_QUEUE:
                raise LambdaError("TooManyRequestsException", 429, "Rate Exceeded.",
                                  headers={"Retry-After": "1"}, Reason="CallerRateLimitExceeded")
            self.stats["events"] += 1
            self._remember(inv)
            fn.queue.append(inv)
            self._schedule_pump()
            return inv
        inv.future = asyncio.get_running_loop().create_future()
        if not self._dispatch(fn, inv):
            self.stats["throttles"] += 1
            reason = ("ReservedFunctionConcurrentInvocationLimitExceeded" if fn.reserved is not None
                      else "ConcurrentInvocationLimitExceeded")
            raise LambdaError("TooManyRequestsException", 429, "Rate Exceeded.",
                              headers={"Retry-After": "1"}, Reason=reason)
        self._remember(inv)
        return inv

    def _take_rate_token(self) -> bool:
        rate = float(self.invoke_rate_limit)
        now = time.monotonic()
        self._rate_tokens = min(rate, self._rate_tokens + (now - self._rate_time) * rate)
        self._rate_time = now
        if self._rate_tokens < 1:
            return False
        self._rate_tokens -= 1
        return True

    def _remember(self, inv: Invocation) -> None:
        self._invocations[inv.request_id] = inv
        while len(self._invocations) > MAX_KEPT_INVOCATIONS:
            self._invocations.popitem(last=False)

    def _has_capacity(self, fn: Function) -> bool:
        if self._closing or fn.deleted:
            return False
        if fn.reserved is not None:
            return fn.in_flight < fn.reserved
        reserved = sum(f.reserved or 0 for f in self._functions.values())
        return self._unreserved_in_flight < self.account_concurrency - reserved

    def _dispatch(self, fn: Function, inv: Invocation) -> bool:
        if not self._has_capacity(fn):
            return False
        while fn.idle:
            env = fn.idle.pop()
            if env.state == "idle" and env.spec.revision == fn.revision:
                self._assign(env, inv)
                return True
            self._retire(env)
        self._spawn(fn, inv)
        return True

    def _schedule_pump(self) -> None:
        if not self._pump_scheduled and not self._closing:
            self._pump_scheduled = True
            self._loop.call_soon(self._pump)

    def _pump(self) -> None:
        self._pump_scheduled = False
        for fn in list(self._functions.values()):
            q = fn.queue
            while q and self._dispatch(fn, q[0]):
                q.popleft()

    def _bind(self, env: Environment, inv: Invocation) -> None:
        env.inv = inv
        inv.env = env
        inv.status = "running"
        fn = env.function
        fn.in_flight += 1
        if fn.reserved is None:
            self._unreserved_in_flight += 1

    def _unbind(self, env: Environment) -> None:
        if env.inv is None:
            return
        env.inv = None
        fn = env.function
        fn.in_flight -= 1
        if fn.reserved is None:
            self._unreserved_in_flight -= 1

    def _assign(self, env: Environment, inv: Invocation) -> None:
        self._bind(env, inv)
        env.state = "busy"
        if env.waiter is not None and not env.waiter.done():
            env.waiter.set_result(inv)
            env.waiter = None
        else:
            env.pending = inv

    async def next_invocation(self, env: Environment) -> Invocation:
        """The Runtime API's ``/next``: wait for this environment's next invocation."""
        if env.state == "dead":
            raise asyncio.CancelledError()
        if not env.initialized:
            env.initialized = True
            if env.init_timer is not None:
                env.init_timer.cancel()
                env.init_timer = None
            if env.inv is not None:
                env.inv.init_ms = (time.monotonic() - env.created) * 1000
        if env.pending is not None:
            inv, env.pending = env.pending, None
        else:
            env.waiter = asyncio.get_running_loop().create_future()
            inv = await env.waiter
        self._deliver(env, inv)
        return inv

    def _deliver(self, env: Environment, inv: Invocation) -> None:
        env.state = "busy"
        inv.started = time.monotonic()
        inv.timeout = env.spec.timeout
        inv.deadline_ms = int(time.time() * 1000) + env.spec.timeout * 1000
        inv.cold = env.cold_invocations == 0 and env.warm_invocations == 0
        if inv.cold:
            env.cold_invocations += 1
            self.stats["cold_starts"] += 1
            inv.log.extend(env.init_lines)
            env.init_lines = []
        else:
            env.warm_invocations += 1
            self.stats["warm_starts"] += 1
        self._log(env, inv, f"START RequestId: {inv.request_id} Version: $LATEST")
        inv.timer = self._loop.call_later(env.spec.timeout, self._on_timeout, inv)

    def runtime_headers(self, inv: Invocation) -> dict:
        h = {
            "Lambda-Runtime-Aws-Request-Id": inv.request_id,
            "Lambda-Runtime-Deadline-Ms": str(inv.deadline_ms),
            "Lambda-Runtime-Invoked-Function-Arn": inv.function.arn,
            "Lambda-Runtime-Trace-Id": inv.trace_id,
        }
        if inv.client_context:
            h["Lambda-Runtime-Client-Context"] = inv.client_context
        return h

    def _current(self, env: Environment, request_id: str):
        inv = env.inv
        if inv is None or inv.request_id != request_id or inv.started is None:
            return None
        return inv

    def runtime_response(self, env: Environment, request_id: str, body: bytes):
        inv = self._current(env, request_id)
        if inv is None:
            return 400, {"errorMessage": f"Invalid request ID: {request_id}",
                         "errorType": "InvalidRequestID"}
        self._drain(env)
        if len(body) > RESPONSE_LIMIT:
            err = {"errorMessage": "Response payload size exceeded maximum allowed payload "
                                   f"size ({RESPONSE_LIMIT} bytes).",
                   "errorType": "Function.ResponseSizeTooLarge"}
            self._complete(inv, json.dumps(err).encode(), "Unhandled", "failed")
        else:
            self._complete(inv, body, None, "succeeded")
        self._release(env)
        return 202, {"status": "OK"}

    def runtime_error(self, env: Environment, request_id: str, body: bytes, error_type):
        inv = self._current(env, request_id)
        if inv is None:
            return 400, {"errorMessage": f"Invalid request ID: {request_id}",
                         "errorType": "InvalidRequestID"}
        self._drain(env)
        self._complete(inv, body, "Unhandled", "failed")
        self._release(env)
        return 202, {"status": "OK"}

    def runtime_init_error(self, env: Environment, body: bytes, error_type):
        self._drain(env)
        env.init_error = body
        inv = env.inv
        if inv is not None and not inv.done:
            if inv.started is None:
                # the invocation never started: its log is the init phase's
                inv.log.extend(env.init_lines)
                env.init_lines = []
                inv.started = time.monotonic()
                inv.cold = True
                env.cold_invocations += 1
            self._log(env, inv, f"INIT_REPORT Init Duration: "
                                f"{(time.monotonic() - env.created) * 1000:.2f} ms\t"
                                f"Phase: init\tStatus: error\tError Type: {error_type}")
            self._complete(inv, body, "Unhandled", "failed")
        self._retire(env)
        return 202, {"status": "OK"}

    def _release(self, env: Environment) -> None:
        """The environment finished its invocation: idle again, or gone if stale."""
        if env.state == "dead":
            return
        env.state = "idle"
        env.idle_since = time.monotonic()
        fn = env.function
        if fn.deleted or env.spec.revision != fn.revision or self._closing:
            self._retire(env)
            return
        fn.idle.append(env)
        if fn.queue:
            self._schedule_pump()

    def _complete(self, inv: Invocation, payload: bytes, function_error: str | None,
                  status: str) -> None:
        if inv.done:
            return
        inv.done = True
        if inv.timer is not None:
            inv.timer.cancel()
        inv.result = payload
        inv.function_error = function_error
        inv.status = status
        env = inv.env
        now = time.monotonic()
        inv.duration_ms = (now - inv.started) * 1000 if inv.started else 0.0
        if env is not None:
            self._log(env, inv, f"END RequestId: {inv.request_id}")
            used = None
            if env.handle is not None:
                used = envmod.vm_hwm_bytes(env.handle.pid)
                if used is None and env.handle.cgroup is not None:
                    used = envmod.CgroupV1Memory.max_usage(env.handle.cgroup)
            report = (f"REPORT RequestId: {inv.request_id}\tDuration: {inv.duration_ms:.2f} ms\t"
                      f"Billed Duration: {max(1, math.ceil(inv.duration_ms))} ms\t"
                      f"Memory Size: {env.spec.memory} MB\t"
                      f"Max Memory Used: {(used or 0) // (1024 * 1024)} MB\t")
            if inv.cold and inv.init_ms is not None:
                report += f"Init Duration: {inv.init_ms:.2f} ms\t"
            self._log(env, inv, report)
            if env.log_file is not None:
                try:
                    env.log_file.flush()
                except (OSError, ValueError):
                    pass
            if env.inv is inv:
                self._unbind(env)
        if function_error:
            self.stats["errors"] += 1
        if inv.future is not None and not inv.future.done():
            inv.future.set_result(inv)
        elif inv.kind == "Event" and function_error and not self._closing:
            self._maybe_retry_event(inv)

    def _maybe_retry_event(self, inv: Invocation) -> None:
        fn = inv.function
        if fn.deleted or inv.attempt >= min(fn.event_retries, len(self.event_retry_delays)):
            return
        age = time.monotonic() - inv.enqueued
        delay = self.event_retry_delays[inv.attempt]
        if age + delay > fn.event_max_age:
            return

        def retry():
            if fn.deleted or self._closing:
                return
            again = Invocation(fn, inv.payload, "Event", False, inv.client_context)
            again.request_id = inv.request_id  # Lambda retries under the same request id
            again.attempt = inv.attempt + 1
            again.enqueued = inv.enqueued
            again.log = inv.log
            fn.queue.append(again)
            self._invocations[again.request_id] = again
            self._schedule_pump()

        self._loop.call_later(delay, retry)

    def _on_timeout(self, inv: Invocation) -> None:
        if inv.done:
            return
        env = inv.env
        self.stats["timeouts"] += 1
        msg = f"Task timed out after {inv.timeout:.2f} seconds"
        if env is not None:
            self._drain(env)
        self._complete(inv, json.dumps({
            "errorType": "Sandbox.Timedout",
            "errorMessage": f"RequestId: {inv.request_id} Error: {msg}"}).encode(),
            "Unhandled", "timedout")
        if env is not None:
            self._log(env, inv, f"{_log_ts()} {inv.request_id} {msg}")
            self._retire(env)

    def _on_init_timeout(self, env: Environment) -> None:
        env.init_timer = None
        if env.initialized or env.state == "dead":
            return
        inv = env.inv
        if inv is not None and not inv.done:
            inv.started = inv.started or env.created
            inv.timeout = INIT_TIMEOUT + env.spec.timeout
            self._on_timeout(inv)
        else:
            self._retire(env)

    # ------------------------------------------------------------ environments

    def _spawn_task(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _spawn(self, fn: Function, inv: Invocation) -> Environment:
        env = Environment(fn, fn.spec())
        fn.envs.append(env)
        self._envs[env.id] = env
        self._bind(env, inv)
        env.pending = inv
        env.http = HTTPServer(runtime_application(env, self), max_body_size=80 * 1024 * 1024)
        socks = bind_sockets(0, self.host_address, family=socket.AF_INET)
        env.port = socks[0].getsockname()[1]
        env.http.add_sockets(socks)
        env.init_timer = self._loop.call_later(INIT_TIMEOUT + env.spec.timeout,
                                               self._on_init_timeout, env)
        self._spawn_task(self._start_env(env))
        return env

    def _env_vars(self, env: Environment, tmpdir: Path) -> dict:
        s = env.spec
        fn = env.function
        pyver = f"python{s.runtime[len('python'):]}"
        site = (self._python.parent.parent / "lib" /
                f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages")
        v = {
            "PATH": f"{self._python.parent}:/usr/local/bin:/usr/bin/:/bin:{s.opt_dir}/bin",
            "LD_LIBRARY_PATH": f"{s.opt_dir}/lib",
            "LANG": "en_US.UTF-8",
            "TZ": ":UTC",
            "PYTHONPATH": os.pathsep.join([
                str(s.task_root), f"{s.opt_dir}/python/lib/{pyver}/site-packages",
                f"{s.opt_dir}/python"]),
            "PYTHONNOUSERSITE": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "TMPDIR": str(tmpdir),
            "LAMBDA_TASK_ROOT": str(s.task_root),
            "LAMBDA_RUNTIME_DIR": str(site),
            "_HANDLER": s.handler,
            "AWS_EXECUTION_ENV": f"AWS_Lambda_{s.runtime}",
            "AWS_LAMBDA_FUNCTION_NAME": fn.name,
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(s.memory),
            "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
            "AWS_LAMBDA_INITIALIZATION_TYPE": "on-demand",
            "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{fn.name}",
            "AWS_LAMBDA_LOG_STREAM_NAME": env.stream,
            "AWS_LAMBDA_RUNTIME_API": f"{self.host_address}:{env.port}",
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ACCESS_KEY_ID": "ASIAEMULATOREXAMPLE00",
            "AWS_SECRET_ACCESS_KEY": "emulator-secret-access-key",
            "AWS_SESSION_TOKEN": "emulator-session-token",
            "AWS_ENDPOINT_URL_LAMBDA": self.sandbox_endpoint_url,
        }
        v.update(s.variables)
        return v

    def _start_blocking(self, env: Environment) -> envmod.ProcessHandle:
        tmpdir = self.workdir / "envs" / env.id / "tmp"
        tmpdir.mkdir(parents=True)
        ns = self._pool.acquire() if self._pool is not None else None
        try:
            h = envmod.start_process(
                python=str(self._python), handler=env.spec.handler,
                env=self._env_vars(env, tmpdir), task_root=str(env.spec.task_root),
                memory_mb=env.spec.memory, netns=ns, cgroups=self._cgroups,
                name=f"env-{env.id}", tmpdir=tmpdir.parent)
        except Exception:
            if ns is not None:
                self._pool.destroy(ns)
            shutil.rmtree(tmpdir.parent, ignore_errors=True)
            raise
        if self._pool is not None:
            self._executor.submit(self._pool.refill)
        return h

    async def _start_env(self, env: Environment) -> None:
        loop = asyncio.get_running_loop()
        try:
            h = await loop.run_in_executor(self._executor, self._start_blocking, env)
        except Exception as e:
            logger.exception("starting an environment of %s failed", env.function.name)
            inv = env.inv
            if inv is not None:
                self._complete(inv, json.dumps({
                    "errorType": "Runtime.Unknown",
                    "errorMessage": f"the emulator could not start an environment: {e}"
                }).encode(), "Unhandled", "failed")
            env.state = "dead"
            self._forget(env)
            return
        env.handle = h
        stream_path = self.log_dir / env.function.name / (env.stream.replace("/", "-") + ".log")
        try:
            stream_path.parent.mkdir(parents=True, exist_ok=True)
            env.log_file = open(stream_path, "a", buffering=65536)
        except OSError:
            env.log_file = None
        if env.state == "dead":  # retired while starting (stop, timeout, delete)
            self._exit_cleanup(env)
            return
        loop.add_reader(h.stdout_fd, self._on_output, env)
        env.pidfd = os.pidfd_open(h.pid)
        loop.add_reader(env.pidfd, self._on_exit, env)

    def _on_output(self, env: Environment) -> None:
        h = env.handle
        try:
            data = os.read(h.stdout_fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._loop.remove_reader(h.stdout_fd)
            if env.out_buf:
                self._line(env, env.out_buf)
                env.out_buf = b""
            return
        self._feed(env, data)

    def _feed(self, env: Environment, data: bytes) -> None:
        buf = env.out_buf + data
        *lines, env.out_buf = buf.split(b"\n")
        for line in lines:
            self._line(env, line)

    def _drain(self, env: Environment) -> None:
        """Read what the environment wrote before it called the Runtime API."""
        h = env.handle
        if h is None:
            return
        while True:
            try:
                data = os.read(h.stdout_fd, 65536)
            except (BlockingIOError, OSError, ValueError):
                return
            if not data:
                return
            self._feed(env, data)

    def _line(self, env: Environment, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        inv = env.inv
        if inv is not None and inv.started is not None and not inv.done:
            self._log(env, inv, text)
        else:
            env.init_lines.append(text)
            if len(env.init_lines) > 1000:
                del env.init_lines[:500]
            self._write_stream(env, text)

    def _log(self, env: Environment, inv: Invocation, text: str) -> None:
        inv.log.append(text)
        self._write_stream(env, text)

    def _write_stream(self, env: Environment, text: str) -> None:
        if env.log_file is not None:
            try:
                env.log_file.write(f"{_log_ts()} {text}\n")
            except (OSError, ValueError):
                pass

    def _on_exit(self, env: Environment) -> None:
        h = env.handle
        self._loop.remove_reader(env.pidfd)
        os.close(env.pidfd)
        env.pidfd = None
        rc = h.proc.poll()
        if rc is None:
            try:
                rc = h.proc.wait(timeout=1)
            except Exception:
                rc = -9
        self._drain(env)
        env.exited = True
        inv = env.inv
        if inv is not None and not inv.done:
            # oom_kill is not always counted in the environment's own cgroup (the
            # kill can come from the hierarchy's OOM path); SIGKILL at the limit is OOM too
            oom = h.cgroup is not None and (
                envmod.CgroupV1Memory.oom_killed(h.cgroup)
                or (rc == -9 and envmod.CgroupV1Memory.hit_limit(h.cgroup)))
            desc = envmod.exit_description(rc)
            if env.init_error is not None:
                payload = env.init_error
            else:
                etype = "Runtime.OutOfMemory" if oom else "Runtime.ExitError"
                payload = json.dumps({
                    "errorType": etype,
                    "errorMessage": f"RequestId: {inv.request_id} Error: Runtime exited with "
                                    f"error: {desc}"}).encode()
                if inv.started is None:
                    inv.log.extend(env.init_lines)
                    env.init_lines = []
                    inv.started = time.monotonic()
                    inv.cold = True
                self._log(env, inv, f"RequestId: {inv.request_id} Error: Runtime exited with "
                                    f"error: {desc}")
                self._log(env, inv, etype)
            self.stats["crashes"] += 1
            self._complete(inv, payload, "Unhandled", "failed")
        env.state = "dead"
        self._exit_cleanup(env)
        self._schedule_pump()

    def _retire(self, env: Environment, teardown_now: bool = False) -> None:
        """Stop using an environment: kill it (its exit handler then cleans up)."""
        if env.state == "dead" and not teardown_now:
            return
        env.state = "dead"
        if env.init_timer is not None:
            env.init_timer.cancel()
            env.init_timer = None
        if env.waiter is not None and not env.waiter.done():
            env.waiter.cancel()
        try:
            env.function.idle.remove(env)
        except ValueError:
            pass
        h = env.handle
        if h is None:
            if env.exited or env.id not in self._envs:
                return
            return  # still starting: _start_env tears it down when the process is up
        if teardown_now or env.exited:
            self._exit_cleanup(env)
        else:
            envmod.kill_process(h)  # SIGKILL by PID; _on_exit follows

    def _exit_cleanup(self, env: Environment) -> None:
        if env.id not in self._envs:
            return
        h = env.handle
        if env.pidfd is not None:
            self._loop.remove_reader(env.pidfd)
            os.close(env.pidfd)
            env.pidfd = None
        if h is not None:
            try:
                self._loop.remove_reader(h.stdout_fd)
            except Exception:
                pass
        self._unbind(env)
        self._forget(env)
        if env.log_file is not None:
            env.log_file.close()
            env.log_file = None
        if h is not None:
            f = self._executor.submit(envmod.teardown, h, self._cgroups, self._pool)
            self._teardowns.add(f)
            f.add_done_callback(self._teardowns.discard)

    def _forget(self, env: Environment) -> None:
        self._unbind(env)
        self._envs.pop(env.id, None)
        try:
            env.function.envs.remove(env)
        except ValueError:
            pass
        try:
            env.function.idle.remove(env)
        except ValueError:
            pass
        if env.http is not None:
            env.http.stop()
            env.http = None

    def _retire_stale(self, fn: Function) -> None:
        for env in list(fn.idle):
            if env.spec.revision != fn.revision:
                self._retire(env)

    def _reap(self) -> None:
        now = time.monotonic()
        for env in list(self._envs.values()):
            if env.state == "idle" and now - env.idle_since > self.idle_timeout:
                self._retire(env)


# ------------------------------------------------------------- control API


class _Control(RequestHandler):
    def initialize(self, core: LambdaEmulator):
        self.core = core

    def check_xsrf_cookie(self):
        pass

    def prepare(self):
        self.set_header("x-amzn-RequestId", str(uuid.uuid4()))

    def body_json(self) -> dict:
        if not self.request.body:
            return {}
        try:
            return json.loads(self.request.body)
        except ValueError:
            raise LambdaError("InvalidRequestContentException", 400,
                              "Could not parse request body into json") from None

    def send_json(self, obj, status: int = 200):
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(obj))

    def send_empty(self, status: int = 204):
        self.set_status(status)
        self.finish()

    def write_error(self, status_code, **kwargs):
        exc = kwargs.get("exc_info", (None, None))[1]
        if isinstance(exc, LambdaError):
            err = exc
        elif isinstance(exc, HTTPError) and exc.status_code == 404:
            err = LambdaError("UnknownOperationException", 404, "Unknown operation")
        elif isinstance(exc, HTTPError) and exc.status_code == 405:
            err = LambdaError("UnknownOperationException", 404, "Unknown operation")
        else:
            err = LambdaError("ServiceException", 500, f"{type(exc).__name__}: {exc}",
                              message_key="Message")
        self.set_status(err.status)
        self.set_header("x-amzn-ErrorType", err.code)
        self.set_header("Content-Type", "application/json")
        for k, v in err.headers.items():
            self.set_header(k, v)
        self.finish(json.dumps(err.body()))

    def log_exception(self, typ, value, tb):
        if not isinstance(value, (LambdaError, HTTPError)):
            super().log_exception(typ, value, tb)


class FunctionsHandler(_Control):
    async def post(self):
        self.send_json(await self.core.create_function(self.body_json()), 201)

    def get(self):
        fns = sorted(self.core._functions.values(), key=lambda f: f.name)
        start = int(self.get_argument("Marker", "0") or 0)
        n = int(self.get_argument("MaxItems", "50") or 50)
        page = fns[start:start + n]
        out = {"Functions": [f.configuration() for f in page]}
        if start + n < len(fns):
            out["NextMarker"] = str(start + n)
        self.send_json(out)


class FunctionHandler(_Control):
    def get(self, name):
        fn = self.core.resolve(name, self.get_argument("Qualifier", None))
        out = {"Configuration": fn.configuration(),
               "Code": {"RepositoryType": "S3",
                        "Location": f"{self.core.endpoint_url}/_emulator/functions/"
                                    f"{fn.name}/code"},
               "Tags": {}}
        if fn.reserved is not None:
            out["Concurrency"] = {"ReservedConcurrentExecutions": fn.reserved}
        self.send_json(out)

    def delete(self, name):
        self.core.delete_function(self.core.resolve(name, self.get_argument("Qualifier", None)))
        self.send_empty(204)


class ConfigurationHandler(_Control):
    def get(self, name):
        self.send_json(self.core.resolve(name, self.get_argument("Qualifier", None))
                       .configuration())

    async def put(self, name):
        fn = self.core.resolve(name)
        self.send_json(await self.core.update_configuration(fn, self.body_json()))


class CodeHandler(_Control):
    async def put(self, name):
        fn = self.core.resolve(name)
        self.send_json(await self.core.update_code(fn, self.body_json()))


class InvokeHandler(_Control):
    async def post(self, name):
        core = self.core
        fn = core.resolve(name, self.get_argument("Qualifier", None))
        kind = self.request.headers.get("X-Amz-Invocation-Type", "RequestResponse")
        if kind not in ("RequestResponse", "Event", "DryRun"):
            raise _invalid(f"Value {kind!r} at 'invocationType' failed to satisfy constraint")
        payload = self.request.body
        limit = ASYNC_PAYLOAD_LIMIT if kind == "Event" else SYNC_PAYLOAD_LIMIT
        if len(payload) > limit:
            msg = (f"{len(payload)} byte payload is too large for the Event invocation type "
                   f"(limit {ASYNC_PAYLOAD_LIMIT} bytes)" if kind == "Event" else
                   f"Request must be smaller than {SYNC_PAYLOAD_LIMIT} bytes for the "
                   f"InvokeFunction operation")
            raise LambdaError("RequestEntityTooLargeException", 413, msg)
        if not payload:
            payload = b"{}"
        else:
            try:
                json.loads(payload)
            except ValueError as e:
                raise LambdaError("InvalidRequestContentException", 400,
                                  f"Could not parse request body into json: {e}") from None
        if kind == "DryRun":
            if fn.state != "Active":
                raise _conflict(f"The operation cannot be performed at this time. The function "
                                f"is currently in the following state: {fn.state}")
            self.send_empty(204)
            return
        cc = self.request.headers.get("X-Amz-Client-Context")
        if cc:
            try:
                cc = base64.b64decode(cc).decode()
            except Exception:
                raise _invalid("Client context must be a valid Base64-encoded JSON object.") from None
        tail = self.request.headers.get("X-Amz-Log-Type") == "Tail" and kind != "Event"
        inv = core.invoke(fn, payload, kind, tail, cc)
        self.set_header("x-amzn-RequestId", inv.request_id)
        self.set_header("X-Amzn-Trace-Id", inv.trace_id)
        if kind == "Event":
            self.set_status(202)
            self.finish()
            return
        await inv.future
        self.set_header("X-Amz-Executed-Version", "$LATEST")
        self.set_header("Content-Type", "application/json")
        if inv.function_error:
            self.set_header("X-Amz-Function-Error", inv.function_error)
        if tail:
            text = ("\n".join(inv.log) + "\n").encode()
            self.set_header("X-Amz-Log-Result", base64.b64encode(text[-LOG_TAIL_BYTES:]).decode())
        self.set_status(200)
        self.finish(inv.result)


class InvokeAsyncHandler(_Control):
    def post(self, name):
        fn = self.core.resolve(name)
        payload = self.request.body or b"{}"
        if len(payload) > ASYNC_PAYLOAD_LIMIT:
            raise LambdaError("RequestEntityTooLargeException", 413,
                              f"{len(payload)} byte payload is too large for the Event "
                              f"invocation type (limit {ASYNC_PAYLOAD_LIMIT} bytes)")
        inv = self.core.invoke(fn, payload, "Event", False, None)
        self.set_header("x-amzn-RequestId", inv.request_id)
        self.send_json({"Status": 202}, 202)


class ConcurrencyHandler(_Control):
    def put(self, name):
        fn = self.core.resolve(name)
        self.send_json(self.core.put_concurrency(
            fn, self.body_json().get("ReservedConcurrentExecutions")))

    def get(self, name):
        fn = self.core.resolve(name)
        self.send_json({} if fn.reserved is None else
                       {"ReservedConcurrentExecutions": fn.reserved})

    def delete(self, name):
        self.core._set_reserved(self.core.resolve(name), None)
        self.send_empty(204)


class EventInvokeConfigHandler(_Control):
    def _describe(self, fn):
        return {"LastModified": time.time(), "FunctionArn": fn.arn + ":$LATEST",
                "MaximumRetryAttempts": fn.event_retries,
                "MaximumEventAgeInSeconds": fn.event_max_age, "DestinationConfig": {}}

    def put(self, name):
        fn = self.core.resolve(name, self.get_argument("Qualifier", None))
        body = self.body_json()
        retries = body.get("MaximumRetryAttempts", 2)
        age = body.get("MaximumEventAgeInSeconds", 21600)
        if not isinstance(retries, int) or not 0 <= retries <= 2:
            raise _invalid("MaximumRetryAttempts must be between 0 and 2")
        if not isinstance(age, int) or not 60 <= age <= 21600:
            raise _invalid("MaximumEventAgeInSeconds must be between 60 and 21600")
        fn.event_retries, fn.event_max_age = retries, age
        self.send_json(self._describe(fn))

    post = put

    def get(self, name):
        self.send_json(self._describe(self.core.resolve(name, self.get_argument("Qualifier",
                                                                                 None))))

    def delete(self, name):
        fn = self.core.resolve(name, self.get_argument("Qualifier", None))
        fn.event_retries, fn.event_max_age = 2, 21600
        self.send_empty(204)


class AccountHandler(_Control):
    def get(self):
        self.send_json(self.core.account_settings())


class LayerVersionsHandler(_Control):
    async def post(self, name):
        self.send_json(await self.core.publish_layer(name, self.body_json()), 201)

    def get(self, name):
        versions = self.core._layers.get(name, [])
        self.send_json({"LayerVersions": [lv.list_item() for lv in reversed(versions)]})


class LayerVersionHandler(_Control):
    def get(self, name, version):
        self.send_json(self.core.layer_version(name, version).describe(self.core.endpoint_url))

    def delete(self, name, version):
        versions = self.core._layers.get(name, [])
        self.core._layers[name] = [lv for lv in versions if str(lv.version) != version]
        self.send_empty(204)


class LayersHandler(_Control):
    def get(self):
        out = []
        for name, versions in sorted(self.core._layers.items()):
            if versions:
                out.append({"LayerName": name, "LayerArn": versions[-1].layer_arn,
                            "LatestMatchingVersion": versions[-1].list_item()})
        self.send_json({"Layers": out})


class CodeDownloadHandler(_Control):
    def get(self, name):
        fn = self.core.resolve(name)
        self.set_header("Content-Type", "application/zip")
        self.finish(fn.zip_path.read_bytes() if fn.zip_path else b"")


class LayerDownloadHandler(_Control):
    def get(self, name, version):
        self.set_header("Content-Type", "application/zip")
        self.finish(self.core.layer_version(name, version).zip_path.read_bytes())


class EmulatorStatusHandler(_Control):
    def get(self):
        from dataclasses import asdict
        self.send_json({"endpoint_url": self.core.endpoint_url,
                        "host_address": self.core.host_address,
                        "sandboxed": self.core.sandboxed,
                        "memory_limit": self.core.memory_limit_mode,
                        "stats": dict(self.core.stats),
                        "environments": [asdict(e) for e in self.core._environment_infos()]})


class NotFoundHandler(_Control):
    def prepare(self):
        super().prepare()
        raise LambdaError("UnknownOperationException", 404,
                          f"Unknown operation {self.request.method} {self.request.path}")


_EVENT_INVOKE_RE = re.compile(r"^/2015-03-31/functions/([^/?]+)/invocations/?$")


class _EventFastPath(httputil.HTTPMessageDelegate):
    """Accept a well-formed Event invoke without the RequestHandler machinery.

    Event invokes are the emulator's hot path (a cluster scaling up sends hundreds at
    once); anything unusual -- an error to report, another invocation type -- is
    replayed to the full application, which answers it.
    """

    def __init__(self, core, app, server_conn, request_conn):
        self.core, self.app = core, app
        self.server_conn, self.conn = server_conn, request_conn
        self.delegate = None
        self.fast = False
        self.start_line = self.headers = None
        self.chunks: list[bytes] = []

    def headers_received(self, start_line, headers):
        self.start_line, self.headers = start_line, headers
        m = (_EVENT_INVOKE_RE.match(start_line.path) if start_line.method == "POST" else None)
        if m and headers.get("X-Amz-Invocation-Type") == "Event":
            self.fast, self.name = True, urllib.parse.unquote(m.group(1))
            return None
        return self._forward()

    def _forward(self):
        self.fast = False
        self.delegate = self.app.start_request(self.server_conn, self.conn)
        r = self.delegate.headers_received(self.start_line, self.headers)
        for c in self.chunks:
            self.delegate.data_received(c)
        self.chunks = []
        return r

    def data_received(self, chunk):
        if self.fast:
            self.chunks.append(chunk)
            return None
        return self.delegate.data_received(chunk)

    def finish(self):
        if self.fast:
            payload = b"".join(self.chunks) or b"{}"
            inv = None
            # a rate limit's 429 is answered by the full handler (counted once)
            if len(payload) <= ASYNC_PAYLOAD_LIMIT and not self.headers.get("X-Amz-Client-Context") \
                    and not self.core.invoke_rate_limit:
                try:
                    json.loads(payload)
                    inv = self.core.invoke(self.core.resolve(self.name), payload, "Event",
                                           False, None)
                except (LambdaError, ValueError):
                    inv = None
            if inv is not None:
                self.conn.write_headers(
                    httputil.ResponseStartLine("HTTP/1.1", 202, "Accepted"),
                    httputil.HTTPHeaders({"x-amzn-RequestId": inv.request_id,
                                          "Content-Length": "0"}))
                self.conn.finish()
                return
            self._forward()
        self.delegate.finish()

    def on_connection_close(self):
        if self.delegate is not None:
            self.delegate.on_connection_close()


class _ControlRouter(httputil.HTTPServerConnectionDelegate):
    def __init__(self, core, app):
        self.core, self.app = core, app

    def start_request(self, server_conn, request_conn):
        return _EventFastPath(self.core, self.app, server_conn, request_conn)

    def on_close(self, server_conn):
        self.app.on_close(server_conn)


def control_application(core: LambdaEmulator):
    return _ControlRouter(core, _control_app(core))


def _control_app(core: LambdaEmulator) -> Application:
    kw = {"core": core}
    fn = r"([^/]+)"
    return Application([
        (rf"/2015-03-31/functions/{fn}/invocations/?", InvokeHandler, kw),
        (r"/2015-03-31/functions/?", FunctionsHandler, kw),
        (rf"/2015-03-31/functions/{fn}/?", FunctionHandler, kw),
        (rf"/2015-03-31/functions/{fn}/configuration/?", ConfigurationHandler, kw),
        (rf"/2015-03-31/functions/{fn}/code/?", CodeHandler, kw),
        (rf"/2014-11-13/functions/{fn}/invoke-async/?", InvokeAsyncHandler, kw),
        (rf"/2017-10-31/functions/{fn}/concurrency/?", ConcurrencyHandler, kw),
        (rf"/2019-09-30/functions/{fn}/concurrency/?", ConcurrencyHandler, kw),
        (rf"/2019-09-25/functions/{fn}/event-invoke-config/?", EventInvokeConfigHandler, kw),
        (r"/2016-08-19/account-settings/?", AccountHandler, kw),
        (r"/2018-10-31/layers/?", LayersHandler, kw),
        (rf"/2018-10-31/layers/{fn}/versions/?", LayerVersionsHandler, kw),
        (rf"/2018-10-31/layers/{fn}/versions/([0-9]+)/?", LayerVersionHandler, kw),
        (rf"/_emulator/functions/{fn}/code", CodeDownloadHandler, kw),
        (rf"/_emulator/layers/{fn}/([0-9]+)/code", LayerDownloadHandler, kw),
        (r"/_emulator/status", EmulatorStatusHandler, kw),
        (r".*", NotFoundHandler, kw),
    ], log_function=lambda handler: None)
