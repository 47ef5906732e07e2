"""The control API's HTTP handlers (Lambda's REST paths as boto3 calls them)."""

from __future__ import annotations

import base64
import json
import re
import time
import urllib.parse
import uuid

from tornado import httputil
from tornado.web import Application, HTTPError, RequestHandler

from .model import (
    ASYNC_PAYLOAD_LIMIT,
    LOG_TAIL_BYTES,
    SYNC_PAYLOAD_LIMIT,
    LambdaError,
    conflict,
    invalid,
)


class _Control(RequestHandler):
    def initialize(self, core):
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
            raise invalid(f"Value {kind!r} at 'invocationType' failed to satisfy constraint")
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
                raise conflict(f"The operation cannot be performed at this time. The function "
                                f"is currently in the following state: {fn.state}")
            self.send_empty(204)
            return
        cc = self.request.headers.get("X-Amz-Client-Context")
        if cc:
            try:
                cc = base64.b64decode(cc).decode()
            except Exception:
                raise invalid("Client context must be a valid Base64-encoded JSON object.") from None
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
            raise invalid("MaximumRetryAttempts must be between 0 and 2")
        if not isinstance(age, int) or not 60 <= age <= 21600:
            raise invalid("MaximumEventAgeInSeconds must be between 60 and 21600")
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
        self.send_json({**self.core._status_fields(),
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


def control_application(core):
    return _ControlRouter(core, _control_app(core))


def _control_app(core) -> Application:
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
