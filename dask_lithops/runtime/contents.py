"""What a worker runtime contains, and why (package sync).

Every runtime carries dask-lithops' own dependencies at the client's exact
versions (the *core*).  With package sync (``lithops.runtime.package_sync``,
on by default) it also carries the user's environment:

- SSH/EC2 hosts: every distribution installed in the client's environment
  (reason ``client package``); distributions installed from a local path or
  in editable mode are built into wheels on the client (``source`` says so).
- Lambda: a zip cannot hold a whole environment, so the client's installed
  versions of dask's own optional dependencies (the ``dask[complete]`` set:
  numpy, pandas, pyarrow, lz4, ...; reason ``dask optional dependency``).

``extra_packages`` are added in both cases (reason ``extra_packages``).
:func:`host_contents` and :func:`lambda_roots` compute the sets;
``dask-lithops runtime build --show`` prints them.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import re
import sys
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

from packaging.requirements import Requirement

from dask_lithops.payload import RUNTIME_PACKAGES

CORE = "dask-lithops dependency"
CLIENT = "client package"
DASK_OPTIONAL = "dask optional dependency"
EXTRA = "extra_packages"

#: Never synced to hosts: the host venv brings its own installer, and
#: dask-lithops itself travels as code (:mod:`dask_lithops.runtime.code`).
HOST_SKIP = frozenset({"pip", "dask-lithops"})


class MissingPackageError(RuntimeError):
    """A package the runtime needs is not installed on the client."""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Entry:
    """One distribution of a runtime."""

    name: str  # canonical
    version: str
    reason: str
    source: str = "index"  # index | local | editable
    path: str | None = None  # the source tree of a local or editable install

    @property
    def pin(self) -> str:
        return f"{self.name}=={self.version}"


def installed() -> dict[str, md.Distribution]:
    """The client's distributions by canonical name (the first on sys.path wins, as import does)."""
    out: dict[str, md.Distribution] = {}
    for dist in md.distributions():
        name = dist.metadata["Name"]
        if name and canonical(name) not in out:
            out[canonical(name)] = dist
    return out


def source_of(dist: md.Distribution) -> tuple[str, str | None]:
    """("index", None), ("local", path) or ("editable", path), from PEP 610 direct_url.json."""
    text = dist.read_text("direct_url.json")
    if not text:
        return "index", None
    try:
        info = json.loads(text)
    except ValueError:
        return "index", None
    url = info.get("url", "")
    if "dir_info" in info and url.startswith("file://"):
        path = unquote(urlparse(url).path)
        return ("editable" if info["dir_info"].get("editable") else "local"), path
    return "index", None  # an archive or VCS url: the same version is on the index or not


def _requirements(dist: md.Distribution, extras=frozenset()) -> list[Requirement]:
    env = [""] + sorted(extras)
    out = []
    for text in dist.requires or ():
        r = Requirement(text)
        if r.marker is not None and not any(r.marker.evaluate({"extra": e}) for e in env):
            continue
        out.append(r)
    return out


def closure(roots, dists: dict[str, md.Distribution] | None = None, exclude=frozenset(),
            hint: str = "or remove it from extra_packages") -> dict[str, md.Distribution]:
    """Installed distributions ``roots`` (``name`` or ``name[extra]``) need, minus ``exclude``."""
    dists = installed() if dists is None else dists
    seen: dict[str, md.Distribution] = {}
    done: set[tuple[str, frozenset]] = set()
    todo = [Requirement(r) for r in roots]
    while todo:
        req = todo.pop()
        name = canonical(req.name)
        if name in exclude or (name, frozenset(req.extras)) in done:
            continue
        done.add((name, frozenset(req.extras)))
        dist = dists.get(name)
        if dist is None:
            raise MissingPackageError(
                f"{req.name!r} is needed in the runtime but not installed on this client; "
                f"install it (pip install {req.name}) {hint}")
        seen[name] = dist
        todo.extend(_requirements(dist, set(req.extras)))
    return seen


def core_roots() -> list[str]:
    """What every worker imports: dask, distributed, the must-match packages, and
    dask-lithops' own (non-optional) dependencies."""
    roots = ["dask", "distributed", *RUNTIME_PACKAGES]
    try:
        for text in md.requires("dask-lithops") or ():
            r = Requirement(text)
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                roots.append(r.name)
    except md.PackageNotFoundError:
        pass
    return list(dict.fromkeys(roots))


def dask_optional_roots(dists: dict[str, md.Distribution] | None = None) -> list[str]:
    """The ``dask[complete]`` dependencies this client has installed (numpy, pandas, ...)."""
    dists = installed() if dists is None else dists
    dask = dists.get("dask")
    if dask is None:
        return []
    out: list[str] = []
    todo, seen = ["complete"], set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for text in dask.requires or ():
            r = Requirement(text)
            if r.marker is None or not r.marker.evaluate({"extra": extra}) \
                    or r.marker.evaluate({"extra": ""}):
                continue
            if canonical(r.name) == "dask":
                todo.extend(r.extras)
            elif canonical(r.name) in dists and canonical(r.name) not in out:
                out.append(canonical(r.name))
    return out


def _extra_names(extra_packages) -> list[str]:
    return [Requirement(e).name for e in extra_packages or ()]


def host_contents(extra_packages=(), package_sync: bool = True,
                  dists: dict[str, md.Distribution] | None = None) -> list[Entry]:
    """The distributions of an SSH/EC2 host's runtime venv, each with why it is there.

    With ``package_sync`` every distribution of the client's environment;
    without, the core and ``extra_packages`` with what they need.
    """
    dists = installed() if dists is None else dists
    core = closure(core_roots(), dists, exclude=HOST_SKIP,
                   hint="(dask-lithops needs it on the workers)")
    extras = closure(extra_packages or (), dists, exclude=HOST_SKIP)
    extra_roots = {canonical(n) for n in _extra_names(extra_packages)}
    chosen = dict(core)
    chosen.update(extras)
    if package_sync:
        chosen.update({k: d for k, d in dists.items() if k not in HOST_SKIP})
    out = []
    for name in sorted(chosen):
        dist = chosen[name]
        reason = CORE if name in core else EXTRA if name in extra_roots or name in extras \
            else CLIENT
        source, path = source_of(dist)
        out.append(Entry(name, dist.version, reason, source, path))
    return out


def lambda_roots(extra_packages=(), package_sync: bool = True,
                 dists: dict[str, md.Distribution] | None = None) -> dict[str, str]:
    """{root requirement: reason} of a function runtime's user libraries (beyond the core)."""
    out = {}
    if package_sync:
        out.update({name: DASK_OPTIONAL for name in dask_optional_roots(dists)})
    for e in extra_packages or ():
        out[e] = EXTRA
    return out


def python_version() -> str:
    return "%d.%d" % sys.version_info[:2]
