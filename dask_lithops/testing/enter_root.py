"""Enter a private root, then exec a command: ``python -I -S enter_root.py '<json spec>'``.

Run by :class:`dask_lithops.testing.sandbox.Filesystem` between ``ip netns exec``
and the confined command.  It makes a mount namespace of its own, mounts the
skeleton read-only at itself, binds the spec's directories read-only onto it,
masks what must not be seen, mounts a private tmpfs ``/tmp``, ``/proc``,
``/dev`` (with a private ``/dev/shm``) and ``/sys``, chroots there, drops to an
unprivileged user and execs the command -- all with system calls in this one
process (a shell running ``mount`` ~20 times cost ~3x as much per cold start).
Standard library only; nothing else is importable here.
"""

import ctypes
import json
import os
import sys

CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18

_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _enc(v):
    return v.encode() if v is not None else None


def mount(source, target, fstype=None, flags=0, data=None):
    enc = _enc
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {source} on {target}")


def bind_ro(source: str, target: str, recursive: bool = False) -> None:
    mount(source, target, None, MS_BIND | (MS_REC if recursive else 0))
    mount("none", target, None, MS_REMOUNT | MS_BIND | MS_RDONLY)


def main(spec: dict) -> None:
    root = spec["root"]
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    mount("none", "/", None, MS_REC | MS_PRIVATE)
    bind_ro(root, root)
    for source, inside in spec["binds"]:
        bind_ro(source, root + inside)
    for inside in spec["masks"]:
        if os.path.isdir(root + inside):
            mount("dl-mask", root + inside, "tmpfs", MS_RDONLY, "mode=0755,size=4k")
    mount("dl-tmp", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV,
          f"mode=1777,size={int(spec['tmp_mb'])}m")
    mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount("/dev", root + "/dev", None, MS_BIND | MS_REC)
    mount("dl-shm", root + "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=64m")
    try:
        mount("sysfs", root + "/sys", "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError:
        pass  # some kernels refuse it here; nothing the functions run needs /sys
    os.chroot(root)
    os.chdir(spec["cwd"])
    uid, gid = (int(x) for x in spec["user"].split(":"))
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    command = spec["command"]
    os.execvpe(command[0], command, os.environ)


if __name__ == "__main__":
    try:
        main(json.loads(sys.argv[1]))
    except OSError as e:
        print(f"dask-lithops sandbox: cannot enter the private root: {e}", file=sys.stderr)
        sys.exit(126)
