"""AWS Lambda backend (boto3); also talks to the offline emulator through ``endpoint_url``.

Config keys are Lithops' ``aws_lambda`` (and ``aws``) keys: ``region``,
``execution_role``, ``runtime_memory``, ``runtime_timeout``,
``ephemeral_storage``, ``architecture``, ``vpc``, ``env_vars``, ``user_tags``,
``max_workers``, ``invoke_pool_threads`` plus ``endpoint_url``.

A worker is one asynchronous (``Event``) invocation; the runtime is a zip (and
layers) built by :mod:`dask_lithops.runtime.builder`, its entry point
:mod:`dask_lithops.serverless.backends.aws_lambda.handler`.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import threading
import time
from pathlib import Path
from typing import Any

from dask_lithops import config as _config
from dask_lithops.serverless.backends.aws_lambda.invoker import EventInvoker
from dask_lithops.serverless.backends.base import (
    FUNCTION_PREFIX,
    BackendError,
    FaaSBackend,
    FunctionError,
    RuntimeInfo,
    ThrottledError,
)

logger = logging.getLogger(__name__)

EMULATOR_ROLE = "arn:aws:iam::123456789012:role/dask-lithops-emulator"
_THROTTLE_CODES = {"TooManyRequestsException", "ThrottlingException", "EC2ThrottledException",
                   "SlowDown", "RequestLimitExceeded"}
_CREDENTIALS = ("access_key_id", "secret_access_key", "session_token")
HANDLER = "dask_lithops.serverless.backends.aws_lambda.handler.handler"
MB_PER_VCPU = 1769  # Lambda: one vCPU per 1769 MB, up to 6 at 10240 MB


def resolve_config(**overrides) -> dict:
    """The ``aws_lambda`` section merged with ``aws`` (credentials, region), validated."""
    return AWSLambdaBackend.resolve_config(**overrides)


class AWSLambdaBackend(FaaSBackend):
    name = "aws_lambda"
    account_section = "aws"
    account_keys = _CREDENTIALS
    config_sections = ("aws_lambda", "aws")
    worker_name_prefix = "lambda"
    max_event_payload = 1024 * 1024  # Event invocations (raised from 256 KB in 2025)
    memory_range = (128, 10240)
    max_timeout = 900
    # us-east-1 public prices
    PRICES = {"x86_64": 0.0000166667, "arm64": 0.0000133334}
    price_per_request = 0.20 / 1_000_000
    auto_scheduler_placement = "aws_ec2"
    network_hint = ("the functions' VPC settings (lithops.aws_lambda.vpc: subnets and security "
                    "groups with a route to the scheduler's host)")

    def __init__(self, config: dict[str, Any], *, platform: bool = True):
        super().__init__(config, platform=platform)
        self.validate()
        self.endpoint_url = config.get("endpoint_url")
        self.region = config["region"] or "us-east-1"
        self.role = config.get("execution_role") or EMULATOR_ROLE
        self.price_per_gb_second = self.PRICES[config["architecture"]]
        self._client = None
        self._sync_client = None
        self._session = None
        self._event_invoker: EventInvoker | None = None
        self._event_invoker_checked = False
        self._lock = threading.RLock()  # event_invoker makes the client under it

    # ------------------------------------------------------------------ config

    @property
    def vcpus(self) -> float:
        return min(6.0, self.memory / MB_PER_VCPU)

    def threads_for_memory(self, memory_mb: int) -> int:
        return max(1, min(6, round(memory_mb / MB_PER_VCPU)))

    def validate(self) -> None:
        # each key's range is the schema's (checked when the config is resolved);
        # here only the rules across keys
        c = self.config
        if self.platform and not c.get("endpoint_url"):
            # Real AWS: a region and a role are needed.  Against an emulator
            # (endpoint_url) both default (us-east-1, a placeholder role).
            if not c.get("region"):
                raise _config.ConfigError(
                    "lithops.aws_lambda.region (or lithops.aws.region) is required for AWS "
                    "Lambda, e.g. 'us-east-1'")
            if not c.get("execution_role"):
                raise _config.ConfigError(
                    "lithops.aws_lambda.execution_role is required for AWS Lambda: the ARN of "
                    "an IAM role the functions run as (e.g. "
                    "arn:aws:iam::<account>:role/dask-lithops)")

    # ------------------------------------------------------------------ clients

    @property
    def session(self):
        """One boto3 session (credentials chain) for every client of this backend."""
        if self._session is None:
            import boto3

            kwargs: dict[str, Any] = {"region_name": self.region}
            if self.config.get("access_key_id"):
                kwargs.update(aws_access_key_id=self.config["access_key_id"],
                              aws_secret_access_key=self.config.get("secret_access_key"),
                              aws_session_token=self.config.get("session_token"))
            session = boto3.session.Session(**kwargs)
            if self.endpoint_url and session.get_credentials() is None:
                session = boto3.session.Session(aws_access_key_id="testing",
                                                aws_secret_access_key="testing", **kwargs)
            self._session = session
        return self._session

    def _make_client(self, read_timeout: float):
        from botocore.config import Config

        kwargs: dict[str, Any] = {}
        if self.endpoint_url:
            kwargs["endpoint_url"] = self.endpoint_url
        pool = max(10, int(self.config.get("invoke_pool_threads") or 10))
        cfg = Config(max_pool_connections=pool, read_timeout=read_timeout, connect_timeout=10,
                     retries={"total_max_attempts": 1}, tcp_keepalive=True)
        return self.session.client("lambda", config=cfg, **kwargs)

    @property
    def client(self):
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._make_client(60)
        return self._client

    @property
    def sync_client(self):
        if self._sync_client is None:
            with self._lock:
                if self._sync_client is None:
                    self._sync_client = self._make_client(self.max_timeout + 10)
        return self._sync_client

    def _call(self, what: str, fn, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        retries = int(self.config.get("invoke_retries", 8))
        for attempt in range(retries + 1):
            try:
                return fn(**kwargs)
            except ClientError as e:
                code = e.response.get("Error", {}).get("Code", "")
                if code in _THROTTLE_CODES and attempt < retries:
                    self._throttled(what, code, attempt)
                    continue
                if code in _THROTTLE_CODES:
                    raise self._still_throttled(what, code, retries, e) from e
                raise BackendError(f"Lambda {what} failed: {e}") from e
            except BotoCoreError as e:
                raise BackendError(f"Lambda {what} failed: {e}") from e

    @staticmethod
    def _throttled(what: str, code: str, attempt: int) -> None:
        delay = min(5.0, 0.1 * 2 ** attempt) * (0.5 + random.random())
        logger.debug("%s throttled (%s); retrying in %.2fs", what, code, delay)
        time.sleep(delay)

    @staticmethod
    def _still_throttled(what: str, code: str, retries: int, detail) -> ThrottledError:
        return ThrottledError(
            f"Lambda {what} still throttled ({code}) after {retries} retries: {detail}. "
            "Raise the function's or account's concurrency limit, or lower max_workers")

    # ------------------------------------------------------------------ runtimes

    def build_runtime(self, runtime_name: str | None = None, *, force: bool = False, log=None,
                      architecture: str | None = None, package_sync: bool | None = None,
                      progress=None):
        """The function zip (+ layers) of the runtime: :mod:`dask_lithops.runtime.builder`."""
        from dask_lithops.runtime.builder import build_runtime

        return build_runtime(runtime_name or self.runtime_name,
                             extra_packages=self.config.get("extra_packages") or [],
                             requirements_file=self.config.get("requirements_file"),
                             architecture=architecture or self.config["architecture"],
                             force=force, log=log, package_sync=package_sync,
                             progress=progress)

    def deploy_runtime(self, package, memory: int, timeout: int) -> RuntimeInfo:
        from botocore.exceptions import ClientError

        name = self.get_runtime_key(package.name, memory, package.version)
        layers = [self._publish_layer(package, i, Path(p))
                  for i, p in enumerate(package.layer_zips)]
        env = {str(k): str(v) for k, v in (self.config.get("env_vars") or {}).items()}
        env["DASK_LITHOPS_RUNTIME"] = f"{package.name}:{package.version}"
        tags = {FUNCTION_PREFIX: "true", "dask-lithops-runtime": package.name,
                "dask-lithops-version": package.version,
                **{str(k): str(v) for k, v in (self.config.get("user_tags") or {}).items()}}
        args: dict[str, Any] = dict(
            FunctionName=name, Runtime=package.lambda_runtime, Role=self.role,
            Handler=HANDLER, Code={"ZipFile": Path(package.function_zip).read_bytes()},
            Description=f"dask-lithops runtime {package.name} {package.version}"[:256],
            Timeout=int(timeout), MemorySize=int(memory), Publish=False,
            Environment={"Variables": env}, Tags=tags,
            Architectures=[self.config["architecture"]],
            EphemeralStorage={"Size": int(self.config["ephemeral_storage"])},
        )
        if layers:
            args["Layers"] = layers
        vpc = self.config.get("vpc") or {}
        if vpc.get("subnets"):
            args["VpcConfig"] = {"SubnetIds": list(vpc["subnets"]),
                                 "SecurityGroupIds": list(vpc.get("security_groups") or [])}
        logger.info("deploying Lambda function %s (%d MB zip, %d layers)", name,
                    Path(package.function_zip).stat().st_size // 2**20, len(layers))
        try:
            self.client.create_function(**args)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") != "ResourceConflictException":
                raise BackendError(f"Lambda CreateFunction {name} failed: {e}") from e
        self._wait_active(name)
        try:  # a failed worker invocation must never be retried (it would duplicate a worker)
            self.client.put_function_event_invoke_config(
                FunctionName=name, MaximumRetryAttempts=0)
        except ClientError as e:
            logger.warning("could not disable event retries of %s: %s", name, e)
        info = self.get_runtime_info(name)
        assert info is not None
        return info

    def _publish_layer(self, package, index: int, path: Path) -> str:
        layer = f"{FUNCTION_PREFIX}-{package.version}-{index + 1}"
        import hashlib

        digest = base64.b64encode(hashlib.sha256(path.read_bytes()).digest()).decode()
        existing = self.client.list_layer_versions(LayerName=layer).get("LayerVersions", [])
        for lv in existing:
            if lv.get("Description", "").endswith(digest[:16]):
                return lv["LayerVersionArn"]
        out = self._call("PublishLayerVersion", self.client.publish_layer_version,
                         LayerName=layer, Content={"ZipFile": path.read_bytes()},
                         Description=f"dask-lithops {package.name} {digest[:16]}",
                         CompatibleRuntimes=[package.lambda_runtime],
                         CompatibleArchitectures=[package.architecture])
        return out["LayerVersionArn"]

    def _wait_active(self, name: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while True:
            cfg = self._call("GetFunctionConfiguration", self.client.get_function_configuration,
                             FunctionName=name)
            state, update = cfg.get("State"), cfg.get("LastUpdateStatus")
            if state == "Active" and update in (None, "Successful"):
                return
            if state == "Failed" or update == "Failed":
                raise BackendError(f"Lambda function {name} failed to deploy: "
                                   f"{cfg.get('StateReason') or cfg.get('LastUpdateStatusReason')}")
            if time.monotonic() > deadline:
                raise BackendError(f"Lambda function {name} not Active after {timeout:.0f}s "
                                   f"(State={state}, LastUpdateStatus={update})")
            time.sleep(0.2)

    def get_runtime_info(self, function_name: str) -> RuntimeInfo | None:
        from botocore.exceptions import ClientError

        try:
            cfg = self.client.get_function_configuration(FunctionName=function_name)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") == "ResourceNotFoundException":
                return None
            raise BackendError(f"Lambda GetFunctionConfiguration {function_name}: {e}") from e
        return self._info(cfg)

    def _info(self, cfg: dict) -> RuntimeInfo | None:
        parsed = self.parse_runtime_key(cfg["FunctionName"])
        if parsed is None:
            return None
        runtime, version, memory = parsed
        return RuntimeInfo(function_name=cfg["FunctionName"], runtime_name=runtime,
                           version=version, memory=cfg.get("MemorySize", memory),
                           timeout=cfg.get("Timeout"),
                           architecture=(cfg.get("Architectures") or [None])[0],
                           state=cfg.get("State"),
                           extra={"layers": [lyr["Arn"] for lyr in cfg.get("Layers", [])],
                                  "code_size": cfg.get("CodeSize")})

    def list_runtimes(self, runtime_name: str | None = None) -> list[RuntimeInfo]:
        out = []
        for page in self.client.get_paginator("list_functions").paginate():
            for cfg in page.get("Functions", []):
                info = self._info(cfg)
                if info and (runtime_name is None or info.runtime_name == runtime_name):
                    out.append(info)
        return sorted(out, key=lambda i: i.function_name)

    def delete_runtime(self, function_name: str) -> None:
        from botocore.exceptions import ClientError

        if self.parse_runtime_key(function_name) is None:
            raise BackendError(f"{function_name!r} is not a dask-lithops function")
        info = self.get_runtime_info(function_name)
        try:
            self.client.delete_function(FunctionName=function_name)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") != "ResourceNotFoundException":
                raise BackendError(f"Lambda DeleteFunction {function_name}: {e}") from e
        if info:
            self._delete_unused_layers(set(info.extra.get("layers", [])))

    def _delete_unused_layers(self, candidates: set[str] | None = None) -> list[str]:
        used = {arn for r in self.list_runtimes() for arn in r.extra.get("layers", [])}
        deleted = []
        for layer in self.client.list_layers().get("Layers", []):
            name = layer["LayerName"]
            if not name.startswith(FUNCTION_PREFIX + "-"):
                continue
            for lv in self.client.list_layer_versions(LayerName=name).get("LayerVersions", []):
                arn = lv["LayerVersionArn"]
                if arn in used or (candidates is not None and arn not in candidates):
                    continue
                self.client.delete_layer_version(LayerName=name, VersionNumber=lv["Version"])
                deleted.append(arn)
        return deleted

    def clean(self) -> list[str]:
        deleted = []
        for info in self.list_runtimes():
            self.client.delete_function(FunctionName=info.function_name)
            deleted.append(info.function_name)
        deleted += self._delete_unused_layers()
        return deleted

    # ------------------------------------------------------------------ invoke

    @property
    def event_invoker(self) -> EventInvoker | None:
        """The lean Event-invoke path (None: boto3's), made once (the invoke pool races)."""
        if not self._event_invoker_checked:
            with self._lock:
                if not self._event_invoker_checked:
                    if EventInvoker.usable():
                        self._event_invoker = EventInvoker(
                            self.client, self.session,
                            pool_size=max(10, int(self.config.get("invoke_pool_threads") or 10)))
                    self._event_invoker_checked = True
        return self._event_invoker

    def prepare_invoke(self, function_name: str | None = None) -> None:
        self.event_invoker  # noqa: B018

    def invoke(self, function_name: str, event: dict | bytes) -> str:
        body = event if isinstance(event, bytes) else \
            json.dumps(event, separators=(",", ":")).encode()
        invoker = self.event_invoker
        if invoker is not None:
            retries = int(self.config.get("invoke_retries", 8))
            for attempt in range(retries + 1):
                status, code, detail, request_id = invoker.invoke(function_name, body)
                if status == 202:
                    return request_id
                if code in _THROTTLE_CODES and attempt < retries:
                    self._throttled("Invoke", code, attempt)
                    continue
                if code in _THROTTLE_CODES:
                    raise self._still_throttled("Invoke", code, retries, detail)
                raise BackendError(f"Lambda Invoke (Event) of {function_name} failed: "
                                   f"{code or status}: {detail}")
        out = self._call("Invoke", self.client.invoke, FunctionName=function_name,
                         InvocationType="Event", Payload=body)
        # Read the (empty) body: an unread streaming body is closed with its connection
        # when it is garbage-collected, so every invoke would open a new connection.
        out["Payload"].read()
        status = out.get("StatusCode")
        if status != 202:
            raise BackendError(f"Lambda Invoke (Event) of {function_name} answered {status}, "
                               "not 202")
        return out.get("ResponseMetadata", {}).get("RequestId", "")

    def invoke_sync(self, function_name: str, event: dict) -> dict:
        out = self._call("Invoke", self.sync_client.invoke, FunctionName=function_name,
                         InvocationType="RequestResponse", Payload=json.dumps(event).encode())
        raw = out["Payload"].read()
        try:
            result = json.loads(raw or b"null")
        except ValueError:
            result = {"raw": raw.decode(errors="replace")}
        if out.get("FunctionError"):
            msg = result.get("errorMessage") if isinstance(result, dict) else result
            etype = result.get("errorType") if isinstance(result, dict) else ""
            raise FunctionError(f"function {function_name} failed: {etype}: {msg}")
        return result

    def default_contact_address(self) -> str | None:
        """The emulator tells where its sandboxes reach this host (``/_emulator/status``)."""
        if not self.endpoint_url:
            return None
        import urllib.request

        try:
            with urllib.request.urlopen(self.endpoint_url.rstrip("/") + "/_emulator/status",
                                        timeout=5) as r:
                return json.loads(r.read()).get("host_address")
        except Exception:
            return None
