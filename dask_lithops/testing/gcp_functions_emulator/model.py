"""The emulator's state (functions, operations, instances, requests), limits and error shapes."""

from __future__ import annotations

import asyncio
import datetime
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

FUNCTION_ID_RE = re.compile(r"^[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?$")
ENTRY_POINT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
PYTHON_RUNTIME_RE = re.compile(r"^python3(\d{1,2})$")
MIN_MEMORY_MB, MAX_MEMORY_MB = 128, 32768
MAX_TIMEOUT_S = 3600
DEFAULT_MEMORY = "256M"
DEFAULT_TIMEOUT_S = 60
DEFAULT_MAX_INSTANCES = 100
INSTANCE_PORT = 8080  # Cloud Run's $PORT
UPLOAD_LIMIT = 100 * 1024 * 1024
FUNCTION_TYPE = "type.googleapis.com/google.cloud.functions.v2.Function"
METADATA_TYPE = "type.googleapis.com/google.cloud.functions.v2.OperationMetadata"
EMPTY_TYPE = "type.googleapis.com/google.protobuf.Empty"

#: google.rpc.Code and the HTTP status Google's REST APIs answer with for each
CODES = {
    "INVALID_ARGUMENT": (3, 400), "DEADLINE_EXCEEDED": (4, 504), "NOT_FOUND": (5, 404),
    "ALREADY_EXISTS": (6, 409), "PERMISSION_DENIED": (7, 403), "RESOURCE_EXHAUSTED": (8, 429),
    "FAILED_PRECONDITION": (9, 400), "ABORTED": (10, 409), "INTERNAL": (13, 500),
    "UNAVAILABLE": (14, 503), "UNAUTHENTICATED": (16, 401), "UNKNOWN": (2, 500),
}


class GoogleError(Exception):
    """An error in Google's JSON shape: ``{"error": {"code", "message", "status"}}``."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status, self.message = status, message
        self.rpc_code, self.http_status = CODES[status]

    def body(self) -> dict:
        return {"error": {"code": self.http_status, "message": self.message,
                          "status": self.status}}

    def rpc_status(self) -> dict:
        """As an operation's ``error`` (google.rpc.Status)."""
        return {"code": self.rpc_code, "message": self.message}


def invalid(message: str) -> GoogleError:
    return GoogleError("INVALID_ARGUMENT", message)


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_MEMORY_UNITS = {"": 1, "k": 1000, "M": 1000 ** 2, "G": 1000 ** 3, "Ki": 1024, "Mi": 1024 ** 2,
                 "Gi": 1024 ** 3}


def parse_memory_mb(value) -> int:
    """``availableMemory`` ("256M", "512Mi", "1G", "2Gi") in MiB; INVALID_ARGUMENT otherwise."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(k|M|G|Ki|Mi|Gi)?", str(value or ""))
    if not m:
        raise invalid(f"Invalid value {value!r} for serviceConfig.availableMemory: expected a "
                      f"quantity like 256M, 512Mi, 1G or 2Gi")
    mb = math.ceil(float(m.group(1)) * _MEMORY_UNITS[m.group(2) or ""] / 1024 ** 2)
    if not MIN_MEMORY_MB <= mb <= MAX_MEMORY_MB:
        raise invalid(f"serviceConfig.availableMemory {value!r} is out of range: it must be "
                      f"between 128Mi and 32Gi")
    return mb


@dataclass
class Upload:
    bucket: str
    object: str
    signature: str
    created: float
    data: bytes | None = None


class Function:
    def __init__(self, name: str, function_id: str):
        self.name, self.id = name, function_id
        self.description = ""
        self.build_config: dict = {}
        self.service_config: dict = {}
        self.labels: dict = {}
        self.state = "DEPLOYING"
        self.state_messages: list = []
        self.create_time = self.update_time = now_rfc3339()
        self.revision = 0
        self.build_revision = 0
        self.python: Path | None = None       # the built environment's interpreter
        self.source_dir: Path | None = None   # the extracted source
        self.uri = ""
        self.port = 0
        self.server = None                    # the front end's listener for this function
        self.instances: list[Instance] = []
        self.busy_operation: str | None = None
        self.deleted = False

    # the serving configuration, fixed per revision
    @property
    def memory_mb(self) -> int:
        return parse_memory_mb(self.service_config.get("availableMemory", DEFAULT_MEMORY))

    @property
    def timeout_s(self) -> int:
        return int(self.service_config.get("timeoutSeconds", DEFAULT_TIMEOUT_S))

    @property
    def max_instances(self) -> int:
        return int(self.service_config.get("maxInstanceCount") or DEFAULT_MAX_INSTANCES)

    @property
    def concurrency(self) -> int:
        return int(self.service_config.get("maxInstanceRequestConcurrency") or 1)

    def describe(self) -> dict:
        d = {"name": self.name, "buildConfig": dict(self.build_config),
             "serviceConfig": dict(self.service_config), "state": self.state,
             "updateTime": self.update_time, "createTime": self.create_time,
             "environment": "GEN_2"}
        if self.description:
            d["description"] = self.description
        if self.labels:
            d["labels"] = dict(self.labels)
        if self.state_messages:
            d["stateMessages"] = list(self.state_messages)
        if self.uri:
            d["url"] = self.uri
        return d


@dataclass
class Operation:
    name: str
    verb: str
    target: str
    create_time: str = field(default_factory=now_rfc3339)
    end_time: str | None = None
    done: bool = False
    response: dict | None = None
    error: dict | None = None
    status_detail: str = ""

    def describe(self) -> dict:
        kind = {"create": "CREATE_FUNCTION", "update": "UPDATE_FUNCTION",
                "delete": "DELETE_FUNCTION"}[self.verb]
        meta = {"@type": METADATA_TYPE, "createTime": self.create_time, "target": self.target,
                "verb": self.verb, "apiVersion": "v2", "operationType": kind}
        if self.status_detail:
            meta["statusDetail"] = self.status_detail
        if self.end_time:
            meta["endTime"] = self.end_time
        d = {"name": self.name, "metadata": meta, "done": self.done}
        if self.error is not None:
            d["error"] = self.error
        elif self.response is not None:
            d["response"] = self.response
        return d


class Instance:
    """One running ``functions-framework`` process serving one revision of a function."""

    def __init__(self, function: Function):
        self.id = uuid.uuid4().hex[:12]
        self.function = function
        self.revision = function.revision
        self.memory_mb = function.memory_mb
        self.state = "starting"   # starting | idle | busy | dead
        self.in_flight = 0
        self.handle = None        # sandbox.ProcessHandle
        self.address = "127.0.0.1"
        self.port = 0
        self.created = time.monotonic()
        self.idle_since = self.created
        self.ready: asyncio.Future | None = None
        self.requests_served = 0
        self.pidfd: int | None = None
        self.log_path: Path | None = None
        self.log_file = None
        self.tail: list[str] = []
        self.tmpdir: Path | None = None
        self.exit_reason: str | None = None


@dataclass
class InstanceInfo:
    """A snapshot of one instance (``CloudFunctionsEmulator.instances``)."""

    id: str
    function: str
    revision: int
    pid: int | None
    state: str
    in_flight: int
    requests_served: int
    netns: str | None
    address: str
    memory_limit: str
    memory_mb: int


@dataclass
class RequestRecord:
    """One request through the front end (``CloudFunctionsEmulator.requests()``)."""

    id: str
    function: str
    method: str
    path: str
    status: int
    instance: str | None
    cold: bool
    duration_ms: float
    error: str | None = None
