"""Instances: ``functions-framework`` processes in sandboxes, started, routed to, reaped.

A mixin of :class:`~.server.CloudFunctionsEmulator`; every method runs on its
event loop except the ``*_blocking`` ones (thread pool).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from pathlib import Path

from .. import sandbox
from .frontend import FrontEndError
from .model import INSTANCE_PORT, Function, Instance, InstanceInfo

logger = logging.getLogger("dask_lithops.gcp_functions_emulator")

TAIL_LINES = 200
INSTANCE_USER = "1000:1000"  # an unprivileged user, not root


class InstanceManager:
    """Which instance serves a request; starting, watching and stopping instances."""

    def _instance_infos(self) -> list[InstanceInfo]:
        out = []
        for inst in self._instances.values():
            h = inst.handle
            out.append(InstanceInfo(
                id=inst.id, function=inst.function.id, revision=inst.revision,
                pid=h.pid if h else None, state=inst.state, in_flight=inst.in_flight,
                requests_served=inst.requests_served,
                netns=h.netns.name if h and h.netns else None, address=inst.address,
                memory_limit=h.memory_mode if h else self.memory_limit_mode,
                memory_mb=inst.memory_mb))
        return out

    # ---------------------------------------------------------------- routing

    def acquire_instance(self, fn: Function) -> tuple[Instance, bool]:
        """A slot on an instance of the current revision; (instance, cold)."""
        if fn.python is None:
            raise FrontEndError(503, "Service Unavailable: the function has no built revision")
        best = None
        for inst in fn.instances:
            if inst.state in ("starting", "idle", "busy") and inst.revision == fn.revision \
                    and inst.in_flight < fn.concurrency:
                if best is None or inst.state == "idle" and best.state != "idle":
                    best = inst
        cold = best is None or best.state == "starting"  # it waits for a start either way
        if best is None:
            live = sum(1 for i in fn.instances if i.state != "dead")
            if live >= fn.max_instances:
                self.stats["throttles"] += 1
                raise FrontEndError(429, "Rate exceeded. The request was aborted because there "
                                         "was no available instance (maxInstanceCount "
                                         f"{fn.max_instances} reached).")
            best = self._spawn(fn)
        best.in_flight += 1
        best.state = "busy" if best.state != "starting" else "starting"
        return best, cold

    def release_instance(self, inst: Instance) -> None:
        inst.in_flight -= 1
        inst.requests_served += 1
        if inst.state == "dead":
            return
        if inst.in_flight == 0 and inst.state == "busy":
            inst.state = "idle"
            inst.idle_since = time.monotonic()
            fn = inst.function
            if fn.deleted or inst.revision != fn.revision or self._closing:
                self.stop_instance(inst, "superseded by a new revision")

    async def wait_ready(self, inst: Instance) -> None:
        await asyncio.shield(inst.ready)
        if inst.state == "starting":
            inst.state = "busy"

    # -------------------------------------------------------------- lifecycle

    def _spawn(self, fn: Function) -> Instance:
        inst = Instance(fn)
        inst.ready = asyncio.get_running_loop().create_future()
        inst.ready.add_done_callback(lambda f: f.cancelled() or f.exception())  # no warning
        fn.instances.append(inst)
        self._instances[inst.id] = inst
        self.stats["cold_starts"] += 1
        self._spawn_task(self._start(inst))
        return inst

    def _instance_env(self, inst: Instance, port: int, python: Path, tmp) -> dict:
        fn = inst.function
        s, b = fn.service_config, fn.build_config
        env = {
            "PATH": f"{python.parent}:/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "TRUE",
            "PYTHONNOUSERSITE": "1",
            "TMPDIR": str(tmp),
            "PORT": str(port),
            "K_SERVICE": fn.id,
            "K_REVISION": s.get("revision", ""),
            "K_CONFIGURATION": fn.id,
            "FUNCTION_TARGET": b["entryPoint"],
            "FUNCTION_SIGNATURE_TYPE": "http",
            "LOG_EXECUTION_ID": "true",
            "GOOGLE_CLOUD_PROJECT": self.project,
            "FUNCTION_REGION": self.region,
        }
        env.update(b.get("environmentVariables") or {})
        env.update(s.get("environmentVariables") or {})
        return env

    def _start_blocking(self, inst: Instance) -> sandbox.ProcessHandle:
        fn = inst.function
        base = self.workdir / "instances" / inst.id
        inst.tmpdir = base / "tmp"
        inst.tmpdir.mkdir(parents=True)
        port = INSTANCE_PORT if self.sandboxed else _free_port()
        inst.port = port
        python, source, tmp, fs = fn.python, fn.source_dir, inst.tmpdir, None
        if self.filesystem_isolated:
            # the source at /workspace and the built environment under /layers, as Google's
            # buildpacks lay them out; nothing of the client's
            binds, masks = sandbox.interpreter_binds()
            binds.update({"/workspace": fn.source_dir, "/layers/python": fn.python.parent.parent})
            python, source, tmp = Path("/layers/python/bin/python"), Path("/workspace"), "/tmp"
            fs = sandbox.Filesystem(skeleton=self.workdir / "root", binds=binds,
                                    cwd="/workspace",
                                    user=INSTANCE_USER, tmp_mb=inst.memory_mb, masks=masks)
        command = [str(python), "-s", "-m", "functions_framework",
                   "--target", fn.build_config["entryPoint"], "--source",
                   str(source / "main.py"), "--signature-type", "http",
                   "--host", "0.0.0.0", "--port", str(port)]
        h = self._sandboxes.start(command, env=self._instance_env(inst, port, python, tmp),
                                  cwd=str(source), memory_mb=inst.memory_mb,
                                  name=f"inst-{inst.id}", tmpdir=base, filesystem=fs)
        self._executor.submit(self._sandboxes.refill)
        return h

    async def _start(self, inst: Instance) -> None:
        loop = asyncio.get_running_loop()
        try:
            h = await loop.run_in_executor(self._executor, self._start_blocking, inst)
        except Exception as e:
            logger.exception("starting an instance of %s failed", inst.function.id)
            self._fail_start(inst, f"the emulator could not start an instance: {e}")
            self._forget(inst)
            return
        inst.handle = h
        if h.netns is not None:
            inst.address = h.netns.address
        inst.log_path = self.log_dir / inst.function.id / f"{inst.id}.log"
        try:
            inst.log_path.parent.mkdir(parents=True, exist_ok=True)
            inst.log_file = open(inst.log_path, "a", buffering=1)
        except OSError:
            inst.log_file = None
        if inst.state == "dead":  # stopped while starting
            self._cleanup(inst)
            return
        self._watch_process(inst, self._on_output, self._on_exit)
        deadline = time.monotonic() + self.startup_timeout
        while inst.state != "dead":
            if await _port_open(inst.address, inst.port):
                if not inst.ready.done():
                    inst.ready.set_result(None)
                if inst.state == "starting" and inst.in_flight == 0:
                    inst.state, inst.idle_since = "idle", time.monotonic()
                return
            if time.monotonic() > deadline:
                self.stop_instance(inst, f"the instance did not listen on port {inst.port} "
                                         f"within {self.startup_timeout:.0f} s")
                return
            await asyncio.sleep(0.05)

    def _fail_start(self, inst: Instance, reason: str) -> None:
        inst.exit_reason = inst.exit_reason or reason
        if inst.ready is not None and not inst.ready.done():
            tail = "\n".join(inst.tail[-20:])
            inst.ready.set_exception(FrontEndError(
                500 if "Memory limit" not in reason else 503,
                f"The instance failed to start: {reason}" + (f"\n{tail}" if tail else ""), inst))

    def _on_output(self, inst: Instance) -> None:
        try:
            data = os.read(inst.handle.stdout_fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._loop.remove_reader(inst.handle.stdout_fd)
            return
        text = data.decode("utf-8", "replace")
        inst.tail.extend(text.splitlines())
        del inst.tail[:-TAIL_LINES]
        if inst.log_file is not None:
            try:
                inst.log_file.write(text)
            except (OSError, ValueError):
                pass

    def _on_exit(self, inst: Instance) -> None:
        rc = self._exit_code(inst)
        self._on_output(inst)
        if inst.exit_reason is None:
            oom = self._oom_reason(inst, rc)
            if oom:
                inst.exit_reason = oom
                self.stats["oom_kills"] += 1
            else:
                inst.exit_reason = f"the instance exited ({sandbox.exit_description(rc)})"
                self.stats["crashes"] += 1
            logger.info("instance %s of %s: %s", inst.id, inst.function.id, inst.exit_reason)
        self._fail_start(inst, inst.exit_reason)
        inst.state = "dead"
        self._cleanup(inst)

    def _oom_reason(self, inst: Instance, rc: int | None) -> str | None:
        h = inst.handle
        if h is None or h.cgroup is None:
            return None
        if sandbox.CgroupV1Memory.oom_killed(h.cgroup) or (
                rc == -9 and sandbox.CgroupV1Memory.hit_limit(h.cgroup)):
            used = sandbox.CgroupV1Memory.max_usage(h.cgroup) or 0
            return (f"Memory limit of {inst.memory_mb} MiB exceeded with {used // 2 ** 20} MiB "
                    f"used. Consider increasing the memory limit.")
        return None

    def check_memory_limit(self, inst: Instance) -> None:
        """A request's connection broke: if a process of the instance was OOM-killed, stop it."""
        reason = self._oom_reason(inst, None)
        if reason and inst.exit_reason is None:
            self.stats["oom_kills"] += 1
            self.stop_instance(inst, reason)

    def stop_instance(self, inst: Instance, reason: str) -> None:
        """Kill an instance by PID (its exit handler then cleans up)."""
        if inst.state == "dead" and inst.handle is None:
            self._forget(inst)
            return
        if inst.exit_reason is None:
            inst.exit_reason = reason
        inst.state = "dead"
        self._fail_start(inst, reason)
        if inst.handle is None:
            return  # still starting: _start cleans up once the process is up
        if inst.pidfd is None or self._closing:
            self._cleanup(inst)
        else:
            sandbox.kill_process(inst.handle)

    def _cleanup(self, inst: Instance) -> None:
        if inst.id not in self._instances:
            return
        self._unwatch_process(inst)
        self._forget(inst)
        self._release_process(inst, self._sandboxes.teardown)

    def _forget(self, inst: Instance) -> None:
        inst.state = "dead"
        self._instances.pop(inst.id, None)
        try:
            inst.function.instances.remove(inst)
        except ValueError:
            pass

    def retire_stale(self, fn: Function) -> None:
        for inst in list(fn.instances):
            if inst.revision != fn.revision and inst.in_flight == 0:
                self.stop_instance(inst, "superseded by a new revision")

    def _reap(self) -> None:
        now = time.monotonic()
        for inst in list(self._instances.values()):
            if inst.state == "idle" and now - inst.idle_since > self.idle_timeout:
                self.stats["reaped"] += 1
                self.stop_instance(inst, f"idle for {self.idle_timeout:.0f} s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _port_open(host: str, port: int) -> bool:
    try:
        _, w = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
    except (OSError, asyncio.TimeoutError):
        return False
    w.close()
    return True
