"""Sandboxes of the emulators (Lambda, Cloud Run functions): namespace, memory limit, process.

Each emulator owns one :class:`Sandboxes`: a bridge, a pool of outbound-only
network namespaces on it (made ahead of need) and a parent memory cgroup.
:meth:`Sandboxes.start` runs one environment's or instance's process confined
the way the cloud confines it; :meth:`Sandboxes.teardown` kills it by PID and
removes what it made.

Everything here is blocking (subprocess calls, cgroupfs writes) and runs in an
emulator's thread pool, never on its event loop.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .netns import Bridge, NetnsHost, netns_available, nft_available

logger = logging.getLogger(__name__)

CGROUP_V1_MEMORY = Path("/sys/fs/cgroup/memory")


# --------------------------------------------------------------------- memory


class CgroupV1Memory:
    """A parent memory cgroup (v1) owned by one emulator; one child per environment."""

    def __init__(self, parent: Path):
        self.parent = parent

    @classmethod
    def detect(cls, tag: str) -> CgroupV1Memory | None:
        """Make ``<somewhere writable>/dask-lithops-<tag>`` or return None."""
        if not (CGROUP_V1_MEMORY / "memory.limit_in_bytes").exists():
            return None
        candidates = []
        try:
            for line in Path("/proc/self/cgroup").read_text().splitlines():
                _, controllers, path = line.split(":", 2)
                if "memory" in controllers.split(","):
                    candidates.append(CGROUP_V1_MEMORY / path.lstrip("/"))
        except OSError:
            pass
        candidates.append(CGROUP_V1_MEMORY)
        for base in candidates:
            parent = base / f"dask-lithops-{tag}"
            try:
                parent.mkdir()
            except OSError:
                continue
            if (parent / "memory.limit_in_bytes").exists():
                return cls(parent)
            _rmdir(parent)
        return None

    def create(self, name: str, limit_bytes: int) -> Path:
        d = self.parent / name
        d.mkdir()
        (d / "memory.limit_in_bytes").write_text(str(limit_bytes))
        memsw = d / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            try:  # no swapping past the limit either (like Lambda, which has no swap)
                memsw.write_text(str(limit_bytes))
            except OSError:
                pass
        try:
            (d / "memory.swappiness").write_text("0")
        except OSError:
            pass
        return d

    @staticmethod
    def pids(d: Path) -> list[int]:
        try:
            return [int(p) for p in (d / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    @staticmethod
    def oom_killed(d: Path) -> bool:
        try:
            for line in (d / "memory.oom_control").read_text().splitlines():
                k, _, v = line.partition(" ")
                if k == "oom_kill" and int(v) > 0:
                    return True
            return False
        except (OSError, ValueError):
            return False

    @staticmethod
    def hit_limit(d: Path) -> bool:
        """The cgroup's usage reached its limit at least once (memory.failcnt)."""
        try:
            return int((d / "memory.failcnt").read_text()) > 0
        except (OSError, ValueError):
            return False

    @staticmethod
    def max_usage(d: Path) -> int | None:
        try:
            return int((d / "memory.max_usage_in_bytes").read_text())
        except (OSError, ValueError):
            return None

    def remove(self, d: Path) -> None:
        _kill_until_empty(lambda: self.pids(d))
        _rmdir(d)

    def close(self) -> None:
        if self.parent.exists():
            for child in self.parent.iterdir():
                if child.is_dir():
                    self.remove(child)
            _rmdir(self.parent)


def _rmdir(d: Path, wait: float = 5.0) -> None:
    deadline = time.monotonic() + wait
    while True:
        try:
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                logger.warning("could not remove cgroup %s: %s", d, e)
                return
            time.sleep(0.02)


def _kill_until_empty(pids_fn, wait: float = 5.0) -> None:
    deadline = time.monotonic() + wait
    while True:
        pids = pids_fn()
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            return
        time.sleep(0.02)


# ------------------------------------------------------------------ sandboxes


