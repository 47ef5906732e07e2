"""The user's own modules on the workers: what ``client.upload_file`` does, automatically.

A script's helper modules (``from helpers import clean``) are imported from
files that no distribution installed, so no runtime carries them, and tasks
that reference them fail to deserialize on the workers.  The client finds
them in ``sys.modules``: modules whose file lies under the working directory
or the main script's directory, outside every installed location
(``sys.prefix``, site-packages, dask-lithops itself).  Their top-level
module or package travels to every worker, present and future, as a worker
plugin (:class:`LocalCodePlugin`) that writes the files into the worker's
local directory, puts it first on ``sys.path`` and reloads modules the
worker had already imported in an older version.

The cluster rescans ``sys.modules`` every second, so a module imported after
the cluster started reaches the workers too.  Off with
``lithops.runtime.local_code: false``.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import site
import sys
import sysconfig
from pathlib import Path

from distributed.diagnostics.plugin import WorkerPlugin

logger = logging.getLogger(__name__)

PLUGIN_NAME = "dask-lithops-local-code"
MAX_BYTES = 20 * 1024 * 1024  # more than this is not "a script's helpers": package it instead
_SUFFIXES = (".py",)


def _installed_roots() -> list[str]:
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix}
    for key in ("purelib", "platlib", "stdlib", "platstdlib"):
        p = sysconfig.get_paths().get(key)
        if p:
            roots.add(p)
    roots.update(getattr(site, "getsitepackages", lambda: [])())
    roots.add(site.getusersitepackages() if hasattr(site, "getusersitepackages") else "")
    import dask_lithops

    roots.add(os.path.dirname(os.path.abspath(dask_lithops.__file__)))
    return [os.path.realpath(r) + os.sep for r in roots if r]


def search_roots() -> list[str]:
    """Where the user's own modules live: the working directory and the main script's."""
    roots = [os.getcwd()]
    main = sys.modules.get("__main__")
    main_file = getattr(main, "__file__", None)
    if main_file:
        roots.append(os.path.dirname(os.path.abspath(main_file)))
    return [os.path.realpath(r) + os.sep for r in dict.fromkeys(roots)]


def local_modules() -> dict[str, Path]:
    """{top-level name: file or package directory} of the imported modules that are local."""
    roots = search_roots()
    installed = _installed_roots()
    out: dict[str, Path] = {}
    for name, module in list(sys.modules.items()):
        top = name.partition(".")[0]
        # the main script (and multiprocessing's alias of it) is the workers' own main there
        if top in out or top in ("__main__", "__mp_main__") or module is None:
            continue
        f = getattr(module, "__file__", None)
        if not f or not f.endswith(_SUFFIXES):
            continue
        path = os.path.realpath(f)
        if not any(path.startswith(r) for r in roots) or any(path.startswith(i) for i in installed):
            continue
        top_module = sys.modules.get(top)
        top_file = getattr(top_module, "__file__", None)
        if not top_file:
            continue
        top_path = Path(os.path.realpath(top_file))
        out[top] = top_path.parent if top_path.name == "__init__.py" else top_path
    return out


def source_files(modules: dict[str, Path]) -> list[tuple[str, Path]]:
    """(path relative to a sys.path entry, file) of the modules' source files."""
    out = []
    for top, path in sorted(modules.items()):
        if path.is_dir():
            out += [(f"{top}/{p.relative_to(path).as_posix()}", p)
                    for p in sorted(path.rglob("*.py")) if "__pycache__" not in p.parts]
        else:
            out.append((f"{top}.py", path))
    return out


def collect(modules: dict[str, Path]) -> dict[str, bytes]:
    """{path relative to a sys.path entry: content} of the modules' source files."""
    files = {rel: p.read_bytes() for rel, p in source_files(modules)}
    size = sum(len(b) for b in files.values())
    if size > MAX_BYTES:
        raise ValueError(
            f"local modules {sorted(modules)} are {size / 2**20:.0f} MB of source, more than "
            f"dask-lithops ships to workers ({MAX_BYTES / 2**20:.0f} MB); install them as a "
            "package (pip install -e .: it is then synced as a wheel) or set "
            "lithops.runtime.local_code: false")
    return files


class LocalCodePlugin(WorkerPlugin):
    """Writes the client's local modules into the worker's directory and imports from there."""

    name = PLUGIN_NAME

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.digest = hashlib.sha256(b"".join(
            k.encode() + b"\0" + v for k, v in sorted(files.items()))).hexdigest()[:12]

    def setup(self, worker=None):
        base = getattr(worker, "local_directory", None) or os.getcwd()
        directory = os.path.join(base, "dask-lithops-local-code")
        changed = []
        for rel, data in self.files.items():
            dest = os.path.join(directory, *rel.split("/"))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            try:
                with open(dest, "rb") as f:
                    if f.read() == data:
                        continue
            except OSError:
                pass
            tmp = f"{dest}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, dest)
            changed.append(rel)
        if directory not in sys.path:
            sys.path.insert(0, directory)
        importlib.invalidate_caches()
        for rel in changed:  # as client.upload_file: a module imported before is reloaded
            name = rel[:-3].replace("/", ".").removesuffix(".__init__")
            module = sys.modules.get(name)
            if module is not None:
                try:
                    importlib.reload(module)
                except Exception:  # noqa: BLE001 -- the next task's import reports it
                    logger.exception("reloading %s from the client's local code failed", name)


class LocalCodeSync:
    """Keeps the workers' copy of the client's local modules current (one per cluster)."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.digest: str | None = None
        self.modules: list[str] = []
        self._stamp: list | None = None

    async def sync(self) -> bool:
        """Send the local modules if they changed since last time; True when sent."""
        modules = local_modules()
        if not modules and self.digest is None:
            return False
        stamp = []  # read the files only when one changed (this runs every second)
        for rel, p in source_files(modules):
            try:
                st = p.stat()
            except OSError:
                continue
            stamp.append((rel, st.st_mtime_ns, st.st_size))
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        files = collect(modules)
        plugin = LocalCodePlugin(files)
        if plugin.digest == self.digest:
            return False
        from distributed.protocol.pickle import dumps

        await self.cluster.scheduler_comm.register_worker_plugin(
            plugin=dumps(plugin), name=PLUGIN_NAME, idempotent=False)
        self.digest = plugin.digest
        self.modules = sorted(modules)
        logger.info("local modules shipped to the workers: %s", ", ".join(self.modules))
        return True
