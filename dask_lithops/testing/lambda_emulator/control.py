"""Lambda's control API behind the HTTP handlers: functions, code, configuration, layers.

A mixin of :class:`~.server.LambdaEmulator`; every method runs on the emulator's event loop.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import logging
import shutil
import uuid
import zipfile
from pathlib import Path

from .managed_runtime import PYTHON_RUNTIMES
from .model import (
    ACCOUNT_ID,
    ENV_VARS_LIMIT,
    FUNCTION_NAME_RE,
    HANDLER_RE,
    LAYER_NAME_RE,
    RESERVED_ENV_KEYS,
    Function,
    LambdaError,
    LayerVersion,
    conflict,
    invalid,
    not_found,
    now_iso,
)

logger = logging.getLogger("dask_lithops.lambda_emulator")


class ControlAPI:
    """Create, update, delete and describe functions and layers (the state the API shows)."""

    def arn(self, name: str) -> str:
        return f"arn:aws:lambda:{self.region}:{ACCOUNT_ID}:function:{name}"

    def resolve(self, raw: str, qualifier: str | None = None) -> Function:
        name, q = raw, qualifier
        parts = raw.split(":")
        if raw.startswith("arn:"):
            if len(parts) < 7 or parts[5] != "function":
                raise invalid(f"Invalid function ARN: {raw}")
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
            raise not_found(f"Function not found: {arn}")
        return fn

    def _validate_config(self, body: dict, fn: Function | None) -> dict:
        out = {}
        if "Runtime" in body or fn is None:
            rt = body.get("Runtime")
            if rt not in PYTHON_RUNTIMES:
                raise invalid(f"Value {rt!r} at 'runtime' failed to satisfy constraint: the "
                               f"emulator runs Lambda's managed Python runtimes only "
                               f"({', '.join(PYTHON_RUNTIMES)})")
            out["runtime"] = rt
        if "Handler" in body or fn is None:
            h = body.get("Handler")
            if not isinstance(h, str) or not HANDLER_RE.match(h) or len(h) > 128:
                raise invalid(f"Value {h!r} at 'handler' failed to satisfy constraint: Member "
                               f"must satisfy regular expression pattern: [^\\s]+")
            out["handler"] = h
        if "MemorySize" in body:
            m = body["MemorySize"]
            if not isinstance(m, int) or not 128 <= m <= 10240:
                raise invalid(f"'MemorySize' value failed to satisfy constraint: Member must "
                               f"have value between 128 and 10240 (got {m!r})")
            out["memory"] = m
        if "Timeout" in body:
            t = body["Timeout"]
            if not isinstance(t, int) or not 1 <= t <= 900:
                raise invalid(f"'Timeout' value failed to satisfy constraint: Member must have "
                               f"value between 1 and 900 (got {t!r})")
            out["timeout"] = t
        if "Role" in body or fn is None:
            role = body.get("Role")
            if not isinstance(role, str) or not role.startswith("arn:"):
                raise invalid(f"The role defined for the function is not a valid ARN: {role!r}")
            out["role"] = role
        if "Description" in body:
            out["description"] = str(body["Description"])
        if "Environment" in body:
            variables = (body["Environment"] or {}).get("Variables") or {}
            reserved = sorted(set(variables) & RESERVED_ENV_KEYS)
            if reserved:
                raise invalid(
                    "Lambda was unable to configure your environment variables because the "
                    "environment variables you have provided contains reserved keys that are "
                    "currently not supported for modification. Reserved keys used in this "
                    f"request: {', '.join(reserved)}")
            if len(json.dumps(variables)) > ENV_VARS_LIMIT:
                raise invalid(
                    "Lambda was unable to configure your environment variables because the "
                    "environment variables you have provided exceeded the 4KB limit.")
            out["variables"] = {str(k): str(v) for k, v in variables.items()}
        if "Layers" in body:
            arns = body["Layers"] or []
            if len(arns) > 5:
                raise invalid("Cannot reference more than 5 layers.")
            out["layers"] = [self._layer_by_arn(a) for a in arns]
        return out

    def _layer_by_arn(self, arn: str) -> LayerVersion:
        parts = arn.split(":")
        if len(parts) == 8 and parts[5] == "layer":
            for lv in self._layers.get(parts[6], []):
                if str(lv.version) == parts[7]:
                    return lv
        raise invalid(f"Layer version {arn} does not exist.")

    def _decode_zip(self, code: dict) -> bytes:
        if not code or "ZipFile" not in code:
            if code and ("S3Bucket" in code or "ImageUri" in code):
                raise invalid("The Lambda emulator accepts ZipFile code only "
                               "(no S3 or container image locations).")
            raise invalid("Please provide a source for function code.")
        try:
            data = base64.b64decode(code["ZipFile"], validate=False)
            zipfile.ZipFile(io.BytesIO(data)).testzip()
        except Exception:
            raise invalid("Could not unzip uploaded file. Please check your file, then try "
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
            raise invalid(f"Value {name!r} at 'functionName' failed to satisfy constraint")
        if name in self._functions:
            raise conflict(f"Function already exist: {name}")
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
            raise conflict(f"The operation cannot be performed at this time. An update is in "
                            f"progress for resource: {fn.arn}")
        fn.revision += 1
        fn.revision_id = str(uuid.uuid4())
        fn.last_modified = now_iso()
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
            raise invalid("ReservedConcurrentExecutions must be a non-negative integer")
        others = sum(f.reserved or 0 for f in self._functions.values() if f is not fn)
        if others + n > self.account_concurrency:
            raise invalid(
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
            raise invalid(f"Value {name!r} at 'layerName' failed to satisfy constraint")
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
            description=body.get("Description", ""), created=now_iso(),
            compatible_runtimes=list(body.get("CompatibleRuntimes") or []),
            license_info=body.get("LicenseInfo"))
        versions.append(lv)
        return lv.describe(self.endpoint_url)

    def layer_version(self, name: str, version: str) -> LayerVersion:
        for lv in self._layers.get(name, []):
            if str(lv.version) == str(version):
                return lv
        raise not_found("The resource you requested does not exist.")