def sandbox_unavailable() -> str | None:
    """Why environments cannot be network sandboxes here (None when they can)."""
    reason = netns_available()
    if reason:
        return reason
    if not nft_available():
        return "nft (nftables) is not installed"
    return None


class SandboxPool:
    """Outbound-only namespaces on one bridge, a few made ahead of need."""

    def __init__(self, bridge: Bridge, prewarm: int = 2, inbound_ports: tuple = ()):
        self.bridge = bridge
        self.prewarm = prewarm
        self.inbound_ports = tuple(inbound_ports)
        self._ready: list[NetnsHost] = []
        self._lock = threading.Lock()
        self._live: dict[str, NetnsHost] = {}
        self._closed = False
        self._refilling = False

    def _make(self) -> NetnsHost:
        with self._lock:
            address = self.bridge.next_address()
        ns = NetnsHost(self.bridge, address=address, inbound=False,
                       name=f"dlns{uuid.uuid4().hex[:8]}", inbound_ports=self.inbound_ports)
        with self._lock:
            self._live[ns.name] = ns
        try:
            ns.create()
        except Exception:
            with self._lock:
                self._live.pop(ns.name, None)
                self.bridge.release_address(address)
            raise
        return ns

    def acquire(self) -> NetnsHost:
        with self._lock:
            ns = self._ready.pop() if self._ready else None
        return ns if ns is not None else self._make()

    def refill(self) -> None:
        with self._lock:
            if self._refilling or self._closed:
                return
            self._refilling = True
        try:
            while True:
                with self._lock:
                    if self._closed or len(self._ready) >= self.prewarm:
                        return
                ns = self._make()
                with self._lock:
                    if self._closed:
                        break
                    self._ready.append(ns)
                    ns = None
            if ns is not None:
                self.destroy(ns)
        finally:
            with self._lock:
                self._refilling = False

    def destroy(self, ns: NetnsHost) -> None:
        ns.delete()
        with self._lock:
            self._live.pop(ns.name, None)

    def names(self) -> list[str]:
        with self._lock:
            return list(self._live)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            live = list(self._live.values())
            self._ready.clear()
        for ns in live:
            self.destroy(ns)


# ---------------------------------------------------------------- environment


#: the system's directories a private root shows (read-only); symlinks among them are copied
SYSTEM_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc")


def filesystem_unavailable() -> str | None:
    """Why processes cannot get a private root here (None when they can)."""
    if os.geteuid() != 0:
        return "not root"
    return None


@dataclass
class Filesystem:
    """What a confined process sees instead of this machine's files.

    A private mount namespace whose root is ``skeleton`` (read-only): the system's
    ``/usr``, ``/bin``, ``/lib*``, ``/etc`` bound read-only, ``binds`` (path inside ->
    host directory, read-only), a private tmpfs ``/tmp`` of ``tmp_mb``, ``/dev`` with
    a private ``/dev/shm``, ``/proc`` and ``/sys``; ``masks`` (paths inside) are
    covered by empty directories.  The process runs as ``user`` ("uid:gid") in
    ``cwd``, so the client's files -- its ``/tmp``, home and project directories --
    are not there.  Mounts live and die with the process's mount namespace; the
    host sees only the skeleton (empty mount points and the system's symlinks),
    made once per emulator and shared by its processes.
    """

    skeleton: Path
    binds: dict
    cwd: str
    user: str
    tmp_mb: int = 512
    masks: tuple = ()

    def __post_init__(self):
        system = {f"/{d}": f"/{d}" for d in SYSTEM_DIRS
                  if os.path.isdir(f"/{d}") and not os.path.islink(f"/{d}")}
        self.binds = {**system, **self.binds}
        self._make_skeleton()

    def _make_skeleton(self) -> None:
        self.skeleton.mkdir(parents=True, exist_ok=True)
        for d in SYSTEM_DIRS:
            link = self.skeleton / d
            if os.path.islink(f"/{d}") and not os.path.islink(link):
                try:
                    os.symlink(os.readlink(f"/{d}"), link)
                except FileExistsError:  # another thread made it
                    pass
        for inside in [*self.binds, "/tmp", "/proc", "/dev", "/sys"]:
            (self.skeleton / inside.lstrip("/")).mkdir(parents=True, exist_ok=True)
        os.chmod(self.skeleton, 0o755)

    def wrap(self, command: list[str]) -> list[str]:
        spec = {"root": str(self.skeleton), "binds": [[str(h), i] for i, h in self.binds.items()],
                "masks": list(self.masks), "tmp_mb": self.tmp_mb, "user": self.user,
                "cwd": self.cwd, "command": list(command)}
        python = getattr(sys, "_base_executable", None) or sys.executable
        return [python, "-I", "-S", str(Path(__file__).with_name("enter_root.py")),
                json.dumps(spec)]


