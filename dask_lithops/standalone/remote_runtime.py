"""The runtime on an SSH host: which Python runs the workers, with which packages.

One remote Python snippet per host reports its Python, every distribution
installed in it, its cores, ``$HOME`` and ``$SSH_CONNECTION`` (the client's
address as the host sees it).  When that Python already has the runtime's
distributions at the client's versions it is used as it is; otherwise they
are installed into a per-runtime venv ``<remote_dir>/runtimes/<key>`` (built
once under a file lock, reused by every later cluster with the same set), or,
with installation disabled, a :class:`RuntimeMismatchError` names the host and
the mismatched versions.

What the venv holds is :func:`dask_lithops.runtime.contents.host_contents`:
with package sync every distribution of the client's environment, at the
client's exact versions, as wheels made on the client
(:mod:`dask_lithops.runtime.wheels`) and uploaded (hosts need no index).

dask-lithops itself (pure Python) is shipped to ``<remote_dir>/code/<hash>``
with a ``.dist-info`` (so its entry points, e.g. the ``relay://`` comm, are
found) and put first on ``PYTHONPATH`` for the processes we start.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field

from dask_lithops.payload import RUNTIME_PACKAGES
from dask_lithops.progress import SILENT, Progress, format_bytes
from dask_lithops.runtime import code, contents, wheels

from .ssh_transport import SSHConnection, SSHError, quote

# Must equal the client's exactly: a mismatch breaks pickled tasks and messages.
MATCH_PACKAGES = RUNTIME_PACKAGES
READY_MARKER = ".dask-lithops-ready"


class RuntimeMismatchError(SSHError):
    """The host's runtime differs from the client's and may not (or cannot) be fixed."""


class MissingDistributionsWarning(UserWarning):
    """Distributions of the client's environment that the hosts' runtime cannot have."""


@dataclass
class RuntimeSpec:
    """What the client expects on every host; ``key`` names the venv."""

    python: str
    packages: dict[str, str]  # the must-match packages' versions
    entries: list[contents.Entry] = field(default_factory=list)  # every distribution of the venv
    extra_packages: list[str] = field(default_factory=list)
    package_sync: bool = True
    local_wheels: dict = field(default_factory=dict)  # name -> (wheel path or None, hash or why)
    _houses: dict = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def requirements(self) -> list[str]:
        return [e.pin for e in self.entries]

    @property
    def key(self) -> str:
        items = sorted(f"{e.pin}#{self.local_wheels.get(e.name, (None, ''))[1]}"
                       if e.source != "index" else e.pin for e in self.entries)
        blob = json.dumps({"python": self.python, "distributions": items}, sort_keys=True)
        return f"py{self.python}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"

    def wheelhouse(self, target: wheels.Target, progress: Progress = SILENT) -> wheels.Wheelhouse:
        """The wheels for ``target`` (made once per spec and platform; warns about the missing)."""
        with self._lock:
            house = self._houses.get(target)
            if house is None:
                house = wheels.fetch(self.entries, target, self.local_wheels, progress)
                self._houses[target] = house
                if house.missing:
                    warnings.warn(MissingDistributionsWarning(
                        f"{len(house.missing)} distributions of this client's environment cannot "
                        f"be installed on {target.key} hosts and are left out of their runtime: "
                        + "; ".join(f"{n} ({why})" for n, why in sorted(house.missing.items()))
                        + ". Code that imports them fails on the workers; install them on the "
                          "hosts' Python or remove them here."), stacklevel=2)
            return house


def client_runtime(extra_python_packages: list[str] | tuple = (), package_sync: bool | None = None,
                   progress: Progress = SILENT) -> RuntimeSpec:
    """The client's runtime for hosts: with ``package_sync`` (default
    ``lithops.runtime.package_sync``) every installed distribution at its exact
    version, else dask-lithops' dependencies; plus ``extra_python_packages``
    (installed on the client: they are shipped at the client's version)."""
    from dask_lithops import config

    if package_sync is None:
        package_sync = bool(config.get("runtime.package_sync"))
    python = "%d.%d" % sys.version_info[:2]
    dists = contents.installed()
    packages = {name: dists[name].version if name in dists else None for name in MATCH_PACKAGES}
    missing = [k for k, v in packages.items() if v is None]
    if missing:
        raise RuntimeError(f"the client lacks {missing}; cannot define a runtime")
    extras = [e.strip() for e in extra_python_packages or ()]
    entries = contents.host_contents(extras, package_sync, dists)
    spec = RuntimeSpec(python, packages, entries, extras, package_sync)
    local = [e for e in entries if e.source != "index"]
    if local:
        with progress.phase(f"building wheels of {len(local)} local distributions "
                            f"({', '.join(e.name for e in local)})"):
            spec.local_wheels = wheels.build_local_wheels(local)
    return spec


def code_bundle() -> tuple[str, bytes]:
    """(hash, tar.gz) of the dask_lithops package plus a minimal .dist-info."""
    return code.host_bundle()


# -- wheels from the client (hosts need no package index) --------------------------------------
LOCK_WHEELS = r"""
import fcntl, json, os, sys
a = json.loads(sys.argv[1])
os.makedirs(a["wheels"], exist_ok=True)
lock = open(a["wheels"] + ".lock", "w")
fcntl.flock(lock, fcntl.LOCK_EX)
present = {n: os.path.getsize(os.path.join(a["wheels"], n))
           for n in os.listdir(a["wheels"]) if n.endswith(".whl")}
print(json.dumps({"ready": os.path.exists(a["ready"]), "present": present}), flush=True)
sys.stdin.read()
"""


def upload_wheelhouse(conn: SSHConnection, python: str, house: wheels.Wheelhouse,
                      remote_dir: str, ready_marker: str, phase=None) -> bool:
    """Copy the wheels the host lacks into ``remote_dir`` under a host-side lock (hosts sharing
    a filesystem upload once).  False when the venv got ready meanwhile (nothing to do)."""
    chan = conn.exec_channel(python_command(
        [python], LOCK_WHEELS,
        {"wheels": remote_dir, "ready": ready_marker}))
    try:
        line = b""
        deadline = time.monotonic() + 3600
        while not line.endswith(b"\n"):
            if chan.recv_ready():
                data = chan.recv(65536)
                if not data:
                    break
                line += data
            elif chan.exit_status_ready() or time.monotonic() > deadline:
                break
            else:
                time.sleep(0.05)
        try:
            state = json.loads(line.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            err = chan.recv_stderr(65536).decode(errors="replace")
            raise RuntimeMismatchError(str(conn), f"locking {remote_dir} failed: {err[-2000:]}") \
                from None
        if state["ready"]:
            return False
        todo = [p for p in house.wheels.values()
                if state["present"].get(p.name) != p.stat().st_size]
        total = sum(p.stat().st_size for p in todo)
        if phase is not None:
            phase.set_total((phase.record.total or 0) + total, "B")
        sftp = conn.sftp
        for p in todo:
            tmp = f"{remote_dir}/.{p.name}.{uuid.uuid4().hex[:6]}"
            sent = [0]

            def callback(done, _total, sent=sent):
                if phase is not None:
                    phase.advance(done - sent[0])
                sent[0] = done

            sftp.put(str(p), tmp, callback=callback)
            sftp.posix_rename(tmp, f"{remote_dir}/{p.name}")
        return True
    finally:
        chan.shutdown_write()
        chan.close()


# -- remote snippets ---------------------------------------------------------------------------
PROBE = r"""
import json, os, re, sys
a = json.loads(sys.argv[1])
from importlib.metadata import distributions
dists = {}
for d in distributions():
    n = d.metadata["Name"]
    if n:
        dists.setdefault(re.sub(r"[-_.]+", "-", n).lower(), d.version)
def v(n):
    return dists.get(n)
home = os.path.expanduser("~")
rd = os.path.abspath(os.path.expanduser(a["remote_dir"]))
venv = os.path.join(rd, "runtimes", a["key"])
conn = os.environ.get("SSH_CONNECTION", "").split()
reachable = None
if a.get("reach_port") and conn:
    import socket
    try:
        socket.create_connection((conn[0], a["reach_port"]), timeout=3).close()
        reachable = True
    except OSError:
        reachable = False
import platform
print(json.dumps({
    "client_reachable": reachable, "machine": platform.machine(), "system": platform.system(),
    "python": sys.executable, "version": "%d.%d.%d" % sys.version_info[:3],
    "packages": {n: v(n) for n in a["packages"]}, "distributions": dists,
    "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    "home": home, "remote_dir": rd,
    "ssh_connection": os.environ.get("SSH_CONNECTION", ""),
    "venv_ready": os.path.exists(os.path.join(venv, a["marker"])),
    "venv_python": os.path.join(venv, "bin", "python"),
    "code_present": os.path.isdir(os.path.join(rd, "code", a["code"], "dask_lithops")),
}))
"""

INSTALL_CODE = r"""
import json, os, shutil, sys, tarfile
a = json.loads(sys.argv[1])
dest = a["dest"]
if not os.path.isdir(os.path.join(dest, "dask_lithops")):
    tmp = dest + ".tmp-" + a["nonce"]
    os.makedirs(tmp)
    with tarfile.open(a["tar"]) as t:
        t.extractall(tmp)
    try:
        os.rename(tmp, dest)
    except OSError:  # another host sharing this filesystem got there first
        shutil.rmtree(tmp, ignore_errors=True)
os.unlink(a["tar"])
"""

BUILD_VENV = r"""
import fcntl, json, os, shutil, subprocess, sys
a = json.loads(sys.argv[1])
d = a["dir"]
os.makedirs(os.path.dirname(d), exist_ok=True)
with open(d + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    ready = os.path.join(d, a["marker"])
    if not os.path.exists(ready):
        shutil.rmtree(d, ignore_errors=True)
        with open(d + ".install.log", "w") as log:
            def step(cmd):
                log.write("$ " + " ".join(cmd) + "\n"); log.flush()
                r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
                if r.returncode:
                    log.close()
                    sys.stderr.write(open(d + ".install.log").read()[-4000:])
                    sys.exit(r.returncode)
            step([sys.executable, "-m", "venv", d])
            py = os.path.join(d, "bin", "python")
            step([py, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
                  "--progress-bar", "off", "--no-index", "--no-deps", "--no-compile",
                  *[os.path.join(a["wheels"], f) for f in a["files"]]])
        with open(ready, "w") as f:
            json.dump({"files": a["files"]}, f)
print(os.path.join(d, "bin", "python"))
"""


def _python_candidates(spec: RuntimeSpec, remote_python: str | None) -> list[str]:
    if remote_python:
        return [remote_python]
    return [f"python{spec.python}", "python3", "python"]


def python_command(candidates: list[str], snippet: str, arg: dict) -> str:
    """A shell command running ``snippet`` with the first Python found among ``candidates``."""
    tries = " ".join(quote(c) for c in candidates)
    return (f"for p in {tries}; do if command -v \"$p\" >/dev/null 2>&1; then "
            f"exec \"$p\" -c {quote(snippet)} {quote(json.dumps(arg))}; fi; done; "
            f"echo 'dask-lithops: no Python found on this host (tried {' '.join(candidates)})' >&2; "
            "exit 127")


@dataclass
class HostRuntime:
    """What a host will run: ``python`` (+ ``env``) and facts from the probe."""

    python: str
    env: dict
    cpu_count: int
    remote_dir: str
    home: str
    client_address: str | None
    server_address: str | None = None  # the host's own address, as the client reached it
    client_reachable: bool | None = None
    installed: bool = False  # a venv was built for this host (this time)
    probe: dict = field(default_factory=dict)


def prepare_host(conn: SSHConnection, spec: RuntimeSpec, remote_dir: str = "~/.dask-lithops",
                 remote_python: str | None = None, install_runtime: bool = True,
                 install_timeout: float = 900.0, reach_port: int | None = None,
                 progress: Progress = SILENT) -> HostRuntime:
    """Probe ``conn``'s host; make a runtime matching ``spec`` there (blocking)."""
    code_hash, tarball = code_bundle()
    probe_arg = {"remote_dir": remote_dir, "key": spec.key, "marker": READY_MARKER,
                 "packages": list(spec.packages), "code": code_hash,
                 "reach_port": reach_port}
    r = conn.run(python_command(_python_candidates(spec, remote_python), PROBE, probe_arg),
                 timeout=60, check=False)
    if r.returncode == 127 or r.returncode != 0:
        raise RuntimeMismatchError(str(conn), (r.stderr.strip() or r.stdout.strip())[-2000:]
                                   or f"probe failed with exit code {r.returncode}")
    probe = json.loads(r.stdout.strip().splitlines()[-1])
    rd = probe["remote_dir"]
    host_py = ".".join(probe["version"].split(".")[:2])
    if host_py != spec.python:
        raise RuntimeMismatchError(
            str(conn), f"Python {probe['version']} at {probe['python']} but the client runs "
                       f"Python {spec.python}; install python{spec.python} on the host or point "
                       f"remote_python at one")
    have = probe.get("distributions") or {}
    diff = {e.name: (e.version, have.get(e.name)) for e in spec.entries
            if have.get(e.name) != e.version}
    python = probe["python"]
    installed = False
    if diff:
        if probe["venv_ready"]:
            python = probe["venv_python"]
        elif not install_runtime:
            first = sorted(diff, key=lambda n: (n not in MATCH_PACKAGES, n))
            detail = "; ".join(f"{k}: client {diff[k][0]}, host {diff[k][1] or 'not installed'}"
                               for k in first[:12])
            if len(first) > 12:
                detail += f"; and {len(first) - 12} more"
            raise RuntimeMismatchError(
                str(conn), f"runtime at {probe['python']} does not match the client ({detail}) "
                           "and install_runtime=False; install the client's versions on the host "
                           "or allow installation")
        else:
            python = _install_venv(conn, spec, probe, install_timeout, progress)
            installed = True
    code_dir = f"{rd}/code/{code_hash}"
    if not probe["code_present"]:
        nonce = uuid.uuid4().hex[:8]
        conn.run(f"mkdir -p {quote(rd + '/code')} && chmod 700 {quote(rd)}", timeout=30)
        tar_path = f"{rd}/code/{code_hash}.{nonce}.tar.gz"
        conn.put(tarball, tar_path, mode=0o600)
        conn.run(python_command([python], INSTALL_CODE,
                                {"dest": code_dir, "tar": tar_path, "nonce": nonce}), timeout=60)
    ssh_connection = probe.get("ssh_connection", "").split()
    return HostRuntime(python=python, env={"PYTHONPATH": code_dir}, cpu_count=probe["cpu_count"],
                       remote_dir=rd, home=probe["home"],
                       client_address=ssh_connection[0] if ssh_connection else None,
                       server_address=ssh_connection[2] if len(ssh_connection) > 2 else None,
                       client_reachable=probe.get("client_reachable"),
                       installed=installed, probe=probe)


def _install_venv(conn: SSHConnection, spec: RuntimeSpec, probe: dict, timeout: float,
                  progress: Progress) -> str:
    """Upload the runtime's wheels and build its venv on the host; the venv's python."""
    rd = probe["remote_dir"]
    venv = f"{rd}/runtimes/{spec.key}"
    target = wheels.Target(spec.python, probe.get("system") or "Linux",
                           probe.get("machine") or "x86_64", probe.get("version"))
    house = spec.wheelhouse(target, progress)
    with progress.phase(f"{conn}: uploading {len(house.wheels)} wheels") as ph:
        uploaded = upload_wheelhouse(conn, probe["python"], house, f"{rd}/wheels",
                                     f"{venv}/{READY_MARKER}", ph)
        ph.detail = (f"{format_bytes(ph.record.done)} sent" if uploaded
                     else "venv built meanwhile by a host sharing this filesystem")
    with progress.phase(f"{conn}: installing the runtime venv {spec.key}") as ph:
        build_arg = {"dir": venv, "marker": READY_MARKER, "wheels": f"{rd}/wheels",
                     "files": sorted(p.name for p in house.wheels.values())}
        r = conn.run(python_command([probe["python"]], BUILD_VENV, build_arg),
                     timeout=timeout, check=False)
        if r.returncode != 0:
            raise RuntimeMismatchError(
                str(conn), f"installing the runtime venv {venv} failed "
                           f"(exit {r.returncode}):\n{r.stderr.strip()[-3000:]}")
        ph.detail = f"{len(house.wheels)} distributions, {format_bytes(house.size)} of wheels"
    return r.stdout.strip().splitlines()[-1]
