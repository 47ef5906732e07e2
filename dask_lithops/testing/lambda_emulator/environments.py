"""Execution environments' lifecycle: spawn, Runtime API socket, output, exit, retirement.

A mixin of :class:`~.server.LambdaEmulator`.  The process itself -- its namespace,
memory cgroup and teardown -- is the shared machinery of :mod:`dask_lithops.testing.sandbox`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from .. import sandbox
from .model import INIT_TIMEOUT, Environment, Function, Invocation, log_ts
from .runtime_api import runtime_application

logger = logging.getLogger("dask_lithops.lambda_emulator")

#: where the managed runtime's venv appears inside an environment with its own root
RUNTIME_DIR = Path("/var/runtime")
#: Lambda runs functions as sbx_user1051
LAMBDA_USER = "993:990"


class EnvironmentManager:
    """Start, feed, watch and retire the environments that run invocations."""

    def _spawn_task(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _spawn(self, fn: Function, inv: Invocation) -> Environment:
        env = Environment(fn, fn.spec())
        fn.envs.append(env)
        self._envs[env.id] = env
        self._bind(env, inv)
        env.pending = inv
        env.http = HTTPServer(runtime_application(env, self), max_body_size=80 * 1024 * 1024)
        socks = bind_sockets(0, self.host_address, family=socket.AF_INET)
        env.port = socks[0].getsockname()[1]
        env.http.add_sockets(socks)
        env.init_timer = self._loop.call_later(INIT_TIMEOUT + env.spec.timeout,
                                               self._on_init_timeout, env)
        self._spawn_task(self._start_env(env))
        return env

    def _env_vars(self, env: Environment, tmpdir: Path, creds: dict) -> dict:
        s = env.spec
        fn = env.function
        pyver = f"python{s.runtime[len('python'):]}"
        minor = f"python{sys.version_info.major}.{sys.version_info.minor}"
        if self.filesystem_isolated:  # Lambda's paths, inside the environment's own root
            task_root, opt, tmp, python = "/var/task", "/opt", "/tmp", RUNTIME_DIR / "bin/python"
        else:
            task_root, opt, tmp, python = s.task_root, s.opt_dir, tmpdir, self._python
        site = python.parent.parent / "lib" / minor / "site-packages"
        v = {
            "PATH": f"{python.parent}:/usr/local/bin:/usr/bin/:/bin:{opt}/bin",
            "LD_LIBRARY_PATH": f"{opt}/lib",
            "LANG": "en_US.UTF-8",
            "TZ": ":UTC",
            "PYTHONPATH": os.pathsep.join([
                str(task_root), f"{opt}/python/lib/{pyver}/site-packages", f"{opt}/python"]),
            "PYTHONNOUSERSITE": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "TMPDIR": str(tmp),
            "LAMBDA_TASK_ROOT": str(task_root),
            "LAMBDA_RUNTIME_DIR": str(site),
            "_HANDLER": s.handler,
            "AWS_EXECUTION_ENV": f"AWS_Lambda_{s.runtime}",
            "AWS_LAMBDA_FUNCTION_NAME": fn.name,
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(s.memory),
            "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
            "AWS_LAMBDA_INITIALIZATION_TYPE": "on-demand",
            "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{fn.name}",
            "AWS_LAMBDA_LOG_STREAM_NAME": env.stream,
            "AWS_LAMBDA_RUNTIME_API": f"{self.host_address}:{env.port}",
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            **creds,
            "AWS_ENDPOINT_URL_LAMBDA": self.sandbox_endpoint_url,
        }
        if self.sandbox_aws_endpoint_url:
            v["AWS_ENDPOINT_URL"] = self.sandbox_aws_endpoint_url
        v.update(s.variables)
        return v

    def _start_blocking(self, env: Environment) -> sandbox.ProcessHandle:
        base = self.workdir / "envs" / env.id
        tmpdir = base / "tmp"
        tmpdir.mkdir(parents=True)
        # the role's credentials, as Lambda gives them (from STS when the test world has one)
        creds = self._role_credentials.get(env.function.role, env.function.name)
        self._sandboxes.allow(self.host_address, env.port)
        fs = None
        python, cwd = str(self._python), str(env.spec.task_root)
        if self.filesystem_isolated:
            binds, masks = sandbox.interpreter_binds()
            binds.update({"/var/task": env.spec.task_root, "/opt": env.spec.opt_dir,
                          str(RUNTIME_DIR): self._python.parent.parent})
            fs = sandbox.Filesystem(skeleton=self.workdir / "root", binds=binds, cwd="/var/task",
                                    user=LAMBDA_USER, masks=masks)
            python, cwd = str(RUNTIME_DIR / "bin/python"), "/var/task"
        try:
            h = self._sandboxes.start(
                [python, "-s", "-m", "awslambdaric", env.spec.handler],
                env=self._env_vars(env, tmpdir, creds), cwd=cwd, memory_mb=env.spec.memory,
                name=f"env-{env.id}", tmpdir=base, filesystem=fs)
        except Exception:
            self._sandboxes.disallow(self.host_address, env.port)
            shutil.rmtree(base, ignore_errors=True)
            raise
        self._executor.submit(self._sandboxes.refill)
        return h

    def _teardown_blocking(self, h: sandbox.ProcessHandle, port: int) -> None:
        self._sandboxes.disallow(self.host_address, port)  # a no-op when host_reachable
        self._sandboxes.teardown(h)

    async def _start_env(self, env: Environment) -> None:
        loop = asyncio.get_running_loop()
        try:
            h = await loop.run_in_executor(self._executor, self._start_blocking, env)
        except Exception as e:
            logger.exception("starting an environment of %s failed", env.function.name)
            inv = env.inv
            if inv is not None:
                self._complete(inv, json.dumps({
                    "errorType": "Runtime.Unknown",
                    "errorMessage": f"the emulator could not start an environment: {e}"
                }).encode(), "Unhandled", "failed")
            env.state = "dead"
            self._forget(env)
            return
        env.handle = h
        stream_path = self.log_dir / env.function.name / (env.stream.replace("/", "-") + ".log")
        try:
            stream_path.parent.mkdir(parents=True, exist_ok=True)
            env.log_file = open(stream_path, "a", buffering=65536)
        except OSError:
            env.log_file = None
        if env.state == "dead":  # retired while starting (stop, timeout, delete)
            self._exit_cleanup(env)
            return
        self._watch_process(env, self._on_output, self._on_exit)

    def _on_output(self, env: Environment) -> None:
        h = env.handle
        try:
            data = os.read(h.stdout_fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._loop.remove_reader(h.stdout_fd)
            if env.out_buf:
                self._line(env, env.out_buf)
                env.out_buf = b""
            return
        self._feed(env, data)

    def _feed(self, env: Environment, data: bytes) -> None:
        buf = env.out_buf + data
        *lines, env.out_buf = buf.split(b"\n")
        for line in lines:
            self._line(env, line)

    def _drain(self, env: Environment) -> None:
        """Read what the environment wrote before it called the Runtime API."""
        h = env.handle
        if h is None:
            return
        while True:
            try:
                data = os.read(h.stdout_fd, 65536)
            except (BlockingIOError, OSError, ValueError):
                return
            if not data:
                return
            self._feed(env, data)

    def _line(self, env: Environment, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        inv = env.inv
        if inv is not None and inv.started is not None and not inv.done:
            self._log(env, inv, text)
        else:
            env.init_lines.append(text)
            if len(env.init_lines) > 1000:
                del env.init_lines[:500]
            self._write_stream(env, text)

    def _log(self, env: Environment, inv: Invocation, text: str) -> None:
        inv.log.append(text)
        self._write_stream(env, text)

    def _write_stream(self, env: Environment, text: str) -> None:
        if env.log_file is not None:
            try:
                env.log_file.write(f"{log_ts()} {text}\n")
            except (OSError, ValueError):
                pass

    def _on_exit(self, env: Environment) -> None:
        h = env.handle
        rc = self._exit_code(env)
        self._drain(env)
        env.exited = True
        inv = env.inv
        if inv is not None and not inv.done:
            # oom_kill is not always counted in the environment's own cgroup (the
            # kill can come from the hierarchy's OOM path); SIGKILL at the limit is OOM too
            oom = h.cgroup is not None and (
                sandbox.CgroupV1Memory.oom_killed(h.cgroup)
                or (rc == -9 and sandbox.CgroupV1Memory.hit_limit(h.cgroup)))
            desc = sandbox.exit_description(rc)
            if env.init_error is not None:
                payload = env.init_error
            else:
                etype = "Runtime.OutOfMemory" if oom else "Runtime.ExitError"
                payload = json.dumps({
                    "errorType": etype,
                    "errorMessage": f"RequestId: {inv.request_id} Error: Runtime exited with "
                                    f"error: {desc}"}).encode()
                if inv.started is None:
                    inv.log.extend(env.init_lines)
                    env.init_lines = []
                    inv.started = time.monotonic()
                    inv.cold = True
                self._log(env, inv, f"RequestId: {inv.request_id} Error: Runtime exited with "
                                    f"error: {desc}")
                self._log(env, inv, etype)
            self.stats["crashes"] += 1
            self._complete(inv, payload, "Unhandled", "failed")
        env.state = "dead"
        self._exit_cleanup(env)
        self._schedule_pump()

    def _retire(self, env: Environment, teardown_now: bool = False) -> None:
        """Stop using an environment: kill it (its exit handler then cleans up)."""
        if env.state == "dead" and not teardown_now:
            return
        env.state = "dead"
        if env.init_timer is not None:
            env.init_timer.cancel()
            env.init_timer = None
        if env.waiter is not None and not env.waiter.done():
            env.waiter.cancel()
        try:
            env.function.idle.remove(env)
        except ValueError:
            pass
        h = env.handle
        if h is None:
            if env.exited or env.id not in self._envs:
                return
            return  # still starting: _start_env tears it down when the process is up
        if teardown_now or env.exited:
            self._exit_cleanup(env)
        else:
            sandbox.kill_process(h)  # SIGKILL by PID; _on_exit follows

    def _exit_cleanup(self, env: Environment) -> None:
        if env.id not in self._envs:
            return
        self._unwatch_process(env)
        self._forget(env)
        self._release_process(env, self._teardown_blocking, env.port)

    def _forget(self, env: Environment) -> None:
        self._unbind(env)
        self._envs.pop(env.id, None)
        try:
            env.function.envs.remove(env)
        except ValueError:
            pass
        try:
            env.function.idle.remove(env)
        except ValueError:
            pass
        if env.http is not None:
            env.http.stop()
            env.http = None

    def _retire_stale(self, fn: Function) -> None:
        for env in list(fn.idle):
            if env.spec.revision != fn.revision:
                self._retire(env)

    def _reap(self) -> None:
        now = time.monotonic()
        for env in list(self._envs.values()):
            if env.state == "idle" and now - env.idle_since > self.idle_timeout:
                self._retire(env)