def interpreter_binds(python_home: str | None = None) -> tuple[dict, tuple]:
    """The base interpreter's installation, for :class:`Filesystem`: (binds, masks).

    A venv's ``bin/python`` links to the base interpreter, which must stay reachable
    inside; its own site-packages (the client's installed packages) are masked.
    """
    prefix = python_home or sys.base_prefix
    site = f"{prefix}/lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages"
    binds = {} if prefix.startswith("/usr") else {prefix: prefix}
    return binds, (site,)


@dataclass
class ProcessHandle:
    """What starting one environment made; everything needed to tear it down."""

    proc: subprocess.Popen
    pid: int
    stdout_fd: int
    netns: NetnsHost | None = None
    cgroup: Path | None = None
    tmpdir: Path | None = None
    memory_mode: str = "none"
    extra: dict = field(default_factory=dict)


def start_process(command: list[str], *, env: dict, cwd: str, memory_mb: int,
                  netns: NetnsHost | None, cgroups: CgroupV1Memory | None, name: str,
                  tmpdir: Path | None, filesystem: Filesystem | None = None) -> ProcessHandle:
    """Start ``command`` confined to ``memory_mb`` (cgroup, else RLIMIT_AS) inside ``netns``,
    seeing ``filesystem`` (paths in ``command`` and ``cwd`` are then paths inside it)."""
    limit = memory_mb * 1024 * 1024
    cgroup = None
    if cgroups is not None:
        cgroup = cgroups.create(name, limit)
        # join the cgroup before exec so the interpreter is limited from its first byte
        script = 'echo $$ > "$0/cgroup.procs" && exec "$@"'
        prefix = ["/bin/sh", "-c", script, str(cgroup)]
        memory_mode = "cgroup-v1"
    else:
        # RLIMIT_AS counts address space, not RSS: a bare interpreter maps ~100 MB more
        # than it touches, so the limit is the function's memory plus that headroom
        kb = (limit + 256 * 1024 * 1024) // 1024
        script = 'ulimit -v "$0" && exec "$@"'
        prefix = ["/bin/sh", "-c", script, str(kb)]
        memory_mode = "rlimit-as"
    # the wrapper runs on the host side: ``ip netns exec`` remounts /sys, hiding cgroupfs
    if filesystem is not None:
        command, cwd = filesystem.wrap(command), "/"
    args = prefix + (netns.command(command) if netns is not None else list(command))
    try:
        proc = subprocess.Popen(
            args, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
            close_fds=True)
    except Exception:
        if cgroup is not None:
            cgroups.remove(cgroup)
        raise
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    return ProcessHandle(proc=proc, pid=proc.pid, stdout_fd=fd, netns=netns, cgroup=cgroup,
                         tmpdir=tmpdir, memory_mode=memory_mode)


