"""Starting, watching and stopping processes on an SSH host (blocking; run in the SSH pool).

A worker group is N detached processes (each its own session, so nanny and
worker stop together) started by one remote Python snippet, which also waits
until each reports ``DASK_LITHOPS_READY`` (or fails) in its log.  Payloads
travel over SFTP into 0600 files inside a 0700 directory, never on a command
line.  Stopping signals each session (SIGTERM, SIGKILL after a grace period) and
verifies from ``/proc`` that no process of those sessions remains.
"""

from __future__ import annotations

import json
import shlex

from .remote_runtime import HostRuntime, python_command
from .ssh_transport import SSHConnection

LAUNCH = r"""
import json, os, subprocess, sys, time
a = json.loads(sys.argv[1])
env = dict(os.environ, **a["env"])
procs = []
for p in a["procs"]:
    log = open(p["log"], "ab")
    proc = subprocess.Popen(p["argv"], stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, env=env,
                            cwd=a["cwd"])
    log.close()
    procs.append((p, proc))
out = {"pids": [proc.pid for _, proc in procs], "ready": {}, "errors": {}}
deadline = time.monotonic() + a["timeout"]
pending = dict((p["name"], (p, proc)) for p, proc in procs) if a["ready_mark"] else {}
while pending and time.monotonic() < deadline:
    for name, (p, proc) in list(pending.items()):
        with open(p["log"], "rb") as f:
            text = f.read().decode(errors="replace")
        for line in text.splitlines():
            if line.startswith(a["ready_mark"] + " "):
                out["ready"][name] = json.loads(line.split(" ", 1)[1])
                del pending[name]
                break
            if line.startswith(a["error_mark"] + " "):
                out["errors"][name] = json.loads(line.split(" ", 1)[1])
                del pending[name]
                break
        else:
            if proc.poll() is not None:
                out["errors"][name] = {"type": "exited", "message": "exit code %s: %s" % (
                    proc.returncode, text[-2000:])}
                del pending[name]
    time.sleep(0.02)
for name in pending:
    out["errors"][name] = {"type": "timeout",
                           "message": "not ready after %ss" % a["timeout"]}
print(json.dumps(out))
"""

STOP = r"""
import json, os, signal, sys, time
a = json.loads(sys.argv[1])
def sessions():
    found = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            continue
        sid = int(fields[3])
        if sid in wanted:
            found.setdefault(sid, []).append(int(d))
    return found
def ours(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return a["marker"].encode() in f.read()
    except OSError:
        return False
# only sessions whose leader still runs our command (PIDs may have been reused)
wanted = set(p for p in a["pids"] if ours(p) or a.get("force"))
def signal_all(sig):
    for sid, pids in sessions().items():
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
signal_all(signal.SIGTERM)
deadline = time.monotonic() + a["grace"]
while sessions() and time.monotonic() < deadline:
    time.sleep(0.05)
if sessions():
    signal_all(signal.SIGKILL)
    deadline = time.monotonic() + 5
    while sessions() and time.monotonic() < deadline:
        time.sleep(0.05)
for d in a.get("remove", []):
    try:
        os.unlink(d)
    except OSError:
        pass
print(json.dumps({"remaining": sorted(p for ps in sessions().values() for p in ps)}))
"""


def ensure_private_dirs(conn: SSHConnection, *dirs: str) -> None:
    quoted = " ".join(shlex.quote(d) for d in dirs)
    conn.run(f"umask 077 && mkdir -p {quoted} && chmod 700 {quoted}", timeout=30)


def start_processes(conn: SSHConnection, runtime: HostRuntime, procs: list[dict], cwd: str,
                    timeout: float = 120.0, ready_mark: str | None = "DASK_LITHOPS_READY",
                    error_mark: str = "DASK_LITHOPS_ERROR") -> dict:
    """Start ``procs`` ({"name", "argv", "log"}) detached; wait for their ready marks.

    Returns {"pids": [...], "ready": {name: info}, "errors": {name: info}}.
    """
    arg = {"procs": procs, "env": runtime.env, "cwd": cwd, "timeout": timeout,
           "ready_mark": ready_mark, "error_mark": error_mark}
    r = conn.run(python_command([runtime.python], LAUNCH, arg), timeout=timeout + 60)
    return json.loads(r.stdout.strip().splitlines()[-1])


def stop_processes(conn: SSHConnection, runtime: HostRuntime, pids: list[int], marker: str,
                   grace: float = 10.0, remove: list[str] = (), force: bool = False) -> list[int]:
    """SIGTERM the sessions led by ``pids`` (then SIGKILL); return PIDs still alive (none)."""
    arg = {"pids": list(pids), "marker": marker, "grace": grace, "remove": list(remove),
           "force": force}
    r = conn.run(python_command([runtime.python], STOP, arg), timeout=grace + 60)
    return json.loads(r.stdout.strip().splitlines()[-1])["remaining"]


def read_log(conn: SSHConnection, path: str, max_bytes: int = 1 << 20) -> str:
    try:
        return conn.get(path, max_bytes=max_bytes).decode(errors="replace")
    except OSError as e:
        return f"<log {path} unavailable: {e}>"
