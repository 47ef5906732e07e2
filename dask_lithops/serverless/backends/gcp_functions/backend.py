"""Google Cloud Run functions backend (the Cloud Functions v2 API).

Config keys are Lithops' ``gcp_functions`` (and ``gcp``) keys: ``region``,
``runtime``, ``runtime_memory``, ``runtime_timeout``, ``max_workers``,
``invoke_pool_threads``; ``gcp.project_name``, ``gcp.region``,
``gcp.service_account``, ``gcp.credentials_path``; plus ``runtime_cpu``,
``env_vars``, ``labels``, ``vpc_connector``, ``vpc_egress``, ``ingress`` and
``endpoint_url`` (another v2 API, e.g. the offline emulator).

Deploying is ``generateUploadUrl``, a PUT of the source zip, then ``create``
(or ``patch``) of the function with its ``buildConfig`` and ``serviceConfig``,
waiting on the long-running operation.  A worker is one authenticated HTTPS
request to the function's URL (an ID token for that audience), held open for
the worker's lifetime (:class:`HeldRequest`).

The API calls are plain REST through google-auth's ``AuthorizedSession``
(requests): the generated client (google-cloud-functions) would add grpcio,
protobuf and google-api-core for the seven calls made here.  Worker requests
run on the cluster's event loop (:mod:`.transport`: asyncio streams and h11, one
coroutine per worker instead of a thread; a cancelled request closes its
connection).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import threading
import time
import uuid
from typing import Any

from dask_lithops import config as _config
from dask_lithops.serverless.backends.base import (
    FUNCTION_PREFIX,
    BackendError,
    FaaSBackend,
    FunctionError,
    Invocation,
    RuntimeInfo,
    ThrottledError,
    sanitize_runtime_name,
)
from dask_lithops.serverless.backends.gcp_functions.handler import REQUEST_ID_HEADER
from dask_lithops.serverless.backends.gcp_functions.packaging import ENTRY_POINT

logger = logging.getLogger(__name__)

API = "https://cloudfunctions.googleapis.com"
SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)
_GCP_KEYS = ("project_name", "service_account", "credentials_path")
_RETRY_STATUS = (429, 503)  # no instance available (the request never reached one)
#: Cloud Run functions' default vCPUs by memory (MiB): the smallest tier >= the memory.
DEFAULT_CPU = ((128, 0.083), (256, 0.167), (512, 0.333), (1024, 0.583), (2048, 1.0),
               (4096, 2.0), (8192, 2.0), (16384, 4.0), (32768, 8.0))
#: Cloud Run's least vCPUs for memory above a size (MiB).
MIN_CPU = ((24576, 8.0), (16384, 6.0), (8192, 4.0), (4096, 2.0))


def default_cpu(memory_mb: int) -> float:
    for size, cpu in DEFAULT_CPU:
        if memory_mb <= size:
            return cpu
    return DEFAULT_CPU[-1][1]


def parse_memory(quantity: str | None) -> int | None:
    """MiB of a Kubernetes quantity as the API reports ``availableMemory`` (``1024Mi``, ``1G``)."""
    if not quantity:
        return None
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKMGT]i?)?\s*", str(quantity))
    if not m:
        return None
    factor = {None: 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10,
              "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[m.group(2)]
    return round(float(m.group(1)) * factor / 2**20)


def _label(value: str) -> str:
    """A valid label key/value: lowercase letters, digits, ``_`` and ``-``, at most 63."""
    return re.sub(r"[^a-z0-9_-]", "-", str(value).lower())[:63]


class GCPFunctionsBackend(FaaSBackend):
    name = "gcp_functions"
    account_section = "gcp"
    account_keys = _GCP_KEYS
    config_sections = ("gcp_functions", "gcp")
    worker_name_prefix = "gcf"
    max_event_payload = 32 * 1024 * 1024  # Cloud Run's HTTP/1 request size limit
    memory_range = (128, 32768)
    max_timeout = 3600  # HTTP functions
    # Cloud Run, Tier 1 regions, request-based billing (https://cloud.google.com/run/pricing)
    price_per_vcpu_second = 0.000024
    price_per_gb_second = 0.0000025  # per GiB-second
    price_per_request = 0.40 / 1_000_000
    network_hint = ("the function's Serverless VPC Access connector "
                    "(lithops.gcp_functions.vpc_connector, vpc_egress = ALL_TRAFFIC for a route "
                    "to the scheduler's host)")

    def __init__(self, config: dict[str, Any], *, platform: bool = True):
        super().__init__(config, platform=platform)
        self.endpoint_url = (config.get("endpoint_url") or API).rstrip("/")
        self.validate()
        self.project = config.get("project_name") or ""
        self.region = config.get("region") or "us-central1"
        self.parent = f"projects/{self.project}/locations/{self.region}"
        self._lock = threading.RLock()
        self._session = None
        self._credentials = None
        self._id_tokens: dict[str, Any] = {}  # audience -> IDToken credentials
        self._urls: dict[str, str] = {}  # function name -> its URL
        self._http = None  # the worker requests' transport (transport.py)
        self._held: set[HeldRequest] = set()

    # ------------------------------------------------------------------ config

    @classmethod
    def key(cls, option: str) -> str:
        section = "gcp" if option in _GCP_KEYS else cls.name
        return f"lithops.{section}.{option}"

    def validate(self) -> None:
        # each key's range is the schema's (checked when the config is resolved);
        # here only the rules across keys
        c = self.config
        mem, cpu = c.get("runtime_memory"), c.get("runtime_cpu")
        if cpu is not None:
            for size, least in MIN_CPU:
                if mem > size and cpu < least:
                    raise _config.ConfigError(
                        f"lithops.gcp_functions.runtime_cpu = {cpu!r} is invalid with "
                        f"runtime_memory = {mem}: Cloud Run needs at least {least:g} vCPUs "
                        f"above {size} MiB; allowed: runtime_cpu >= {least:g} or null")
        path = c.get("credentials_path")
        if path and not os.path.isfile(os.path.expanduser(path)):
            raise _config.ConfigError(
                f"lithops.gcp.credentials_path = {path!r} is not a file; allowed: the path of a "
                "service-account key (JSON), or null for Application Default Credentials")
        if not c.get("project_name"):
            c["project_name"] = self._credentials_project()
        if not self.platform:
            return
        if not c.get("project_name"):
            raise _config.ConfigError(
                "lithops.gcp.project_name is required for Cloud Run functions: the id of your "
                "Google Cloud project (or set GOOGLE_CLOUD_PROJECT, or use a credentials file "
                "that names it)")
        if not c.get("region") and not c.get("endpoint_url"):
            raise _config.ConfigError(
                "lithops.gcp_functions.region (or lithops.gcp.region) is required for Cloud Run "
                "functions, e.g. 'us-central1'")

    def _credentials_project(self) -> str | None:
        path = self.config.get("credentials_path") or os.environ.get(
            "GOOGLE_APPLICATION_CREDENTIALS")
        if path and os.path.isfile(os.path.expanduser(path)):
            try:
                with open(os.path.expanduser(path)) as f:
                    project = json.load(f).get("project_id")
                if project:
                    return project
            except (OSError, ValueError):
                pass
        return os.environ.get("GOOGLE_CLOUD_PROJECT") or os.environ.get("CLOUDSDK_CORE_PROJECT")

    @property
    def vcpus(self) -> float:
        cpu = self.config.get("runtime_cpu")
        return float(cpu) if cpu is not None else default_cpu(self.memory)

    # ------------------------------------------------------------------ names

    def get_runtime_key(self, runtime_name: str, memory: int, version: str) -> str:
        # function ids: lowercase letters, digits and hyphens, at most 63
        return f"{FUNCTION_PREFIX}-{sanitize_runtime_name(runtime_name)}-{version}-{memory}mb"

    @staticmethod
    def parse_runtime_key(function_name: str) -> tuple[str, str, int] | None:
        function_name = function_name.rsplit("/", 1)[-1]
        m = re.match(rf"^{FUNCTION_PREFIX}-(.+)-([0-9a-f]{{10}})-([0-9]+)mb$", function_name)
        if not m:
            return None
        return m.group(1), m.group(2), int(m.group(3))

    # ------------------------------------------------------------------ credentials

    def _load_credentials(self):
        if self._credentials is None:
            with self._lock:
                if self._credentials is None:
                    path = self.config.get("credentials_path")
                    if path:
                        from google.oauth2 import service_account

                        self._credentials = service_account.Credentials.from_service_account_file(
                            os.path.expanduser(path), scopes=SCOPES)
                    else:
                        import google.auth
                        from google.auth.exceptions import DefaultCredentialsError

                        try:
                            self._credentials, _ = google.auth.default(scopes=SCOPES)
                        except DefaultCredentialsError as e:
                            raise BackendError(
                                f"no Google credentials: {e}. Set lithops.gcp.credentials_path "
                                "to a service-account key, or run `gcloud auth "
                                "application-default login`") from e
        return self._credentials

    @property
    def session(self):
        """google-auth's AuthorizedSession (access tokens for the API), made once."""
        if self._session is None:
            with self._lock:
                if self._session is None:
                    from google.auth.transport.requests import AuthorizedSession

                    self._session = AuthorizedSession(self._load_credentials())
        return self._session

    def _id_token_credentials(self, audience: str):
        creds = self._id_tokens.get(audience)
        if creds is None:
            import google.auth.transport.requests

            path = self.config.get("credentials_path")
            if path:
                from google.oauth2 import service_account

                creds = service_account.IDTokenCredentials.from_service_account_file(
                    os.path.expanduser(path), target_audience=audience)
            else:
                import google.oauth2.id_token
                from google.auth.exceptions import DefaultCredentialsError

                try:
                    creds = google.oauth2.id_token.fetch_id_token_credentials(
                        audience, request=google.auth.transport.requests.Request())
                except DefaultCredentialsError as e:
                    raise BackendError(
                        f"cannot get an ID token for {audience}: {e}. Set "
                        "lithops.gcp.credentials_path to a service-account key") from e
            self._id_tokens[audience] = creds
        return creds

    def id_token(self, audience: str) -> str:
        """A valid ID token for ``audience`` (refreshed when it is about to expire; blocking)."""
        import google.auth.transport.requests

        with self._lock:
            creds = self._id_token_credentials(audience)
            if not creds.valid:
                try:
                    creds.refresh(google.auth.transport.requests.Request())
                except Exception as e:
                    raise BackendError(f"cannot get an ID token for {audience}: {e}") from e
            return creds.token

    def _cached_id_token(self, audience: str) -> str | None:
        creds = self._id_tokens.get(audience)
        return creds.token if creds is not None and creds.valid else None

    # ------------------------------------------------------------------ API

    def _api(self, method: str, path: str, what: str, *, ok404: bool = False, **kwargs):
        import requests

        url = f"{self.endpoint_url}/v2/{path}"
        try:
            r = self.session.request(method, url, timeout=kwargs.pop("timeout", 60), **kwargs)
        except (requests.RequestException, OSError) as e:
            raise BackendError(f"Cloud Functions {what} failed: {e}") from e
        if r.status_code == 404 and ok404:
            return None
        if r.status_code >= 400:
            raise BackendError(f"Cloud Functions {what} failed: {_google_error(r)}")
        return r.json() if r.content else {}

    def _wait_operation(self, operation: dict, what: str, timeout: float = 1800) -> dict:
        deadline = time.monotonic() + timeout
        delay = 0.2
        while not operation.get("done"):
            if time.monotonic() > deadline:
                raise BackendError(f"Cloud Functions {what}: operation {operation.get('name')} "
                                   f"not done after {timeout:.0f}s")
            time.sleep(delay)
            delay = min(2.0, delay * 1.5)
            operation = self._api("GET", operation["name"], f"{what} (operation)")
        if operation.get("error"):
            err = operation["error"]
            raise BackendError(f"Cloud Functions {what} failed: {err.get('message') or err}")
        return operation.get("response") or {}

    def _function_path(self, function_name: str) -> str:
        return f"{self.parent}/functions/{function_name}"

    # ------------------------------------------------------------------ runtimes

    def build_runtime(self, runtime_name: str | None = None, *, force: bool = False, log=None,
                      package_sync: bool | None = None, progress=None):
        # the platform pip-installs the pinned requirements.txt (progress: one step)
        from dask_lithops.serverless.backends.gcp_functions.packaging import build_source_package

        return build_source_package(runtime_name or self.runtime_name,
                                    extra_packages=self.config.get("extra_packages") or [],
                                    requirements_file=self.config.get("requirements_file"),
                                    force=force, log=log, package_sync=package_sync)

    def function_body(self, package, memory: int, timeout: int, source: dict) -> dict:
        """The Function resource of ``package`` at ``memory`` MiB and ``timeout`` s."""
        env = {str(k): str(v) for k, v in (self.config.get("env_vars") or {}).items()}
        env.update(DASK_LITHOPS_RUNTIME=f"{package.name}:{package.version}",
                   DASK_LITHOPS_TIMEOUT=str(int(timeout)), DASK_LITHOPS_MEMORY_MB=str(int(memory)))
        labels = {_label(k): _label(v) for k, v in (self.config.get("labels") or {}).items()}
        labels.update({FUNCTION_PREFIX: "true", "dask-lithops-runtime": _label(package.name),
                       "dask-lithops-version": package.version})
        cpu = self.config.get("runtime_cpu")
        service: dict[str, Any] = {
            "availableMemory": f"{int(memory)}Mi",
            "availableCpu": f"{cpu if cpu is not None else default_cpu(memory):g}",
            "timeoutSeconds": int(timeout),
            "maxInstanceCount": int(self.config["max_workers"]),
            "maxInstanceRequestConcurrency": 1,  # one worker per instance
            "environmentVariables": env,
            "ingressSettings": self.config.get("ingress") or "ALLOW_ALL",
            "allTrafficOnLatestRevision": True,
        }
        if self.config.get("service_account"):
            service["serviceAccountEmail"] = self.config["service_account"]
        if self.config.get("vpc_connector"):
            service["vpcConnector"] = self.config["vpc_connector"]
            if self.config.get("vpc_egress"):
                service["vpcConnectorEgressSettings"] = self.config["vpc_egress"]
        name = self.get_runtime_key(package.name, memory, package.version)
        return {
            "name": self._function_path(name),
            "description": f"dask-lithops runtime {package.name} {package.version}",
            "environment": "GEN_2",
            "labels": labels,
            "buildConfig": {"runtime": package.gcp_runtime, "entryPoint": ENTRY_POINT,
                            "source": {"storageSource": source}},
            "serviceConfig": service,
        }

    def deploy_runtime(self, package, memory: int, timeout: int) -> RuntimeInfo:
        import requests

        name = self.get_runtime_key(package.name, memory, package.version)
        upload = self._api("POST", f"{self.parent}/functions:generateUploadUrl",
                           "generateUploadUrl", json={})
        with open(package.source_zip, "rb") as f:
            data = f.read()
        logger.info("deploying Cloud Run function %s (%d KB source, %s)", name, len(data) // 1024,
                    package.gcp_runtime)
        try:
            # a signed URL: no credentials may be attached
            r = requests.put(upload["uploadUrl"], data=data, timeout=300, headers={
                "Content-Type": "application/zip",
                "x-goog-content-length-range": "0,104857600"})
        except requests.RequestException as e:
            raise BackendError(f"uploading the source of {name} failed: {e}") from e
        if r.status_code >= 400:
            raise BackendError(f"uploading the source of {name} failed: HTTP {r.status_code}: "
                               f"{r.text[:500]}")
        body = self.function_body(package, memory, timeout, upload["storageSource"])
        create = self._create_or_patch(name, body)
        self._wait_operation(create, f"deploying {name}")
        info = self.get_runtime_info(name)
        if info is None or info.state != "ACTIVE":
            raise BackendError(f"Cloud Run function {name} is not active after deploying: "
                               f"state {info.state if info else 'missing'}"
                               + (f" ({info.extra.get('state_messages')})" if info else ""))
        return info

    def _create_or_patch(self, name: str, body: dict) -> dict:
        try:
            return self._api("POST", f"{self.parent}/functions", f"create {name}",
                             params={"functionId": name}, json=body)
        except BackendError as e:
            if "ALREADY_EXISTS" not in str(e) and "409" not in str(e):
                raise
        # a function of that name exists (e.g. a failed deployment): update it in place
        return self._api("PATCH", self._function_path(name), f"patch {name}", json=body)

    def get_runtime_info(self, function_name: str) -> RuntimeInfo | None:
        fn = self._api("GET", self._function_path(function_name), f"get {function_name}",
                       ok404=True)
        return self._info(fn) if fn else None

    def _info(self, fn: dict) -> RuntimeInfo | None:
        short = fn.get("name", "").rsplit("/", 1)[-1]
        parsed = self.parse_runtime_key(short)
        if parsed is None:
            return None
        runtime, version, memory = parsed
        service = fn.get("serviceConfig") or {}
        uri = service.get("uri") or fn.get("url")
        if uri:
            self._urls[short] = uri
        return RuntimeInfo(function_name=short, runtime_name=runtime, version=version,
                           memory=parse_memory(service.get("availableMemory")) or memory,
                           timeout=service.get("timeoutSeconds"), architecture="x86_64",
                           state=fn.get("state"),
                           extra={"uri": uri, "cpu": service.get("availableCpu"),
                                  "max_instances": service.get("maxInstanceCount"),
                                  "state_messages": fn.get("stateMessages")})

    def list_runtimes(self, runtime_name: str | None = None) -> list[RuntimeInfo]:
        out, token = [], None
        while True:
            params = {"pageSize": 1000, **({"pageToken": token} if token else {})}
            page = self._api("GET", f"{self.parent}/functions", "list", params=params)
            for fn in page.get("functions", []):
                info = self._info(fn)
                if info and (runtime_name is None or info.runtime_name == runtime_name):
                    out.append(info)
            token = page.get("nextPageToken")
            if not token:
                return sorted(out, key=lambda i: i.function_name)

    def delete_runtime(self, function_name: str) -> None:
        if self.parse_runtime_key(function_name) is None:
            raise BackendError(f"{function_name!r} is not a dask-lithops function")
        op = self._api("DELETE", self._function_path(function_name), f"delete {function_name}",
                       ok404=True)
        if op:
            self._wait_operation(op, f"deleting {function_name}")
        self._urls.pop(function_name, None)

    def clean(self) -> list[str]:
        deleted = []
        for info in self.list_runtimes():
            self.delete_runtime(info.function_name)
            deleted.append(info.function_name)
        return deleted

    # ------------------------------------------------------------------ invoke

    def function_url(self, function_name: str) -> str:
        url = self._urls.get(function_name)
        if url is None:
            info = self.get_runtime_info(function_name)
            url = info.extra.get("uri") if info else None
            if not url:
                raise BackendError(f"Cloud Run function {function_name} has no URL (state "
                                   f"{info.state if info else 'missing'})")
        return url

    def prepare_invoke(self, function_name: str | None = None) -> None:
        if function_name:
            self.id_token(self.function_url(function_name))
        http = self._http_client()
        if function_name and self.function_url(function_name).startswith("https:") and \
                hasattr(http, "_ssl_context"):
            http._ssl_context()  # ~0.1 s: not in the first launch

    def _http_client(self):
        """The worker requests' transport (:mod:`.transport`; bound to a loop on first use)."""
        if self._http is None:
            from dask_lithops.serverless.backends.gcp_functions.transport import make_transport

            with self._lock:
                if self._http is None:
                    self._http = make_transport()
        return self._http

    def _retry_delay(self, attempt: int) -> float:
        return min(5.0, 0.1 * 2 ** attempt) * (0.5 + random.random())

    def _still_throttled(self, function_name: str, status: int, retries: int,
                         detail: str) -> str:
        return (f"Cloud Run function {function_name} still refused the request (HTTP {status}: "
                f"no instance available) after {retries} retries: {detail[:300]}. Raise the "
                f"function's max instances ({self.key('max_workers')}) or the project's quota "
                "for Cloud Run, or run fewer workers")

    def invoke_sync(self, function_name: str, event: dict) -> dict:
        import requests

        url = self.function_url(function_name)
        retries = int(self.config.get("invoke_retries", 8))
        for attempt in range(retries + 1):
            headers = {"Authorization": f"Bearer {self.id_token(url)}",
                       REQUEST_ID_HEADER: uuid.uuid4().hex}
            try:
                r = requests.post(url, json=event, headers=headers, timeout=self.timeout + 30)
            except requests.RequestException as e:
                raise BackendError(f"request to Cloud Run function {function_name} failed: "
                                   f"{e}") from e
            if r.status_code in _RETRY_STATUS and attempt < retries:
                time.sleep(self._retry_delay(attempt))
                continue
            if r.status_code in _RETRY_STATUS:
                raise ThrottledError(self._still_throttled(function_name, r.status_code, retries,
                                                           r.text))
            if r.status_code != 200:
                raise FunctionError(f"function {function_name} answered HTTP {r.status_code}: "
                                    f"{r.text[:1000]}")
            try:
                return r.json()
            except ValueError:
                raise FunctionError(f"function {function_name} answered no JSON: "
                                    f"{r.text[:1000]}") from None
        raise AssertionError("unreachable")

    async def start_invocation(self, function_name: str, event: bytes, *, name: str,
                               executor, on_accepted, on_end) -> Invocation:
        url = self.function_url(function_name)  # cached by prepare_invoke
        if self._cached_id_token(url) is None:
            await asyncio.get_running_loop().run_in_executor(executor, self.id_token, url)
        self._http_client()
        held = HeldRequest(self, function_name, url, event, name=name, executor=executor,
                           on_accepted=on_accepted, on_end=on_end)
        self._held.add(held)
        held.start()
        return held

    async def aclose(self) -> None:
        held = list(self._held)
        for h in held:
            h.cancel()
        if held:
            await asyncio.gather(*(h.wait() for h in held), return_exceptions=True)
        if self._http is not None:
            http, self._http = self._http, None
            await http.aclose()

    def default_contact_address(self) -> str | None:
        """The emulator tells where its sandboxes reach this host (``/_emulator/status``)."""
        if self.endpoint_url == API:
            return None
        import urllib.request

        try:
            with urllib.request.urlopen(self.endpoint_url + "/_emulator/status", timeout=5) as r:
                return json.loads(r.read()).get("host_address")
        except Exception:
            return None


