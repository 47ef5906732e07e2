"""The runtime on an SSH host: which Python runs the workers, with which packages.

One remote Python snippet per host reports its Python, the versions of the
packages that must match the client (dask, distributed, cloudpickle, msgpack),
its cores, ``$HOME`` and ``$SSH_CONNECTION`` (the client's address as the host
sees it).  When the versions match, the host's Python is used as it is; when
they differ the client's exact versions are installed into a per-runtime venv
``<remote_dir>/runtimes/<key>`` (built once under a file lock, reused by every
later cluster), or, with installation disabled, a :class:`RuntimeMismatchError`
names the host and every mismatched version.

dask-lithops itself (pure Python) is shipped to ``<remote_dir>/code/<hash>``
with a ``.dist-info`` (so its entry points, e.g. the ``relay://`` comm, are
found) and put first on ``PYTHONPATH`` for the processes we start.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import platform
import re
import subprocess
import sys
import tarfile
import uuid
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, distribution, requires

from dask_lithops.payload import RUNTIME_PACKAGES
from dask_lithops.payload import installed_version as _version

from .ssh_transport import SSHConnection, SSHError, quote

# Must equal the client's exactly: a mismatch breaks pickled tasks and messages.
MATCH_PACKAGES = RUNTIME_PACKAGES
READY_MARKER = ".dask-lithops-ready"


class RuntimeMismatchError(SSHError):
    """The host's runtime differs from the client's and may not (or cannot) be fixed."""


def _dist_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(@]", requirement.strip(), maxsplit=1)[0]


def _base_requirements() -> list[str]:
    """dask-lithops' own (non-extra) dependencies, pinned to the client's versions."""
    try:
        reqs = requires("dask-lithops") or []
    except PackageNotFoundError:
        reqs = []
    names = [_dist_name(r) for r in reqs if "extra ==" not in r]
    return [n for n in names if n.lower() not in MATCH_PACKAGES]


@dataclass
class RuntimeSpec:
    """What the client expects on every host; ``key`` names the venv."""

    python: str
    packages: dict[str, str]
    requirements: list[str]
    extra_packages: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        blob = json.dumps({"python": self.python, "requirements": sorted(self.requirements)},
                          sort_keys=True)
        return f"py{self.python}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def client_runtime(extra_python_packages: list[str] | tuple = ()) -> RuntimeSpec:
    """The client's runtime: exact pins for dask & co, its deps, and the user's extras.

    An unpinned extra that the client has installed is pinned to the client's
    version (``"pandas"`` -> ``"pandas==2.2.3"``) so both sides pickle alike.
    """
    python = "%d.%d" % sys.version_info[:2]
    packages = {name: _version(name) for name in MATCH_PACKAGES}
    missing = [k for k, v in packages.items() if v is None]
    if missing:
        raise RuntimeError(f"the client lacks {missing}; cannot define a runtime")
    reqs = [f"{k}=={v}" for k, v in packages.items()]
    for name in _base_requirements():
        v = _version(name)
        reqs.append(f"{name}=={v}" if v else name)
    extras = []
    for req in extra_python_packages or ():
        req = req.strip()
        name = _dist_name(req)
        if req == name and _version(name):
            req = f"{name}=={_version(name)}"
        extras.append(req)
    reqs += [r for r in extras if _dist_name(r).lower() not in {_dist_name(x).lower() for x in reqs}]
    return RuntimeSpec(python, packages, reqs, extras)


# -- shipping dask-lithops itself ---------------------------------------------------------------
_CODE_CACHE: tuple[str, bytes] | None = None


def code_bundle() -> tuple[str, bytes]:
    """(hash, tar.gz) of the dask_lithops package plus a minimal .dist-info."""
    global _CODE_CACHE
    if _CODE_CACHE is not None:
        return _CODE_CACHE
    import dask_lithops

    root = os.path.dirname(os.path.abspath(dask_lithops.__file__))
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for fn in sorted(filenames):
            if fn.endswith((".py", ".yaml", ".yml", ".json", ".typed")):
                full = os.path.join(dirpath, fn)
                files.append((os.path.join("dask_lithops", os.path.relpath(full, root)), full))
    try:
        dist = distribution("dask-lithops")
        ver = dist.version
        entry_points = dist.read_text("entry_points.txt") or ""
    except PackageNotFoundError:
        ver, entry_points = dask_lithops.__version__, ""
    info = f"dask_lithops-{ver}.dist-info"
    extra = {f"{info}/METADATA": f"Metadata-Version: 2.1\nName: dask-lithops\nVersion: {ver}\n",
             f"{info}/entry_points.txt": entry_points}
    h = hashlib.sha256()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
        for arc, full in files:
            with open(full, "rb") as f:
                data = f.read()
            h.update(arc.encode() + b"\0" + data)
            ti = tarfile.TarInfo(arc)
            ti.size, ti.mode = len(data), 0o644
            tar.addfile(ti, io.BytesIO(data))
        for arc, text in extra.items():
            data = text.encode()
            h.update(arc.encode() + b"\0" + data)
            ti = tarfile.TarInfo(arc)
            ti.size, ti.mode = len(data), 0o644
            tar.addfile(ti, io.BytesIO(data))
    _CODE_CACHE = (h.hexdigest()[:16], buf.getvalue())
    return _CODE_CACHE


# -- wheels from the client (hosts need no package index) --------------------------------------
def client_wheelhouse(spec: RuntimeSpec) -> str:
    """A local directory of wheels for ``spec`` (``pip download``, once per runtime key)."""
    base = os.environ.get("DASK_LITHOPS_WHEELHOUSE") or os.path.join(
        os.path.expanduser("~/.cache"), "dask-lithops", "wheelhouse")
    d = os.path.join(base, spec.key)
    os.makedirs(base, exist_ok=True)
    with open(d + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(os.path.join(d, READY_MARKER)):
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check",
                                "--no-input", "--progress-bar", "off", "--only-binary", ":all:",
                                "-d", d, *spec.requirements], capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(f"pip download of the runtime {spec.requirements} failed:\n"
                                   f"{(r.stderr or r.stdout)[-3000:]}")
            with open(os.path.join(d, READY_MARKER), "w") as f:
                json.dump(spec.requirements, f)
    return d


def upload_wheelhouse(conn: SSHConnection, local_dir: str, remote_dir: str) -> str:
    """Copy the wheels the host lacks into ``remote_dir``; return it."""
    conn.run(f"mkdir -p {quote(remote_dir)}", timeout=30)
    present = set(conn.sftp.listdir(remote_dir))
    for fn in sorted(os.listdir(local_dir)):
        if fn.endswith(".whl") and fn not in present:
            tmp = f"{remote_dir}/.{fn}.{uuid.uuid4().hex[:6]}"
            conn.sftp.put(os.path.join(local_dir, fn), tmp)
            conn.sftp.posix_rename(tmp, f"{remote_dir}/{fn}")
    return remote_dir


# -- remote snippets ---------------------------------------------------------------------------
PROBE = r"""
import json, os, sys
a = json.loads(sys.argv[1])
from importlib.metadata import version
def v(n):
    try:
        return version(n)
    except Exception:
        return None
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
    "packages": {n: v(n) for n in a["packages"]},
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
            source = ["--no-index", "--find-links", a["wheels"]] if a.get("wheels") else []
            step([py, "-m", "pip", "install", "--disable-pip-version-check",
                  "--no-input", "--progress-bar", "off", *source, *a["requirements"]])
        with open(ready, "w") as f:
            json.dump({"requirements": a["requirements"]}, f)
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
                 upload_wheels: bool = True) -> HostRuntime:
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
    diff = {k: (v, probe["packages"].get(k)) for k, v in spec.packages.items()
            if probe["packages"].get(k) != v}
    python = probe["python"]
    installed = False
    if diff or spec.extra_packages:
        if probe["venv_ready"]:
            python = probe["venv_python"]
        elif not install_runtime:
            detail = "; ".join(f"{k}: client {c}, host {h or 'not installed'}"
                               for k, (c, h) in sorted(diff.items()))
            if spec.extra_packages:
                detail += f"; extra_python_packages {spec.extra_packages} need a runtime venv"
            raise RuntimeMismatchError(
                str(conn), f"runtime at {probe['python']} does not match the client ({detail}) "
                           "and install_runtime=False; install the client's versions on the host "
                           "or allow installation")
        else:
            build_arg = {"dir": f"{rd}/runtimes/{spec.key}", "marker": READY_MARKER,
                         "requirements": spec.requirements}
            if upload_wheels and probe.get("system") == platform.system() and \
                    probe.get("machine") == platform.machine():
                build_arg["wheels"] = upload_wheelhouse(conn, client_wheelhouse(spec),
                                                        f"{rd}/wheels")
            r = conn.run(python_command([probe["python"]], BUILD_VENV, build_arg),
                         timeout=install_timeout, check=False)
            if r.returncode != 0:
                raise RuntimeMismatchError(
                    str(conn), f"installing the runtime venv {rd}/runtimes/{spec.key} failed "
                               f"(exit {r.returncode}):\n{r.stderr.strip()[-3000:]}")
            python = r.stdout.strip().splitlines()[-1]
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
