"""The HTTP front end: each function's URL, routed to one of its instances.

Every function gets its own listener (its ``serviceConfig.uri``), as every Cloud
Run service gets its own hostname, so the function sees request paths exactly
as sent.  A request needs ``Authorization: Bearer <ID token>`` whose audience is
the function's URL; it is then proxied to an instance with a free slot (one
request per instance unless ``maxInstanceRequestConcurrency`` says otherwise),
starting one when all are busy and fewer than ``maxInstanceCount`` run, else it
is answered 429 like Cloud Run's "no available instance".  A request that
outlives ``timeoutSeconds`` is cut off with 504 and its instance is stopped; a
client that disconnects does not stop the request in the instance (as on Cloud Run).
"""

from __future__ import annotations

import asyncio
import time
import uuid

from tornado import httputil
from tornado.web import Application, RequestHandler

from .auth import AuthError
from .model import RequestRecord

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "te", "trailer", "transfer-encoding", "upgrade", "host",
                        "content-length"})
MAX_RESPONSE = 32 * 1024 * 1024  # Cloud Run's HTTP/1 response limit


class FrontEndError(Exception):
    def __init__(self, status: int, message: str, instance=None):
        super().__init__(message)
        self.status, self.message, self.instance = status, message, instance


class FunctionRequestHandler(RequestHandler):
    SUPPORTED_METHODS = ("GET", "HEAD", "POST", "DELETE", "PATCH", "PUT", "OPTIONS")

    def initialize(self, core, function):
        self.core, self.function = core, function
        self._client_gone = False

    def check_xsrf_cookie(self):
        pass

    def on_connection_close(self):
        # as on Cloud Run, the request goes on in the instance (which stays busy) until the
        # function returns or the timeout cuts it off; only its answer has nowhere to go
        self._client_gone = True

    async def _handle(self, *args):
        core, fn = self.core, self.function
        rid = uuid.uuid4().hex
        t0 = time.monotonic()
        inst = None
        cold = False
        status, error = 500, None
        try:
            if fn.deleted:
                raise FrontEndError(404, "Page not found")
            try:
                core.auth.check_id_token(self.request.headers.get("Authorization"),
                                         [fn.uri, fn.uri + "/"])
            except AuthError as e:
                raise FrontEndError(401, f"Your client does not have permission to get URL "
                                         f"{self.request.path} from this server. {e}") from None
            inst, cold = core.acquire_instance(fn)
            task = asyncio.ensure_future(self._serve(inst))
            try:
                status, headers, body = await asyncio.wait_for(task, timeout=fn.timeout_s)
            except asyncio.TimeoutError:
                core.stats["timeouts"] += 1
                core.stop_instance(inst, f"request timed out after {fn.timeout_s} s")
                raise FrontEndError(504, "upstream request timeout") from None
            if self._client_gone:
                status, error = 499, "client disconnected"
                return
            self.set_status(status)
            for k, v in headers.get_all():
                if k.lower() not in HOP_BY_HOP:
                    self.add_header(k, v)
            self.set_header("X-Cloud-Trace-Context", f"{rid}/1;o=1")
            self.finish(body)
        except FrontEndError as e:
            status, error = e.status, e.message
            if not self._client_gone:
                self.set_status(e.status)
                self.set_header("Content-Type", "text/plain; charset=utf-8")
                if e.status == 429:
                    self.set_header("Retry-After", "1")
                self.finish(e.message + "\n")
        finally:
            if inst is not None:
                core.release_instance(inst)
            core.record(RequestRecord(rid, fn.id, self.request.method, self.request.path,
                                      status, inst.id if inst else None, cold,
                                      (time.monotonic() - t0) * 1000, error))

    async def _serve(self, inst):
        """Wait for the instance to be ready, proxy the request, return the response."""
        await self.core.wait_ready(inst)
        try:
            return await proxy(inst, self.request)
        except FrontEndError as e:
            if e.status != 503:
                raise
            # the instance (or, under gunicorn, its worker) died: say why, and on a kill
            # at the memory limit stop the whole instance, as Cloud Run does
            self.core.check_memory_limit(inst)
            for _ in range(20):
                if inst.exit_reason:
                    raise FrontEndError(503, f"{e.message.split(': ')[0]}: {inst.exit_reason}",
                                        inst) from None
                await asyncio.sleep(0.05)
            raise

    get = head = post = delete = patch = put = options = _handle


async def proxy(inst, request: httputil.HTTPServerRequest):
    """One HTTP/1.0 exchange with the instance (no chunking; the instance closes at the end)."""
    try:
        reader, writer = await asyncio.open_connection(inst.address, inst.port)
    except OSError as e:
        raise FrontEndError(503, f"The request failed because the instance could not be "
                                 f"reached: {e}", inst) from None
    try:
        lines = [f"{request.method} {request.uri} HTTP/1.0",
                 f"Host: {request.host}", f"Content-Length: {len(request.body or b'')}",
                 f"X-Forwarded-For: {request.remote_ip}", "X-Forwarded-Proto: http",
                 "Connection: close"]
        for k, v in request.headers.get_all():
            if k.lower() not in HOP_BY_HOP and k.lower() != "x-forwarded-for":
                lines.append(f"{k}: {v}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (request.body or b""))
        await writer.drain()
        raw = await reader.read(MAX_RESPONSE + 65536)
        while True:
            more = await reader.read(65536)
            if not more:
                break
            raw += more
            if len(raw) > MAX_RESPONSE + 65536:
                raise FrontEndError(500, "response size exceeded the 32 MiB limit", inst)
    except (ConnectionError, OSError) as e:
        raise FrontEndError(503, f"The request failed because either the HTTP response was "
                                 f"malformed or connection to the instance had an error: {e}",
                            inst) from None
    finally:
        writer.close()
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        reason = inst.exit_reason or "the instance closed the connection without a response"
        raise FrontEndError(503, f"The request failed because either the HTTP response was "
                                 f"malformed or connection to the instance had an error: "
                                 f"{reason}", inst)
    start, _, rest = head.decode("latin-1").partition("\r\n")
    status = int(start.split(" ", 2)[1])
    return status, httputil.HTTPHeaders.parse(rest), body


def function_application(core, function) -> Application:
    return Application([(r".*", FunctionRequestHandler, {"core": core, "function": function})],
                       log_function=lambda handler: None)
