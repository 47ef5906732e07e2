"""dask-lithops' own code as workers get it: one bundler for functions and hosts.

dask-lithops is pure Python and often installed editable, so runtimes carry
its files (not a wheel) plus a minimal ``.dist-info`` whose entry points make
the ``relay://`` comm findable.  A function (``for_function``) leaves out what
only the client or the hosts run; a host leaves out only the test helpers.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import io
import tarfile
from functools import lru_cache
from pathlib import Path

_SUFFIXES = (".py", ".yaml", ".yml", ".json", ".typed")
#: Never on a worker: the test emulators and fixtures.
_NEVER = ("dask_lithops/testing/",)
#: Not in a function either: client-side or host-side only.
_NOT_IN_FUNCTION = ("dask_lithops/standalone/", "dask_lithops/runtime/builder.py",
                    "dask_lithops/runtime/cli.py", "dask_lithops/runtime/wheels.py",
                    "dask_lithops/runtime/contents.py", "dask_lithops/cli.py",
                    "dask_lithops/relay/cli.py")

ENTRY_POINTS = "[distributed.comm.backends]\nrelay = dask_lithops.relay.comm:RelayBackend\n"


def version() -> str:
    try:
        return md.version("dask-lithops")
    except md.PackageNotFoundError:
        import dask_lithops

        return getattr(dask_lithops, "__version__", "0+unknown")


def files(for_function: bool = False) -> list[tuple[Path, str]]:
    """(source path, path inside site-packages) of dask_lithops' own files."""
    import dask_lithops

    root = Path(dask_lithops.__file__).resolve().parent
    skip = _NEVER + (_NOT_IN_FUNCTION if for_function else ())
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root.parent).as_posix()
        if p.is_file() and "__pycache__" not in rel and p.suffix in _SUFFIXES \
                and not rel.startswith(skip):
            out.append((p, rel))
    return out


def metadata(ver: str | None = None) -> dict[str, bytes]:
    """A minimal ``.dist-info`` of dask-lithops (name, version, entry points)."""
    ver = ver or version()
    d = f"dask_lithops-{ver}.dist-info"
    return {f"{d}/METADATA": f"Metadata-Version: 2.1\nName: dask-lithops\nVersion: {ver}\n".encode(),
            f"{d}/entry_points.txt": ENTRY_POINTS.encode(),
            f"{d}/top_level.txt": b"dask_lithops\n"}


@lru_cache(maxsize=1)
def host_bundle() -> tuple[str, bytes]:
    """(hash, tar.gz) of the code a host gets (unpacked into ``<remote_dir>/code/<hash>``)."""
    h = hashlib.sha256()
    buf = io.BytesIO()
    items = [(rel, src.read_bytes()) for src, rel in files()] + sorted(metadata().items())
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
        for arc, data in items:
            h.update(arc.encode() + b"\0" + data)
            ti = tarfile.TarInfo(arc)
            ti.size, ti.mode = len(data), 0o644
            tar.addfile(ti, io.BytesIO(data))
    return h.hexdigest()[:16], buf.getvalue()
