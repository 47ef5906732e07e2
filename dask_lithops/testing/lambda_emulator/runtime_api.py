"""The Lambda Runtime API (``/2018-06-01/runtime/...``) served to one environment.

Each execution environment gets its own listening socket and application, so
the handler always knows which environment is calling (as in Lambda, where the
Runtime API is local to the sandbox).
"""

from __future__ import annotations

import asyncio
import json

from tornado.web import Application, RequestHandler

ERROR_TYPE_HEADER = "Lambda-Runtime-Function-Error-Type"


class _Base(RequestHandler):
    def initialize(self, env, core):
        self.env = env
        self.core = core

    def set_default_headers(self):
        self.set_header("Content-Type", "application/json")

    def _status(self, code: int, body: dict):
        self.set_status(code)
        self.finish(json.dumps(body))

    def check_xsrf_cookie(self):
        pass


class NextHandler(_Base):
    async def get(self):
        try:
            inv = await self.core.next_invocation(self.env)
        except asyncio.CancelledError:
            try:
                self._status(410, {"errorMessage": "environment is shutting down",
                                   "errorType": "Runtime.Shutdown"})
            except Exception:
                pass
            return
        for k, v in self.core.runtime_headers(inv).items():
            self.set_header(k, v)
        self.set_status(200)
        self.finish(inv.payload)


class ResponseHandler(_Base):
    def post(self, request_id):
        code, body = self.core.runtime_response(self.env, request_id, self.request.body)
        self._status(code, body)


class ErrorHandler(_Base):
    def post(self, request_id):
        code, body = self.core.runtime_error(
            self.env, request_id, self.request.body, self.request.headers.get(ERROR_TYPE_HEADER))
        self._status(code, body)


class InitErrorHandler(_Base):
    def post(self):
        code, body = self.core.runtime_init_error(
            self.env, self.request.body, self.request.headers.get(ERROR_TYPE_HEADER))
        self._status(code, body)


def runtime_application(env, core) -> Application:
    kw = {"env": env, "core": core}
    return Application([
        (r"/2018-06-01/runtime/invocation/next", NextHandler, kw),
        (r"/2018-06-01/runtime/invocation/([^/]+)/response", ResponseHandler, kw),
        (r"/2018-06-01/runtime/invocation/([^/]+)/error", ErrorHandler, kw),
        (r"/2018-06-01/runtime/init/error", InitErrorHandler, kw),
    ], log_function=_quiet)


def _quiet(handler):
    pass
