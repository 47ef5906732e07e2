"""``CloudFunctionsEmulator``: lifecycle, the v2 API's logic, thread-safe views.

Everything that touches state runs on one asyncio/tornado event loop in a
background thread; blocking work (builds, namespaces, cgroups, processes) goes
to a thread pool.  Instances are managed by :class:`~.instances.InstanceManager`.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import hashlib
import hmac
import logging
import os
import secrets
import socket
import time
import uuid
from pathlib import Path

from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from ..emulator_base import EmulatorServer
from ..sandbox import Sandboxes
from .api import api_application
from .auth import TokenAuthority, write_key_file
from .build import BuildError, build_environment, extract_source
from .frontend import function_application
from .instances import InstanceManager
from .model import (
    DEFAULT_MEMORY,
    DEFAULT_TIMEOUT_S,
    EMPTY_TYPE,
    ENTRY_POINT_RE,
    FUNCTION_ID_RE,
    FUNCTION_TYPE,
    MAX_TIMEOUT_S,
    PYTHON_RUNTIME_RE,
    UPLOAD_LIMIT,
    Function,
    GoogleError,
    InstanceInfo,
    Operation,
    RequestRecord,
    Upload,
    invalid,
    now_rfc3339,
    parse_memory_mb,
)

logger = logging.getLogger("dask_lithops.gcp_functions_emulator")

MAX_KEPT_REQUESTS = 20000
#: fields of a Function a create or patch may set (others are output only)
SETTABLE = ("description", "buildConfig", "serviceConfig", "labels", "environment")


class CloudFunctionsEmulator(InstanceManager, EmulatorServer):
    """An offline Cloud Run functions (Cloud Functions v2 API + HTTP front end).

    Parameters
    ----------
    project, region:
        The one project and location the emulator serves.
    sandbox:
        Run every instance in an outbound-only network namespace (the front end
        reaches its port; nothing else can).  ``None`` (default) does so when
        possible and says once when it cannot; ``True`` requires it.
    host_reachable:
        ``False``: instances open no connection to any address of this host -- a
        client behind NAT as seen from Cloud Run -- while they still reach other
        namespaces ("the internet").  Requests reach them as before (inbound, from
        the front end).  Nothing of the host is let through: the function's runtime
        calls no Google endpoint (no metadata server, no API).  Needs the sandbox.
    idle_timeout:
        Seconds an idle instance is kept before it is stopped.
    host, port:
        Where the API listens; function URLs listen on ``host`` too.
    log_dir:
        Instances' logs (one file per instance); default a temporary directory.
    build_cache:
        Where built environments are cached (default ``~/.cache/dask-lithops/
        gcp-functions-builds``).
    isolate_filesystem:
        Give every instance a root of its own (the source at ``/workspace``, the
        built environment under ``/layers``, a private in-memory ``/tmp``, running
        unprivileged): none of the client's files.  ``None`` (default): when running
        as root; ``True`` requires it.
    """

    display_name = "Cloud Run functions emulator"
    unit_name = "instances"
    thread_prefix = "gcf-emulator"
    workdir_prefix = "dask-lithops-gcf-emulator-"
    logger = logger

    def __init__(self, project: str = "test-project", region: str = "us-central1", *,
                 sandbox: bool | None = None, idle_timeout: float = 900.0,
                 host: str = "127.0.0.1", port: int = 0,
                 log_dir: str | os.PathLike | None = None,
                 build_cache: str | os.PathLike | None = None, prewarm: int = 2,
                 startup_timeout: float = 60.0, isolate_filesystem: bool | None = None,
                 host_reachable: bool = True):
        tag = uuid.uuid4().hex[:8]
        self._init_server(Sandboxes(tag, sandbox, prewarm, "Cloud Run functions emulator",
                                    inbound_ports=(8080,), host_reachable=bool(host_reachable)),
                          tag, host, port, log_dir, idle_timeout, isolate_filesystem)
        self.host_reachable = bool(host_reachable)
        self.project, self.region = project, region
        self.startup_timeout = float(startup_timeout)
        self.build_cache = build_cache
        self.credentials_file: Path | None = None
        self.auth = TokenAuthority(project)
        self.stats = collections.Counter()
        self._upload_key = secrets.token_bytes(32)
        self._functions: dict[str, Function] = {}
        self._operations: collections.OrderedDict[str, Operation] = collections.OrderedDict()
        self._uploads: dict[tuple[str, str], Upload] = {}
        self._requests: collections.deque[RequestRecord] = collections.deque(
            maxlen=MAX_KEPT_REQUESTS)
        self._instances: dict[str, object] = {}

    # ------------------------------------------------------------ lifecycle

    def _listen(self) -> None:
        socks = bind_sockets(self.port_arg, self.host, family=socket.AF_INET)
        server = HTTPServer(api_application(self), max_body_size=UPLOAD_LIMIT + 1024 * 1024)
        server.add_sockets(socks)
        self._servers.append(server)
        self.port = socks[0].getsockname()[1]

    def _listening(self) -> None:
        self.auth.token_uri = f"{self.endpoint_url}/token"
        self.credentials_file = self.workdir / "service-account.json"
        write_key_file(self.credentials_file, self.auth.service_account_info(
            self.auth.token_uri))

    def _status_fields(self) -> dict:
        return {**super()._status_fields(), "host_reachable": self.host_reachable}

    @property
    def parent(self) -> str:
        return f"projects/{self.project}/locations/{self.region}"

    async def _shutdown(self) -> None:
        self._stop_serving()
        for fn in self._functions.values():
            if fn.server is not None:
                fn.server.stop()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        for inst in list(self._instances.values()):
            self.stop_instance(inst, "the emulator stopped")
        await self._teardowns_done()

    # --------------------------------------------------- thread-safe views

    @property
    def instances(self) -> list[InstanceInfo]:
        """Live instances (pid, state, requests served, namespace, memory limit)."""
        return self._call(self._instance_infos)

    def requests(self, function: str | None = None) -> list[RequestRecord]:
        """Requests the front end handled (status, instance, cold start, duration)."""
        return self._call(lambda: [r for r in self._requests
                                   if function is None or r.function == function])

    def function_url(self, function_id: str) -> str:
        return self._call(lambda: self.function(self.project, self.region, function_id).uri)

    def id_token(self, audience: str) -> str:
        """An ID token for ``audience`` (what google-auth fetches from the token endpoint)."""
        return self.auth.id_token(audience)

    def instance_log(self, instance_id: str) -> str:
        path = self.log_dir and next(self.log_dir.glob(f"*/{instance_id}.log"), None)
        if path is None:
            raise KeyError(f"no log of instance {instance_id!r}")
        return path.read_text(errors="replace")

    def resources(self) -> dict:
        """What this emulator made on the host (for leak checks)."""
        return self._call(lambda: self._host_resources(
            [i.handle.pid for i in self._instances.values() if i.handle]))

    def record(self, r: RequestRecord) -> None:
        self._requests.append(r)
        self.stats["requests"] += 1

    # ---------------------------------------------------------------- API

    def check_location(self, project: str, region: str) -> str:
        if project != self.project:
            raise GoogleError("PERMISSION_DENIED", f"Permission denied on 'locations/{region}' "
                                                   f"(or it may not exist) in project "
                                                   f"{project!r}")
        if region != self.region:
            raise GoogleError("NOT_FOUND", f"Location projects/{project}/locations/{region} is "
                                           f"not found or access is unauthorized.")
        return self.parent

    def function(self, project: str, region: str, function_id: str) -> Function:
        fn = self._functions.get(function_id)
        if fn is None:
            raise GoogleError("NOT_FOUND", f"Function {function_id} does not exist")
        return fn

    def operation(self, name: str) -> Operation:
        op = self._operations.get(name)
        if op is None:
            raise GoogleError("NOT_FOUND", f"Operation {name} does not exist")
        return op

    def generate_upload_url(self) -> dict:
        bucket = f"gcf-v2-uploads-{self._tag}-{self.region}"
        obj = f"{uuid.uuid4()}.zip"
        sig = hmac.new(self._upload_key, f"{bucket}/{obj}".encode(), hashlib.sha256).hexdigest()
        self._uploads[(bucket, obj)] = Upload(bucket, obj, sig, time.time())
        url = (f"{self.endpoint_url}/upload/{bucket}/{obj}?X-Goog-Algorithm=GOOG4-RSA-SHA256"
               f"&X-Goog-Expires=1800&X-Goog-Signature={sig}")
        return {"uploadUrl": url, "storageSource": {"bucket": bucket, "object": obj}}

    def receive_upload(self, bucket: str, obj: str, signature: str, data: bytes) -> None:
        up = self._uploads.get((bucket, obj))
        if up is None or not hmac.compare_digest(up.signature, signature) \
                or time.time() - up.created > 1800:
            raise GoogleError("PERMISSION_DENIED", "The request signature we calculated does not "
                                                   "match the signature you provided, or the "
                                                   "signed URL expired.")
        if len(data) > UPLOAD_LIMIT:
            raise invalid(f"The uploaded source is {len(data)} bytes; the limit is "
                          f"{UPLOAD_LIMIT} bytes")
        up.data = data

    def _validate(self, body: dict, fn: Function | None, mask: list[str]) -> dict:
        """The function's fields after this create/patch, validated (INVALID_ARGUMENT)."""
        if body.get("eventTrigger"):
            raise invalid("The emulator serves HTTP functions only: eventTrigger is not "
                          "supported")
        unknown = [k for k in body if k not in SETTABLE and k not in (
            "name", "state", "updateTime", "createTime", "url", "stateMessages", "eventTrigger",
            "kmsKeyName", "satisfiesPzs")]
        if unknown:
            raise invalid(f"Invalid JSON payload received. Unknown name {unknown[0]!r} at "
                          f"'function': Cannot find field.")
        cur = {"description": fn.description, "buildConfig": copy.deepcopy(fn.build_config),
               "serviceConfig": copy.deepcopy(fn.service_config), "labels": dict(fn.labels)} \
            if fn is not None else {"description": "", "buildConfig": {}, "serviceConfig": {},
                                    "labels": {}}
        if fn is None or not mask:
            for k in SETTABLE:
                if k in body and k != "environment":
                    cur[k] = copy.deepcopy(body[k])
        else:
            for path in mask:
                top, _, sub = path.partition(".")
                if top not in SETTABLE:
                    raise invalid(f"Invalid field mask path {path!r}: the function has no such "
                                  f"settable field")
                if not sub:
                    cur[top] = copy.deepcopy(body.get(top, {} if top != "description" else ""))
                elif sub in (body.get(top) or {}):
                    cur[top][sub] = copy.deepcopy(body[top][sub])
                else:
                    cur[top].pop(sub, None)
        if body.get("environment", "GEN_2") not in ("GEN_2", "ENVIRONMENT_UNSPECIFIED"):
            raise invalid("The emulator serves 2nd gen functions only (environment GEN_2)")
        b, s = cur["buildConfig"], cur["serviceConfig"]
        rt = b.get("runtime")
        if not isinstance(rt, str) or not PYTHON_RUNTIME_RE.match(rt):
            raise invalid(f"Invalid value {rt!r} for buildConfig.runtime: the emulator runs "
                          f"python3xx runtimes (e.g. python311) only")
        ep = b.get("entryPoint")
        if not isinstance(ep, str) or not ENTRY_POINT_RE.match(ep):
            raise invalid(f"Invalid value {ep!r} for buildConfig.entryPoint: it must name a "
                          f"Python function in main.py")
        src = (b.get("source") or {}).get("storageSource") or {}
        if not src.get("bucket") or not src.get("object"):
            raise invalid("buildConfig.source.storageSource (bucket and object from "
                          "generateUploadUrl) is required: the emulator builds uploaded "
                          "sources only")
        up = self._uploads.get((src["bucket"], src["object"]))
        if up is None or up.data is None:
            raise invalid(f"Storage source gs://{src['bucket']}/{src['object']} does not exist "
                          f"or was not uploaded")
        s.setdefault("availableMemory", DEFAULT_MEMORY)
        s.setdefault("timeoutSeconds", DEFAULT_TIMEOUT_S)
        mb = parse_memory_mb(s["availableMemory"])
        t = s["timeoutSeconds"]
        if not isinstance(t, int) or not 1 <= t <= MAX_TIMEOUT_S:
            raise invalid(f"serviceConfig.timeoutSeconds must be an integer between 1 and "
                          f"{MAX_TIMEOUT_S} (got {t!r})")
        for key, lo, hi in (("maxInstanceCount", 1, 1000), ("minInstanceCount", 0, 1000),
                            ("maxInstanceRequestConcurrency", 1, 1000)):
            v = s.get(key)
            if v is not None and (not isinstance(v, int) or not lo <= v <= hi):
                raise invalid(f"serviceConfig.{key} must be an integer between {lo} and {hi} "
                              f"(got {v!r})")
        cpu = s.get("availableCpu")
        if cpu is not None:
            try:
                cpus = float(cpu)
            except (TypeError, ValueError):
                cpus = -1
            if not 0.08 <= cpus <= 8:
                raise invalid(f"serviceConfig.availableCpu {cpu!r} must be a number of vCPUs "
                              f"between 0.083 and 8")
            if (s.get("maxInstanceRequestConcurrency") or 1) > 1 and cpus < 1:
                raise invalid("serviceConfig.maxInstanceRequestConcurrency above 1 requires "
                              "availableCpu of at least 1")
        if mb > 512 and cpu is not None and float(cpu) < 0.5:
            raise invalid(f"serviceConfig.availableMemory {s['availableMemory']!r} needs at "
                          f"least 0.5 vCPU (availableCpu {cpu!r})")
        for key in ("environmentVariables",):
            for where in (b, s):
                env = where.get(key) or {}
                if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
                    raise invalid(f"{key} must map names to string values")
                bad = [k for k in env if k.startswith("X_GOOGLE_") or k in (
                    "PORT", "K_SERVICE", "K_REVISION", "K_CONFIGURATION")]
                if bad:
                    raise invalid(f"environmentVariables: {bad[0]} is a reserved name")
        return cur

    def _new_operation(self, verb: str, target: str) -> Operation:
        name = f"{self.parent}/operations/operation-{int(time.time() * 1000)}-{uuid.uuid4().hex[:12]}"
        op = Operation(name, verb, target)
        self._operations[name] = op
        while len(self._operations) > 10000:
            self._operations.popitem(last=False)
        return op

    async def create_function(self, parent: str, function_id: str, body: dict) -> Operation:
        if not FUNCTION_ID_RE.match(function_id or ""):
            raise invalid(f"Invalid function id {function_id!r}: it must start with a letter, "
                          f"contain only lowercase letters, digits and hyphens, end with a "
                          f"letter or digit and be at most 63 characters long (query parameter "
                          f"functionId)")
        if function_id in self._functions:
            raise GoogleError("ALREADY_EXISTS", f"Function {function_id} in region "
                                                f"{self.region} in project {self.project} "
                                                f"already exists")
        cur = self._validate(body, None, [])
        fn = Function(f"{parent}/functions/{function_id}", function_id)
        self._apply(fn, cur)
        self._functions[function_id] = fn
        op = self._new_operation("create", fn.name)
        fn.busy_operation = op.name
        self._spawn_task(self._deploy(fn, op, rebuild=True))
        return op

    async def update_function(self, fn: Function, body: dict, mask: list[str]) -> Operation:
        if fn.busy_operation is not None:
            raise GoogleError("ABORTED", f"An operation on function {fn.name} is already in "
                                         f"progress. Please try again later.")
        cur = self._validate(body, fn, mask)
        rebuild = cur["buildConfig"] != fn.build_config
        self._apply(fn, cur)
        fn.state = "DEPLOYING"
        op = self._new_operation("update", fn.name)
        fn.busy_operation = op.name
        self._spawn_task(self._deploy(fn, op, rebuild=rebuild))
        return op

    def _apply(self, fn: Function, cur: dict) -> None:
        fn.description = cur["description"]
        fn.build_config = cur["buildConfig"]
        fn.service_config = cur["serviceConfig"]
        fn.labels = cur["labels"]
        fn.update_time = now_rfc3339()

    async def _deploy(self, fn: Function, op: Operation, rebuild: bool) -> None:
        loop = asyncio.get_running_loop()
        try:
            if rebuild:
                op.status_detail = "Building function"
                src = fn.build_config["source"]["storageSource"]
                data = self._uploads[(src["bucket"], src["object"])].data
                fn.build_revision += 1
                python, source = await loop.run_in_executor(
                    self._executor, self._build, fn.id, fn.build_revision, data)
                if fn.deleted:
                    return
                fn.python, fn.source_dir = python, source
            op.status_detail = "Deploying function"
            if fn.server is None:
                await self._listen_function(fn)
            fn.revision += 1
            s = fn.service_config
            s["uri"] = fn.uri
            s["service"] = f"{self.parent}/services/{fn.id}"
            s["revision"] = f"{fn.id}-{fn.revision:05d}-{uuid.uuid4().hex[:3]}"
            s.setdefault("maxInstanceCount", 100)
            s.setdefault("maxInstanceRequestConcurrency", 1)
            s.setdefault("availableCpu", "0.1666" if parse_memory_mb(s["availableMemory"]) <= 256
                         else "1")
            s.setdefault("ingressSettings", "ALLOW_ALL")
            s.setdefault("allTrafficOnLatestRevision", True)
            s.setdefault("serviceAccountEmail", self.auth.client_email)
            fn.build_config.setdefault("serviceAccount",
                                       f"projects/{self.project}/serviceAccounts/"
                                       f"{self.auth.client_email}")
            fn.state, fn.state_messages = "ACTIVE", []
            self.retire_stale(fn)
            op.response = {"@type": FUNCTION_TYPE, **fn.describe()}
        except BuildError as e:
            fn.state = "FAILED"
            fn.state_messages = [{"severity": "ERROR", "type": "BuildFailed",
                                  "message": str(e)}]
            op.error = GoogleError("INVALID_ARGUMENT", str(e)).rpc_status()
        except Exception as e:
            logger.exception("deploying %s failed", fn.id)
            fn.state = "FAILED"
            op.error = GoogleError("INTERNAL", f"{type(e).__name__}: {e}").rpc_status()
        finally:
            op.done, op.end_time, op.status_detail = True, now_rfc3339(), ""
            if fn.busy_operation == op.name:
                fn.busy_operation = None

    def _build(self, function_id: str, build_revision: int, data: bytes) -> tuple[Path, Path]:
        base = self.workdir / "functions" / function_id / str(build_revision)
        base.mkdir(parents=True)
        (base / "source.zip").write_bytes(data)
        source = extract_source(base / "source.zip", base / "source")
        return build_environment(source, self.build_cache), source

    async def _listen_function(self, fn: Function) -> None:
        socks = bind_sockets(0, self.host, family=socket.AF_INET)
        fn.port = socks[0].getsockname()[1]
        fn.server = HTTPServer(function_application(self, fn), max_body_size=32 * 1024 * 1024)
        fn.server.add_sockets(socks)
        fn.uri = self.local_url(fn.port)

    def delete_function(self, fn: Function) -> Operation:
        if fn.busy_operation is not None and self._operations[fn.busy_operation].verb == "delete":
            raise GoogleError("ABORTED", f"Function {fn.name} is being deleted")
        op = self._new_operation("delete", fn.name)
        fn.state, fn.deleted = "DELETING", True
        fn.busy_operation = op.name
        self._functions.pop(fn.id, None)
        if fn.server is not None:
            fn.server.stop()
            fn.server = None
        for inst in list(fn.instances):
            self.stop_instance(inst, "the function was deleted")
        self._spawn_task(self._finish_delete(fn, op))
        return op

    async def _finish_delete(self, fn: Function, op: Operation) -> None:
        """The operation is done once every instance's process is gone."""
        deadline = time.monotonic() + 30
        while fn.instances and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        op.done, op.end_time = True, now_rfc3339()
        op.response = {"@type": EMPTY_TYPE}

    def _spawn_task(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