def kill_process(h: ProcessHandle) -> None:
    """SIGKILL the environment's process and everything it started (by PID)."""
    # Only while the leader is unreaped is its PID (and process group) still ours; after
    # that the number may belong to a new process, so children are found by cgroup/netns.
    if h.proc.returncode is None:
        try:
            os.killpg(h.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            os.kill(h.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if h.cgroup is not None:
        for pid in CgroupV1Memory.pids(h.cgroup):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def teardown(h: ProcessHandle, cgroups: CgroupV1Memory | None, pool: SandboxPool | None) -> None:
    """Kill, reap and remove everything one environment made (blocking)."""
    kill_process(h)
    try:
        h.proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        logger.warning("environment process %d did not die", h.pid)
    if h.netns is not None and pool is not None:
        pool.destroy(h.netns)  # kills whatever is left in the namespace by PID
    if h.cgroup is not None and cgroups is not None:
        cgroups.remove(h.cgroup)
    try:
        h.proc.stdout.close()
    except OSError:
        pass
    if h.tmpdir is not None:
        shutil.rmtree(h.tmpdir, ignore_errors=True)


def vm_hwm_bytes(pid: int) -> int | None:
    """Peak resident memory of a live process (what REPORT calls Max Memory Used)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


EXIT_SIGNAL_NAMES = {
    signal.SIGKILL: "killed", signal.SIGTERM: "terminated", signal.SIGSEGV: "segmentation fault",
    signal.SIGABRT: "aborted", signal.SIGBUS: "bus error", signal.SIGINT: "interrupt",
}


def exit_description(returncode: int) -> str:
    """Describe an exit the way Lambda's runtime does ("signal: killed", "exit status 1")."""
    if returncode < 0:
        try:
            sig = signal.Signals(-returncode)
            return "signal: " + EXIT_SIGNAL_NAMES.get(sig, sig.name.lower())
        except ValueError:
            return f"signal: {-returncode}"
    return f"exit status {returncode}"


# ----------------------------------------------------------- host firewall


class HostFirewall:
    """An nftables table that stops a bridge's namespaces from reaching this host.

    Connections from the bridge to any address of this machine are dropped except
    to the ``(address, port)`` pairs allowed (a cloud's own endpoints: the Runtime
    API, the control API, the test world's AWS endpoints).  Traffic the host routes
    on to other namespaces ("the internet") is forwarded, not input, and passes.
    """

    def __init__(self, bridge: Bridge, tag: str):
        self.bridge = bridge
        self.table = f"dask_lithops_host_{tag}"
        self.created = False

    def _nft(self, script: str) -> None:
        subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True,
                       capture_output=True)

    def create(self) -> HostFirewall:
        self._nft(f"""
table inet {self.table} {{
    set allowed {{ type ipv4_addr . inet_service; }}
    chain input {{
        type filter hook input priority -10; policy accept;
        iifname "{self.bridge.name}" ct state established,related accept
        iifname "{self.bridge.name}" ip daddr . tcp dport @allowed accept
        iifname "{self.bridge.name}" drop
    }}
}}
""")
        self.created = True
        return self

    def allow(self, address: str, port: int) -> None:
        self._nft(f"add element inet {self.table} allowed {{ {address} . {int(port)} }}\n")

    def disallow(self, address: str, port: int) -> None:
        try:
            self._nft(f"delete element inet {self.table} allowed {{ {address} . {int(port)} }}\n")
        except subprocess.CalledProcessError:
            pass

    def delete(self) -> None:
        if self.created:
            subprocess.run(["nft", "delete", "table", "inet", self.table], capture_output=True)
            self.created = False


class TcpForwarder:
    """Forward connections from ``listen_host`` (a port of its own) to ``target``.

    Runs on an asyncio loop.  It makes a loopback-only service of the test world
    (moto) reachable from the sandboxes at the bridge's gateway, without binding
    that service to every interface of the machine.
    """

    def __init__(self, listen_host: str, target: tuple[str, int]):
        self.listen_host, self.target = listen_host, target
        self.port = 0
        self._server = None

    async def start(self) -> TcpForwarder:
        import asyncio

        self._server = await asyncio.start_server(self._handle, self.listen_host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader, writer) -> None:
        import asyncio

        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return

        async def pipe(r, w):
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                w.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None


# ------------------------------------------------------------ one emulator's


_unsandboxed_warned: set[str] = set()


class Sandboxes:
    """The host side of one emulator's sandboxes, made by :meth:`open`, removed by :meth:`close`.

    ``inbound_ports``: TCP ports of each namespace the host (the bridge's gateway) may
    connect to (a front end reaching its instances); nothing else gets in.
    ``host_reachable=False`` (needs the network sandboxes) drops every connection from
    the sandboxes to this host except to the endpoints :meth:`allow` names.
    ``requested``: ``True`` requires network sandboxes (outbound-only namespaces on
    a bridge of their own), ``False`` never makes them, ``None`` makes them when
    the machine can and warns once (per ``what``) when it cannot.  The memory limit
    is a v1 memory cgroup per process when cgroupfs is writable, else RLIMIT_AS.
    """

    def __init__(self, tag: str, requested: bool | None = None, prewarm: int = 2,
                 what: str = "emulator", inbound_ports: tuple = (), host_reachable: bool = True):
        self.tag, self.requested, self.prewarm, self.what = tag, requested, prewarm, what
        self.inbound_ports = tuple(inbound_ports)
        self.host_reachable = host_reachable
        self.firewall: HostFirewall | None = None
        self.sandboxed = False
        self.reason: str | None = None
        self.host_address = "127.0.0.1"
        self.bridge: Bridge | None = None
        self.pool: SandboxPool | None = None
        self.cgroups: CgroupV1Memory | None = None

    def open(self) -> Sandboxes:
        reason = sandbox_unavailable() if self.requested is not False else "sandbox=False"
        if (self.requested or not self.host_reachable) and reason:
            why = "" if self.requested else " (host_reachable=False needs the network sandbox)"
            raise RuntimeError(f"the {self.what} cannot sandbox environments here{why}: "
                               f"{reason}")
        self.sandboxed = reason is None
        self.reason = reason
        if not self.sandboxed and self.requested is None and self.what not in _unsandboxed_warned:
            _unsandboxed_warned.add(self.what)
            logger.warning("%s: environments run unsandboxed (they accept inbound connections, "
                           "unlike the cloud's): %s", self.what, reason)
        try:
            self.cgroups = CgroupV1Memory.detect(self.tag)
            if self.sandboxed:
                self.bridge = Bridge().create()
                self.host_address = self.bridge.gateway
                self.pool = SandboxPool(self.bridge, prewarm=self.prewarm,
                                        inbound_ports=self.inbound_ports)
                if not self.host_reachable:
                    self.firewall = HostFirewall(self.bridge, self.tag).create()
        except BaseException:
            self.close()
            raise
        return self

    @property
    def memory_limit_mode(self) -> str:
        return "cgroup-v1" if self.cgroups is not None else "rlimit-as"

    def allow(self, address: str, port: int) -> None:
        """Let the sandboxes reach ``address:port`` on this host (host_reachable=False)."""
        if self.firewall is not None:
            self.firewall.allow(address, port)

    def disallow(self, address: str, port: int) -> None:
        if self.firewall is not None:
            self.firewall.disallow(address, port)

    def refill(self) -> None:
        """Make namespaces ahead of need (blocking; run it in a thread pool)."""
        if self.pool is not None:
            self.pool.refill()

    def start(self, command: list[str], *, env: dict, cwd: str, memory_mb: int, name: str,
              tmpdir: Path | None = None, filesystem: Filesystem | None = None) -> ProcessHandle:
        """Start one confined process (blocking); ``tmpdir`` is removed at teardown."""
        ns = self.pool.acquire() if self.pool is not None else None
        try:
            return start_process(command, env=env, cwd=cwd, memory_mb=memory_mb, netns=ns,
                                 cgroups=self.cgroups, name=name, tmpdir=tmpdir,
                                 filesystem=filesystem)
        except Exception:
            if ns is not None:
                self.pool.destroy(ns)
            raise

    def teardown(self, h: ProcessHandle) -> None:
        teardown(h, self.cgroups, self.pool)

    def names(self) -> list[str]:
        return self.pool.names() if self.pool is not None else []

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        if self.firewall is not None:
            self.firewall.delete()
        if self.bridge is not None:
            self.bridge.delete()
        if self.cgroups is not None:
            self.cgroups.close()
