"""The emulator's state: functions, layers, invocations, environments; Lambda's limits; errors."""

from __future__ import annotations

import asyncio
import collections
import datetime
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tornado.httpserver import HTTPServer

from ..sandbox import ProcessHandle

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


def invalid(message: str) -> LambdaError:
    return LambdaError("InvalidParameterValueException", 400, message)


def conflict(message: str) -> LambdaError:
    return LambdaError("ResourceConflictException", 409, message)


def not_found(message: str) -> LambdaError:
    return LambdaError("ResourceNotFoundException", 404, message, message_key="Message")


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "+0000"


def log_ts() -> str:
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
        self.last_modified = now_iso()
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
        self.handle: ProcessHandle | None = None
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
