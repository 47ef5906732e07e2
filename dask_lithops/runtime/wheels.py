"""Wheels of a runtime, made on the client (hosts need no package index).

- Distributions from an index: ``pip download --no-deps --only-binary=:all:``
  at the client's exact version, for the host's platform and Python; failing
  that, and when the host's platform is the client's, ``pip wheel`` builds it
  from its source distribution.
- Distributions installed from a local path or in editable mode: ``pip wheel``
  of their source tree (a regular wheel, not an editable one).

Wheels are cached under ``lithops.runtime.wheel_cache``
(``~/.cache/dask-lithops/wheels``): one directory per target platform, so a
second cluster downloads nothing.  What cannot be made is returned (and
warned about by the caller), never dropped silently.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from packaging.utils import canonicalize_name, parse_wheel_filename

from dask_lithops import progress as progress_mod

from .contents import Entry

DOWNLOADERS = 4  # pip processes fetching wheels side by side


@dataclass(frozen=True)
class Target:
    """The platform wheels are for: ``python`` "3.11", ``system`` "Linux", ``machine`` "x86_64"."""

    python: str
    system: str = "Linux"
    machine: str = "x86_64"
    python_version: str | None = None  # the full "3.11.2", for wheels' Requires-Python

    @classmethod
    def client(cls) -> Target:
        return cls("%d.%d" % sys.version_info[:2], platform.system(), platform.machine(),
                   platform.python_version())

    @property
    def is_client(self) -> bool:
        """The client's platform: pip's own tags apply and sdists may be built here."""
        client = Target.client()
        return (self.python, self.system, self.machine) == \
            (client.python, client.system, client.machine)

    @property
    def key(self) -> str:
        return f"cp{self.python.replace('.', '')}-{self.system.lower()}-{self.machine.lower()}"

    def pip_platform_args(self) -> list[str]:
        if self.is_client:
            return []  # pip's own tags for this interpreter (manylinux up to this glibc)
        m = {"arm64": "aarch64", "amd64": "x86_64"}.get(self.machine.lower(), self.machine)
        plats = [f"manylinux_2_{v}_{m}" for v in (34, 31, 28, 27, 24, 17)] + \
            [f"manylinux2014_{m}"]
        abi = f"cp{self.python.replace('.', '')}"
        out = ["--python-version", self.python, "--implementation", "cp",
               "--abi", abi, "--abi", "abi3", "--abi", "none"]
        for p in plats:
            out += ["--platform", p]
        return out


def cache_root() -> Path:
    from dask_lithops import config

    configured = config.get("runtime.wheel_cache") or os.environ.get("DASK_LITHOPS_WHEELHOUSE")
    if configured:
        return Path(os.path.expanduser(configured))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dask-lithops" / "wheels"


def _pip(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args, "--disable-pip-version-check",
                           "--no-input", "--progress-bar", "off"],
                          capture_output=True, text=True, timeout=timeout)


def _index(directory: Path) -> dict[tuple[str, str], Path]:
    out = {}
    if directory.is_dir():
        for p in directory.glob("*.whl"):
            try:
                name, version, _, _ = parse_wheel_filename(p.name)
            except ValueError:
                continue
            out[(str(name), str(version))] = p
    return out


def content_hash(wheel: Path) -> str:
    """A hash of a wheel's members (names and CRCs): equal for equal contents, whatever the
    timestamps of the build."""
    h = hashlib.sha256()
    with zipfile.ZipFile(wheel) as z:
        for info in sorted(z.infolist(), key=lambda i: i.filename):
            h.update(f"{info.filename}\0{info.CRC}\0".encode())
    return h.hexdigest()[:16]


def _version_key(version: str) -> str:
    from packaging.version import Version

    try:
        return str(Version(version))
    except ValueError:
        return version


@dataclass
class Wheelhouse:
    """Wheels for a runtime: ``wheels`` by distribution name, ``missing`` {name: why}."""

    wheels: dict[str, Path]
    missing: dict[str, str]

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in self.wheels.values())


def build_local_wheels(entries: list[Entry], log=None) -> dict[str, tuple[Path | None, str]]:
    """{name: (wheel, content hash or why not)} of the local/editable ``entries``."""
    out = {}
    root = cache_root() / "local"
    root.mkdir(parents=True, exist_ok=True)
    for e in entries:
        if e.source == "index":
            continue
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        try:
            r = _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp), e.path)
            if r.returncode:
                r = _pip("wheel", "--no-deps", "-w", str(tmp), e.path)
            built = list(tmp.glob("*.whl"))
            if r.returncode or not built:
                out[e.name] = (None, f"building a wheel of its {e.source} install at {e.path} "
                                     f"failed: {(r.stderr or r.stdout).strip()[-300:]}")
                continue
            digest = content_hash(built[0])
            dest = root / digest
            dest.mkdir(exist_ok=True)
            target = dest / built[0].name
            if not target.exists():
                os.replace(built[0], target)
            out[e.name] = (target, digest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def fetch(entries: list[Entry], target: Target, local: dict[str, tuple[Path | None, str]],
          progress: progress_mod.Progress = progress_mod.SILENT) -> Wheelhouse:
    """Wheels of every entry for ``target``: cached, downloaded or built."""
    directory = cache_root() / target.key
    directory.mkdir(parents=True, exist_ok=True)
    wheels: dict[str, Path] = {}
    missing: dict[str, str] = {}
    for e in entries:
        if e.source != "index":
            path, why = local.get(e.name, (None, "not built"))
            if path is None:
                missing[e.name] = why
            elif not _fits(path, target):
                missing[e.name] = (f"its {e.source} install at {e.path} builds a wheel for "
                                   f"{path.name.split('-', 2)[-1]}, not {target.key}")
            else:
                wheels[e.name] = path
    index_entries = [e for e in entries if e.source == "index"]
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        have = _index(directory)
        todo = []
        for e in index_entries:
            w = have.get((str(canonicalize_name(e.name)), _version_key(e.version)))
            if w is not None:
                wheels[e.name] = w
            else:
                todo.append(e)
        if todo:
            with progress.phase(f"fetching {len(todo)} wheels for {target.key}") as ph:
                _download(todo, target, directory, missing, ph)
                have = _index(directory)
                got = 0
                for e in todo:
                    w = have.get((str(canonicalize_name(e.name)), _version_key(e.version)))
                    if w is not None:
                        wheels[e.name] = w
                        got += w.stat().st_size
                        missing.pop(e.name, None)
                    else:
                        missing.setdefault(e.name, "no wheel found")
                ph.detail = f"{len(todo) - sum(e.name in missing for e in todo)} wheels, " \
                            f"{progress_mod.format_bytes(got)}; cached in {directory}"
    for name, path in list(wheels.items()):
        why = _python_excluded(path, target)
        if why:
            del wheels[name]
            missing[name] = why
    return Wheelhouse(wheels, missing)


def _python_excluded(wheel: Path, target: Target) -> str | None:
    """Why ``wheel``'s Requires-Python rules out the target's Python, or None.

    pip download targets only major.minor, so a wheel that needs a later micro
    release (``>=3.11.5`` on a host's 3.11.2) would be fetched and then fail the
    whole venv install on the host.
    """
    from email.parser import HeaderParser

    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    if not target.python_version:
        return None
    try:
        with zipfile.ZipFile(wheel) as z:
            name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            meta = HeaderParser().parsestr(z.read(name).decode("utf-8", "replace"))
        spec = SpecifierSet(meta.get("Requires-Python") or "")
    except (StopIteration, OSError, zipfile.BadZipFile, InvalidSpecifier):
        return None
    if spec.contains(target.python_version, prereleases=True):
        return None
    return f"requires Python {spec}; the host has {target.python_version}"


def _fits(wheel: Path, target: Target) -> bool:
    from packaging.tags import sys_tags

    _, _, _, tags = parse_wheel_filename(wheel.name)
    if all(t.platform == "any" for t in tags):
        return True
    return target.is_client and bool(set(tags) & set(sys_tags()))


def _download(todo: list[Entry], target: Target, directory: Path, missing: dict,
              phase) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=directory))
    try:
        args = ["download", "--no-deps", "--only-binary=:all:", "-d", str(tmp),
                *target.pip_platform_args()]
        phase.set_total(len(todo), "wheels")

        def one(e: Entry):
            r1 = _pip(*args, e.pin)
            if r1.returncode and target.is_client:  # no wheel: build one from the sdist
                r1 = _pip("wheel", "--no-deps", "-w", str(tmp), e.pin)
            phase.advance()
            return e, r1

        def chunk(group: list[Entry]):
            r = _pip(*args, *(e.pin for e in group))
            if not r.returncode:
                phase.advance(len(group))
                return []
            return [one(e) for e in group]  # find which ones: one pip per distribution

        # pip fetches one file at a time: a few pips side by side (the index is the bottleneck)
        groups = [todo[i::DOWNLOADERS] for i in range(min(DOWNLOADERS, len(todo)))]
        with ThreadPoolExecutor(DOWNLOADERS) as pool:
            for failed in pool.map(chunk, groups):
                for e, r1 in failed:
                    if r1.returncode:
                        missing[e.name] = _pip_reason(r1)
        for p in tmp.glob("*.whl"):
            os.replace(p, directory / p.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _pip_reason(r: subprocess.CompletedProcess) -> str:
    lines = [ln.strip() for ln in (r.stderr or r.stdout).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    return (errors or lines or ["pip failed"])[0][:300]
