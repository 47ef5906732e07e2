"""HTTP handlers: the Cloud Functions v2 REST API, the upload URL, the OAuth token endpoint."""

from __future__ import annotations

import json
import re
import urllib.parse

from tornado.web import Application, HTTPError, RequestHandler

from .auth import AuthError
from .model import GoogleError

_PARENT = r"/v2/projects/([^/]+)/locations/([^/]+)"


class _Base(RequestHandler):
    def initialize(self, core):
        self.core = core

    def check_xsrf_cookie(self):
        pass

    def send_json(self, obj, status: int = 200):
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(json.dumps(obj))

    def body_json(self) -> dict:
        if not self.request.body:
            return {}
        try:
            body = json.loads(self.request.body)
        except ValueError as e:
            raise GoogleError("INVALID_ARGUMENT", f"Invalid JSON payload received. {e}") from None
        if not isinstance(body, dict):
            raise GoogleError("INVALID_ARGUMENT", "Invalid JSON payload received: expected an "
                                                  "object")
        return body

    def write_error(self, status_code, **kwargs):
        exc = kwargs.get("exc_info", (None, None))[1]
        if isinstance(exc, GoogleError):
            err = exc
        elif isinstance(exc, AuthError):
            err = GoogleError("UNAUTHENTICATED", exc.description)
            self.set_header("WWW-Authenticate", 'Bearer realm="https://accounts.google.com/"')
        elif isinstance(exc, HTTPError) and exc.status_code in (404, 405):
            err = GoogleError("NOT_FOUND", f"The requested URL {self.request.path} was not "
                                           f"found on this server.")
        else:
            err = GoogleError("INTERNAL", f"{type(exc).__name__}: {exc}")
        self.set_status(err.http_status)
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(json.dumps(err.body()))

    def log_exception(self, typ, value, tb):
        if not isinstance(value, (GoogleError, AuthError, HTTPError)):
            super().log_exception(typ, value, tb)


class _Api(_Base):
    """A v2 API call: bearer token required, project and region checked."""

    def prepare(self):
        self.core.auth.check_access(self.request.headers.get("Authorization"))

    def parent(self, project: str, region: str) -> str:
        return self.core.check_location(project, region)


class FunctionsHandler(_Api):
    async def post(self, project, region):
        parent = self.parent(project, region)
        function_id = self.get_query_argument("functionId", "")
        op = await self.core.create_function(parent, function_id, self.body_json())
        self.send_json(op.describe())

    def get(self, project, region):
        self.parent(project, region)
        size = int(self.get_query_argument("pageSize", "0") or 0) or 1000
        start = int(self.get_query_argument("pageToken", "0") or 0)
        fns = sorted(self.core._functions.values(), key=lambda f: f.name)
        out = {"functions": [f.describe() for f in fns[start:start + size]]}
        if start + size < len(fns):
            out["nextPageToken"] = str(start + size)
        self.send_json(out)


class FunctionHandler(_Api):
    def get(self, project, region, function_id):
        self.parent(project, region)
        self.send_json(self.core.function(project, region, function_id).describe())

    async def patch(self, project, region, function_id):
        self.parent(project, region)
        fn = self.core.function(project, region, function_id)
        mask = [_camel(p) for p in self.get_query_argument("updateMask", "").split(",") if p]
        op = await self.core.update_function(fn, self.body_json(), mask)
        self.send_json(op.describe())

    def delete(self, project, region, function_id):
        self.parent(project, region)
        op = self.core.delete_function(self.core.function(project, region, function_id))
        self.send_json(op.describe())


def _camel(path: str) -> str:
    """``service_config.available_memory`` -> ``serviceConfig.availableMemory``."""
    return ".".join(re.sub(r"_([a-z])", lambda m: m.group(1).upper(), p)
                    for p in path.strip().split("."))


class UploadUrlHandler(_Api):
    def post(self, project, region):
        self.parent(project, region)
        self.body_json()
        self.send_json(self.core.generate_upload_url())


class OperationHandler(_Api):
    def get(self, project, region, op_id):
        self.parent(project, region)
        self.send_json(self.core.operation(f"projects/{project}/locations/{region}/operations/"
                                           f"{op_id}").describe())


class OperationsHandler(_Api):
    def get(self, project, region):
        self.parent(project, region)
        self.send_json({"operations": [op.describe() for op in self.core._operations.values()]})


class UploadHandler(_Base):
    """The signed upload URL (``PUT`` with the zip as the body, no bearer token)."""

    def put(self, bucket, obj):
        self.core.receive_upload(bucket, urllib.parse.unquote(obj),
                                 self.get_query_argument("X-Goog-Signature", ""),
                                 self.request.body)
        self.set_status(200)
        self.finish()


class TokenHandler(_Base):
    def post(self):
        form = {k: v[-1].decode() for k, v in self.request.body_arguments.items()}
        try:
            self.send_json(self.core.auth.grant(form))
        except AuthError as e:
            self.send_json({"error": e.error, "error_description": e.description}, e.status)


class StatusHandler(_Base):
    def get(self):
        from dataclasses import asdict

        self.send_json({**self.core._status_fields(),
                        "functions": sorted(self.core._functions),
                        "instances": [asdict(i) for i in self.core._instance_infos()]})


class NotFoundHandler(_Base):
    def prepare(self):
        raise GoogleError("NOT_FOUND", f"The requested URL {self.request.path} was not found on "
                                       f"this server.")


def api_application(core) -> Application:
    kw = {"core": core}
    return Application([
        (rf"{_PARENT}/functions:generateUploadUrl", UploadUrlHandler, kw),
        (rf"{_PARENT}/functions", FunctionsHandler, kw),
        (rf"{_PARENT}/functions/([^/:]+)", FunctionHandler, kw),
        (rf"{_PARENT}/operations", OperationsHandler, kw),
        (rf"{_PARENT}/operations/([^/]+)", OperationHandler, kw),
        (r"/upload/([^/]+)/(.+)", UploadHandler, kw),
        (r"/token", TokenHandler, kw),
        (r"/_emulator/status", StatusHandler, kw),
        (r".*", NotFoundHandler, kw),
    ], log_function=lambda handler: None)
