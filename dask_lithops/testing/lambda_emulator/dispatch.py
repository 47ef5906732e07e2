"""Dispatch: invocations queued, throttled and bound to environments; the Runtime API's callbacks.

A mixin of :class:`~.server.LambdaEmulator`; every method runs on the emulator's event loop.
"""

from __future__ import annotations

import asyncio
import json
import math
import time

from .. import sandbox
from .model import (
    INIT_TIMEOUT,
    MAX_EVENT_QUEUE,
    MAX_KEPT_INVOCATIONS,
    RESPONSE_LIMIT,
    Environment,
    Function,
    Invocation,
    LambdaError,
    conflict,
    log_ts,
)


class Dispatcher:
    """Which environment runs which invocation, and what happens when it ends."""

    def invoke(self, fn: Function, payload: bytes, kind: str, tail: bool,
               client_context: str | None) -> Invocation:
        if fn.state != "Active":
            raise conflict(f"The operation cannot be performed at this time. The function is "
                            f"currently in the following state: {fn.state}")
        inv = Invocation(fn, payload, kind, tail, client_context)
        self.stats["invocations"] += 1
        if kind == "Event":
            if self.invoke_rate_limit and not self._take_rate_token():
                self.stats["rate_throttles"] += 1
                raise LambdaError("TooManyRequestsException", 429, "Rate Exceeded.",
                                  headers={"Retry-After": "1"}, Reason="CallerRateLimitExceeded")
            if len(fn.queue) >= MAX_EVENT_QUEUE:
                raise LambdaError("TooManyRequestsException", 429, "Rate Exceeded.",
                                  headers={"Retry-After": "1"}, Reason="CallerRateLimitExceeded")
            self.stats["events"] += 1
            self._remember(inv)
            fn.queue.append(inv)
            self._schedule_pump()
            return inv
        inv.future = asyncio.get_running_loop().create_future()
        if not self._dispatch(fn, inv):
            self.stats["throttles"] += 1
            reason = ("ReservedFunctionConcurrentInvocationLimitExceeded" if fn.reserved is not None
                      else "ConcurrentInvocationLimitExceeded")
            raise LambdaError("TooManyRequestsException", 429, "Rate Exceeded.",
                              headers={"Retry-After": "1"}, Reason=reason)
        self._remember(inv)
        return inv

    def _take_rate_token(self) -> bool:
        rate = float(self.invoke_rate_limit)
        now = time.monotonic()
        self._rate_tokens = min(rate, self._rate_tokens + (now - self._rate_time) * rate)
        self._rate_time = now
        if self._rate_tokens < 1:
            return False
        self._rate_tokens -= 1
        return True

    def _remember(self, inv: Invocation) -> None:
        self._invocations[inv.request_id] = inv
        while len(self._invocations) > MAX_KEPT_INVOCATIONS:
            self._invocations.popitem(last=False)

    def _has_capacity(self, fn: Function) -> bool:
        if self._closing or fn.deleted:
            return False
        if fn.reserved is not None:
            return fn.in_flight < fn.reserved
        reserved = sum(f.reserved or 0 for f in self._functions.values())
        return self._unreserved_in_flight < self.account_concurrency - reserved

    def _dispatch(self, fn: Function, inv: Invocation) -> bool:
        if not self._has_capacity(fn):
            return False
        while fn.idle:
            env = fn.idle.pop()
            if env.state == "idle" and env.spec.revision == fn.revision:
                self._assign(env, inv)
                return True
            self._retire(env)
        self._spawn(fn, inv)
        return True

    def _schedule_pump(self) -> None:
        if not self._pump_scheduled and not self._closing:
            self._pump_scheduled = True
            self._loop.call_soon(self._pump)

    def _pump(self) -> None:
        self._pump_scheduled = False
        for fn in list(self._functions.values()):
            q = fn.queue
            while q and self._dispatch(fn, q[0]):
                q.popleft()

    def _bind(self, env: Environment, inv: Invocation) -> None:
        env.inv = inv
        inv.env = env
        inv.status = "running"
        fn = env.function
        fn.in_flight += 1
        if fn.reserved is None:
            self._unreserved_in_flight += 1

    def _unbind(self, env: Environment) -> None:
        if env.inv is None:
            return
        env.inv = None
        fn = env.function
        fn.in_flight -= 1
        if fn.reserved is None:
            self._unreserved_in_flight -= 1

    def _assign(self, env: Environment, inv: Invocation) -> None:
        self._bind(env, inv)
        env.state = "busy"
        if env.waiter is not None and not env.waiter.done():
            env.waiter.set_result(inv)
            env.waiter = None
        else:
            env.pending = inv

    async def next_invocation(self, env: Environment) -> Invocation:
        """The Runtime API's ``/next``: wait for this environment's next invocation."""
        if env.state == "dead":
            raise asyncio.CancelledError()
        if not env.initialized:
            env.initialized = True
            if env.init_timer is not None:
                env.init_timer.cancel()
                env.init_timer = None
            if env.inv is not None:
                env.inv.init_ms = (time.monotonic() - env.created) * 1000
        if env.pending is not None:
            inv, env.pending = env.pending, None
        else:
            env.waiter = asyncio.get_running_loop().create_future()
            inv = await env.waiter
        self._deliver(env, inv)
        return inv

    def _deliver(self, env: Environment, inv: Invocation) -> None:
        env.state = "busy"
        inv.started = time.monotonic()
        inv.timeout = env.spec.timeout
        inv.deadline_ms = int(time.time() * 1000) + env.spec.timeout * 1000
        inv.cold = env.cold_invocations == 0 and env.warm_invocations == 0
        if inv.cold:
            env.cold_invocations += 1
            self.stats["cold_starts"] += 1
            inv.log.extend(env.init_lines)
            env.init_lines = []
        else:
            env.warm_invocations += 1
            self.stats["warm_starts"] += 1
        self._log(env, inv, f"START RequestId: {inv.request_id} Version: $LATEST")
        inv.timer = self._loop.call_later(env.spec.timeout, self._on_timeout, inv)

    def runtime_headers(self, inv: Invocation) -> dict:
        h = {
            "Lambda-Runtime-Aws-Request-Id": inv.request_id,
            "Lambda-Runtime-Deadline-Ms": str(inv.deadline_ms),
            "Lambda-Runtime-Invoked-Function-Arn": inv.function.arn,
            "Lambda-Runtime-Trace-Id": inv.trace_id,
        }
        if inv.client_context:
            h["Lambda-Runtime-Client-Context"] = inv.client_context
        return h

    def _current(self, env: Environment, request_id: str):
        inv = env.inv
        if inv is None or inv.request_id != request_id or inv.started is None:
            return None
        return inv

    def runtime_response(self, env: Environment, request_id: str, body: bytes):
        inv = self._current(env, request_id)
        if inv is None:
            return 400, {"errorMessage": f"Invalid request ID: {request_id}",
                         "errorType": "InvalidRequestID"}
        self._drain(env)
        if len(body) > RESPONSE_LIMIT:
            err = {"errorMessage": "Response payload size exceeded maximum allowed payload "
                                   f"size ({RESPONSE_LIMIT} bytes).",
                   "errorType": "Function.ResponseSizeTooLarge"}
            self._complete(inv, json.dumps(err).encode(), "Unhandled", "failed")
        else:
            self._complete(inv, body, None, "succeeded")
        self._release(env)
        return 202, {"status": "OK"}

    def runtime_error(self, env: Environment, request_id: str, body: bytes, error_type):
        inv = self._current(env, request_id)
        if inv is None:
            return 400, {"errorMessage": f"Invalid request ID: {request_id}",
                         "errorType": "InvalidRequestID"}
        self._drain(env)
        self._complete(inv, body, "Unhandled", "failed")
        self._release(env)
        return 202, {"status": "OK"}

    def runtime_init_error(self, env: Environment, body: bytes, error_type):
        self._drain(env)
        env.init_error = body
        inv = env.inv
        if inv is not None and not inv.done:
            if inv.started is None:
                # the invocation never started: its log is the init phase's
                inv.log.extend(env.init_lines)
                env.init_lines = []
                inv.started = time.monotonic()
                inv.cold = True
                env.cold_invocations += 1
            self._log(env, inv, f"INIT_REPORT Init Duration: "
                                f"{(time.monotonic() - env.created) * 1000:.2f} ms\t"
                                f"Phase: init\tStatus: error\tError Type: {error_type}")
            self._complete(inv, body, "Unhandled", "failed")
        self._retire(env)
        return 202, {"status": "OK"}

    def _release(self, env: Environment) -> None:
        """The environment finished its invocation: idle again, or gone if stale."""
        if env.state == "dead":
            return
        env.state = "idle"
        env.idle_since = time.monotonic()
        fn = env.function
        if fn.deleted or env.spec.revision != fn.revision or self._closing:
            self._retire(env)
            return
        fn.idle.append(env)
        if fn.queue:
            self._schedule_pump()

    def _complete(self, inv: Invocation, payload: bytes, function_error: str | None,
                  status: str) -> None:
        if inv.done:
            return
        inv.done = True
        if inv.timer is not None:
            inv.timer.cancel()
        inv.result = payload
        inv.function_error = function_error
        inv.status = status
        env = inv.env
        now = time.monotonic()
        inv.duration_ms = (now - inv.started) * 1000 if inv.started else 0.0
        if env is not None:
            self._log(env, inv, f"END RequestId: {inv.request_id}")
            used = None
            if env.handle is not None:
                used = sandbox.vm_hwm_bytes(env.handle.pid)
                if used is None and env.handle.cgroup is not None:
                    used = sandbox.CgroupV1Memory.max_usage(env.handle.cgroup)
            report = (f"REPORT RequestId: {inv.request_id}\tDuration: {inv.duration_ms:.2f} ms\t"
                      f"Billed Duration: {max(1, math.ceil(inv.duration_ms))} ms\t"
                      f"Memory Size: {env.spec.memory} MB\t"
                      f"Max Memory Used: {(used or 0) // (1024 * 1024)} MB\t")
            if inv.cold and inv.init_ms is not None:
                report += f"Init Duration: {inv.init_ms:.2f} ms\t"
            self._log(env, inv, report)
            if env.log_file is not None:
                try:
                    env.log_file.flush()
                except (OSError, ValueError):
                    pass
            if env.inv is inv:
                self._unbind(env)
        if function_error:
            self.stats["errors"] += 1
        if inv.future is not None and not inv.future.done():
            inv.future.set_result(inv)
        elif inv.kind == "Event" and function_error and not self._closing:
            self._maybe_retry_event(inv)

    def _maybe_retry_event(self, inv: Invocation) -> None:
        fn = inv.function
        if fn.deleted or inv.attempt >= min(fn.event_retries, len(self.event_retry_delays)):
            return
        age = time.monotonic() - inv.enqueued
        delay = self.event_retry_delays[inv.attempt]
        if age + delay > fn.event_max_age:
            return

        def retry():
            if fn.deleted or self._closing:
                return
            again = Invocation(fn, inv.payload, "Event", False, inv.client_context)
            again.request_id = inv.request_id  # Lambda retries under the same request id
            again.attempt = inv.attempt + 1
            again.enqueued = inv.enqueued
            again.log = inv.log
            fn.queue.append(again)
            self._invocations[again.request_id] = again
            self._schedule_pump()

        self._loop.call_later(delay, retry)

    def _on_timeout(self, inv: Invocation) -> None:
        if inv.done:
            return
        env = inv.env
        self.stats["timeouts"] += 1
        msg = f"Task timed out after {inv.timeout:.2f} seconds"
        if env is not None:
            self._drain(env)
        self._complete(inv, json.dumps({
            "errorType": "Sandbox.Timedout",
            "errorMessage": f"RequestId: {inv.request_id} Error: {msg}"}).encode(),
            "Unhandled", "timedout")
        if env is not None:
            self._log(env, inv, f"{log_ts()} {inv.request_id} {msg}")
            self._retire(env)

    def _on_init_timeout(self, env: Environment) -> None:
        env.init_timer = None
        if env.initialized or env.state == "dead":
            return
        inv = env.inv
        if inv is not None and not inv.done:
            inv.started = inv.started or env.created
            inv.timeout = INIT_TIMEOUT + env.spec.timeout
            self._on_timeout(inv)
        else:
            self._retire(env)