class HeldRequest(Invocation):
    """One worker: a POST to the function's URL whose response comes when the worker ends.

    Refusals for want of an instance (429, 503) are retried with backoff like
    Lambda's throttling, while the worker has not joined.  ``end()`` waits for
    the response, then cuts the request off (closing its connection).
    """

    def __init__(self, backend: GCPFunctionsBackend, function_name: str, url: str,
                 event: bytes, *, name: str, executor, on_accepted, on_end):
        super().__init__(request_id=uuid.uuid4().hex)
        self.backend = backend
        self.function_name = function_name
        self.url = url
        self.event = event
        self.name = name
        self.executor = executor
        self.on_accepted = on_accepted
        self.on_end = on_end
        self.attempts = 0
        self.report: dict | None = None
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.ensure_future(self._run())

    def done(self) -> bool:
        return self.task is None or self.task.done()

    def cancel(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()

    async def wait(self) -> None:
        if self.task is not None:
            try:
                await self.task
            except asyncio.CancelledError:
                pass

    async def end(self, timeout: float) -> None:
        if self.task is None or self.task.done():
            return
        if timeout > 0:
            await asyncio.wait({self.task}, timeout=timeout)
        self.cancel()
        await self.wait()

    def _sent(self) -> None:
        if self.accepted is None:
            self.accepted = time.time()
            self.on_accepted(self.name, self.request_id, self.accepted)

    async def _run(self) -> None:
        from dask_lithops.serverless.backends.gcp_functions.transport import TransportError

        backend = self.backend
        retries = int(backend.config.get("invoke_retries", 8))
        report: dict = {"reason": "cancelled"}
        try:
            while True:
                self.attempts += 1
                token = backend._cached_id_token(self.url)
                if token is None:  # expired since the launch (a retry, much later)
                    token = await asyncio.get_running_loop().run_in_executor(
                        self.executor, backend.id_token, self.url)
                headers = {"Authorization": f"Bearer {token}",
                           "Content-Type": "application/json", REQUEST_ID_HEADER: self.request_id}
                try:
                    status, body = await backend._http_client().post(
                        self.url, self.event, headers, read_timeout=backend.timeout + 30.0,
                        on_sent=self._sent)
                except TransportError as e:
                    report = {"reason": "error", "error": f"request to Cloud Run function "
                              f"{self.function_name} failed: {e}"}
                    return
                text = body.decode(errors="replace")
                if status in _RETRY_STATUS and not self.joined:
                    if self.attempts <= retries:
                        await asyncio.sleep(backend._retry_delay(self.attempts - 1))
                        continue
                    report = {"reason": "throttled", "error": backend._still_throttled(
                        self.function_name, status, retries, text)}
                    return
                if status == 200:
                    try:
                        report = json.loads(body)
                    except ValueError:
                        report = {"reason": "error", "error": f"no JSON: {text[:500]}"}
                    if not isinstance(report, dict):
                        report = {"reason": "error", "error": f"unexpected answer {report!r}"}
                    return
                report = {"reason": "error", "error": f"Cloud Run function {self.function_name} "
                          f"answered HTTP {status}: {text[:500]}"}
                return
        except asyncio.CancelledError:
            report = {"reason": "cut-off"}
            raise
        except Exception as e:  # never lose the end of an invocation
            report = {"reason": "error", "error": f"{type(e).__name__}: {e}"}
        finally:
            self.report = report
            report.setdefault("request_id", self.request_id)
            self.backend._held.discard(self)
            try:
                self.on_end(self.name, report)
            except Exception:
                logger.exception("handling the end of worker %s failed", self.name)


def _google_error(r) -> str:
    """``STATUS (code): message`` of a Google API error response."""
    try:
        err = r.json().get("error") or {}
        return f"{err.get('status') or r.status_code} ({err.get('code') or r.status_code}): " \
               f"{err.get('message') or r.text[:500]}"
    except (ValueError, AttributeError):
        return f"HTTP {r.status_code}: {r.text[:500]}"
