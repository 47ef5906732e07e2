"""The deployment package of a function runtime: dask-lithops and the client's exact versions.

Fast path (the client is Linux with the function's Python and architecture):
the client's installed distributions are copied file by file from their
``RECORD`` -- offline, seconds.  Otherwise the same pinned versions are
fetched as Linux wheels with ``pip download --platform manylinux2014_<arch>``.

The package is a :class:`RuntimePackage`: a function zip (the core: what
every worker imports) plus, when user libraries do not fit next to it in
Lambda's 50 MB direct upload, up to five layer zips.  Built packages are
cached under ``~/.cache/dask-lithops/runtimes/<runtime version>``.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata as md
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from packaging.requirements import Requirement

from dask_lithops.payload import RUNTIME_PACKAGES
from dask_lithops.progress import SILENT, format_bytes

from . import code, contents

# Lambda's limits (https://docs.aws.amazon.com/lambda/latest/dg/gettingstarted-limits.html)
ZIP_LIMIT = 50 * 1024 * 1024  # zipped, direct upload (function or layer)
UNZIPPED_LIMIT = 250 * 1024 * 1024  # function + all its layers, unzipped
MAX_LAYERS = 5
HANDLER = "dask_lithops.serverless.backends.aws_lambda.handler.handler"
BUILDER_VERSION = 2  # bump when what goes into a package changes (cache keys include it)

#: What Lambda's managed Python runtime already has: never packaged (the
#: runtime's copies would be shadowed by ours otherwise, or double the size).
PROVIDED = frozenset({"boto3", "botocore", "s3transfer", "jmespath", "python-dateutil", "six",
                      "urllib3", "awslambdaric", "simplejson", "pip", "setuptools", "wheel"})

#: Distributions the client never needs in a worker.
NEVER = frozenset({"dask-lithops", "jsonschema", "jsonschema-specifications", "referencing",
                   "rpds-py", "attrs", "cryptography", "cffi", "pycparser", "bokeh",
                   "paramiko", "pytest", "moto"})

# Files a runtime never needs.
_STRIP_DIRS = {"tests", "__pycache__", "include"}
_STRIP_SUFFIXES = (".pyx", ".pxd", ".pxi", ".h", ".hpp", ".c", ".cc", ".cpp", ".pyi", ".a")
# Optional parts of big libraries (their import is optional and lazy).
# (Only what nothing else links: e.g. every pyarrow extension NEEDs libarrow_substrait.)
_STRIP_OPTIONAL = (
    re.compile(r"^pyarrow/(libarrow_flight|_flight|libarrow_python_flight|flight\.py)"),
    re.compile(r"^pyarrow/_pyarrow_cpp_tests"),
    re.compile(r"^pyarrow/src/"),
)


class RuntimeBuildError(RuntimeError):
    """The runtime cannot be built (or does not fit); the message says what to do."""


_canonical = contents.canonical


def lambda_python_runtime(python: str | None = None) -> str:
    return "python" + (python or "%d.%d" % sys.version_info[:2])


def _arch_of_machine() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "x86_64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}.get(m, m)


def fast_path_possible(python: str, architecture: str) -> bool:
    return (sys.platform.startswith("linux") and python == "%d.%d" % sys.version_info[:2]
            and _arch_of_machine() == architecture)


@dataclass
class RuntimePackage:
    """A built runtime: function zip + layer zips, and what it contains."""

    name: str
    version: str  # hash of everything that ends up in the function
    python: str
    architecture: str
    function_zip: str
    layer_zips: list = field(default_factory=list)
    distributions: dict = field(default_factory=dict)  # name -> version
    runtime_key: dict = field(default_factory=dict)  # payload.runtime_key() of the function
    zipped_bytes: int = 0
    unzipped_bytes: int = 0

    @property
    def handler(self) -> str:
        return HANDLER

    @property
    def lambda_runtime(self) -> str:
        return lambda_python_runtime(self.python)

    def describe(self) -> list[str]:
        """What ``dask-lithops runtime build`` prints."""
        return [f"runtime {self.name} version {self.version} (python{self.python}, "
                f"{self.architecture}): {self.zipped_bytes / 2**20:.1f} MB zipped, "
                f"{self.unzipped_bytes / 2**20:.1f} MB unzipped",
                f"  function zip: {self.function_zip}",
                *(f"  layer: {p}" for p in self.layer_zips)]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def load(cls, path: Path) -> RuntimePackage:
        return cls(**json.loads(path.read_text()))


# --------------------------------------------------------------------- closure


def closure(roots: list[str], exclude=PROVIDED,
            hint: str = "or remove it from extra_packages") -> dict[str, md.Distribution]:
    """Installed distributions ``roots`` need (``name`` or ``name[extra]``), minus ``exclude``.

    A missing one is a :class:`RuntimeBuildError` naming it, ending with ``hint``.
    """
    try:
        return contents.closure(roots, exclude=exclude, hint=hint)
    except contents.MissingPackageError as e:
        raise RuntimeBuildError(str(e)) from None


def core_roots() -> list[str]:
    return ["dask", "distributed", *RUNTIME_PACKAGES]


def function_roots(extra_packages=(), package_sync: bool | None = None) -> dict[str, str]:
    """{requirement: reason} of a function's user libraries: with package sync the client's
    installed dask optional dependencies, plus ``extra_packages``."""
    if package_sync is None:
        from dask_lithops import config

        package_sync = bool(config.get("runtime.package_sync"))
    roots = contents.lambda_roots(extra_packages, package_sync)
    return {r: why for r, why in roots.items()
            if why == contents.EXTRA or _canonical(Requirement(r).name) not in PROVIDED | NEVER}


def function_contents(extra_packages=(), package_sync: bool | None = None) -> list[contents.Entry]:
    """What a function runtime will contain, each distribution with why (for ``--show``)."""
    core = closure(core_roots(), exclude=PROVIDED | NEVER)
    roots = function_roots(extra_packages, package_sync)
    out = {n: contents.Entry(n, d.version, contents.CORE) for n, d in core.items()}
    for root, why in roots.items():
        top = _canonical(Requirement(root).name)
        for n, d in closure([root], exclude=PROVIDED | NEVER).items():
            if n not in out:
                out[n] = contents.Entry(n, d.version, why if n == top else f"{why} ({top})")
    return [out[n] for n in sorted(out)]


# --------------------------------------------------------------------- files


def _keep(rel: str) -> bool:
    parts = rel.split("/")
    if any(p in _STRIP_DIRS for p in parts[:-1]):
        return False
    if rel.endswith(_STRIP_SUFFIXES) or rel.endswith(".pyc"):
        return False
    if parts[0].endswith(".dist-info") and parts[-1] in ("RECORD", "INSTALLER", "REQUESTED",
                                                          "direct_url.json"):
        return parts[-1] != "RECORD"  # keep only what importlib.metadata needs
    return not any(p.match(rel) for p in _STRIP_OPTIONAL)


def distribution_files(dist: md.Distribution) -> list[tuple[Path, str]]:
    """(source path, path inside site-packages) of an installed distribution."""
    base = Path(dist.locate_file("")).resolve()
    out = []
    for f in dist.files or ():
        src = Path(dist.locate_file(f)).resolve()
        try:
            rel = src.relative_to(base).as_posix()
        except ValueError:
            continue  # console scripts etc.
        if src.is_file() and _keep(rel):
            out.append((src, rel))
    return out


def _self_files() -> list[tuple[Path, str]]:
    return code.files(for_function=True)


def _self_metadata(version: str) -> dict[str, bytes]:
    return code.metadata(version)


def _self_version() -> str:
    return code.version()


# --------------------------------------------------------------------- hashing


def runtime_version(name: str, python: str, architecture: str, dists: dict[str, str],
                    self_files: list[tuple[Path, str]]) -> str:
    """A short hash naming this exact runtime (changes whenever its content would)."""
    h = hashlib.sha256()
    h.update(json.dumps([BUILDER_VERSION, name, python, architecture,
                         sorted(dists.items())]).encode())
    for src, rel in self_files:
        h.update(rel.encode())
        h.update(src.read_bytes())
    return h.hexdigest()[:10]


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dask-lithops" / "runtimes"


# --------------------------------------------------------------------- build


def _pyc(src_bytes: bytes, rel: str, tmp: Path | None = None) -> bytes | None:
    """An unchecked-hash .pyc (valid whatever mtime the unzipped .py gets)."""
    import importlib.util
    from importlib._bootstrap_external import _code_to_hash_pyc

    try:
        code = compile(src_bytes, rel, "exec", dont_inherit=True)
    except (SyntaxError, ValueError):
        return None
    return bytes(_code_to_hash_pyc(code, importlib.util.source_hash(src_bytes), checked=False))


def _pyc_name(rel: str) -> str:
    d, _, f = rel.rpartition("/")
    tag = sys.implementation.cache_tag
    name = f"__pycache__/{f[:-3]}.{tag}.pyc"
    return f"{d}/{name}" if d else name


class _Zip:
    def __init__(self, path: Path):
        self.path = path
        self.z = zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6)
        self.unzipped = 0

    def add(self, arc: str, data: bytes, executable: bool = False) -> None:
        info = zipfile.ZipInfo(arc, date_time=(2020, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_DEFLATED
        info.external_attr = (0o755 if executable else 0o644) << 16
        self.z.writestr(info, data, compresslevel=6)
        self.unzipped += len(data)

    def close(self) -> int:
        self.z.close()
        return self.path.stat().st_size


def _file_items(files: list[tuple[Path, str]], prefix: str, compile_py: bool,
                tmp: Path):
    for src, rel in files:
        data = src.read_bytes()
        executable = rel.endswith(".so") or ".so." in rel or os.access(src, os.X_OK)
        yield prefix + rel, data, executable
        if compile_py and rel.endswith(".py"):
            pyc = _pyc(data, rel, tmp)
            if pyc is not None:
                yield prefix + _pyc_name(rel), pyc, False


def build_runtime(name: str = "default", *, extra_packages: list[str] | None = None,
                  requirements_file: str | None = None, python: str | None = None,
                  architecture: str = "x86_64", cache_dir: str | os.PathLike | None = None,
                  zip_limit: int = ZIP_LIMIT, unzipped_limit: int = UNZIPPED_LIMIT,
                  force: bool = False, log=None, package_sync: bool | None = None,
                  progress=None) -> RuntimePackage:
    """Build (or reuse from the cache) the deployment package of a runtime.

    ``extra_packages`` are pip requirement names of user libraries (installed on
    this client for the fast path); with ``package_sync`` (default
    ``lithops.runtime.package_sync``) the client's installed ``dask[complete]``
    dependencies are added.  They go into layers when the function zip would
    pass ``zip_limit``.
    """
    log = log or (lambda msg: None)
    progress = progress or SILENT
    python = python or "%d.%d" % sys.version_info[:2]
    if architecture not in ("x86_64", "arm64"):
        raise RuntimeBuildError(f"architecture = {architecture!r} is invalid; allowed: "
                                "x86_64, arm64")
    extras = list(extra_packages or [])
    if requirements_file:
        extras += _read_requirements(requirements_file)
    reasons = function_roots(extras, package_sync)
    extras = list(reasons)
    if not fast_path_possible(python, architecture):
        return _build_with_pip(name, python, architecture, extras, cache_dir, zip_limit,
                               unzipped_limit, force, log)
    core = closure(core_roots(), exclude=PROVIDED | NEVER)
    extra = {k: v for k, v in closure(extras, exclude=PROVIDED | NEVER).items()
             if k not in core} if extras else {}
    self_files = _self_files()
    dists = {k: d.version for k, d in {**core, **extra}.items()}
    dists["dask-lithops"] = _self_version()
    version = runtime_version(name, python, architecture, dists, self_files)
    root = Path(cache_dir) if cache_dir else cache_root()
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{name}-{version}"
    manifest = target / "runtime.json"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if manifest.exists() and not force:
            pkg = RuntimePackage.load(manifest)
            progress.note(f"runtime {name} ({version}) from the cache: "
                          f"{format_bytes(pkg.zipped_bytes)} zipped")
            return pkg
        log(f"building runtime {name} ({version}): {len(core)} core + {len(extra)} extra "
            f"distributions for python{python} {architecture}")
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        try:
            with progress.phase(f"building runtime {name} ({len(core)} core + {len(extra)} "
                                f"user distributions)") as ph:
                pkg = _assemble(name, version, python, architecture, core, extra, self_files,
                                dists, tmp, zip_limit, unzipped_limit, reasons)
                ph.detail = (f"{format_bytes(pkg.zipped_bytes)} zipped, "
                             f"{format_bytes(pkg.unzipped_bytes)} unzipped, "
                             f"{len(pkg.layer_zips)} layers")
            shutil.rmtree(tmp / "pyc", ignore_errors=True)
            if target.exists():
                shutil.rmtree(target)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        pkg.function_zip = str(target / Path(pkg.function_zip).name)
        manifest.write_text(pkg.to_json())
        return pkg


def _too_big(name, unzipped, unzipped_limit, zip_limit, extra, reasons, built: str,
             at_least: bool = False) -> RuntimeBuildError:
    biggest = sorted(((sum(s.stat().st_size for s, _ in distribution_files(d)), n)
                      for n, d in extra.items()), reverse=True)[:4]
    return RuntimeBuildError(
        f"runtime {name!r} is {'at least ' if at_least else ''}{unzipped / 2**20:.0f} MB "
        f"unzipped{built}; Lambda allows {unzipped_limit / 2**20:.0f} "
        f"MB unzipped for a function and its layers and {MAX_LAYERS} layers of "
        f"{zip_limit / 2**20:.0f} MB zipped. Biggest extra packages: "
        + ", ".join(f"{n} {s / 2**20:.0f} MB" for s, n in biggest)
        + ". Remove packages from extra_packages"
        + (", or drop dask's optional dependencies with package_sync=False "
           "(lithops.runtime.package_sync)" if any(r == contents.DASK_OPTIONAL
                                                   for r in reasons.values()) else "")
        + ", or use a container image runtime (up to 10 GB).")


def _assemble(name, version, python, architecture, core, extra, self_files, dists, tmp: Path,
              zip_limit, unzipped_limit, reasons=None) -> RuntimePackage:
    reasons = reasons or {}
    core_files = [f for d in core.values() for f in distribution_files(d)]
    extra_files = [f for d in extra.values() for f in distribution_files(d)]
    # the files alone (before .pyc are added) already over the limit: say so before zipping
    floor = sum(src.stat().st_size for src, _ in (*core_files, *extra_files))
    if floor > unzipped_limit:
        raise _too_big(name, floor, unzipped_limit, zip_limit, extra, reasons,
                       " (its files alone, before anything was built)", at_least=True)
    work = tmp / "pyc"
    work.mkdir()
    fz = _Zip(tmp / "function.zip")
    for arc, data in _self_metadata(dists["dask-lithops"]).items():
        fz.add(arc, data)
    for arc, data, x in _file_items(self_files, "", True, work):
        fz.add(arc, data, x)
    for arc, data, x in _file_items(core_files, "", True, work):
        fz.add(arc, data, x)
    zipped = fz.close()
    unzipped = fz.unzipped
    if zipped > zip_limit:
        raise RuntimeBuildError(
            f"the runtime's core alone is {zipped / 2**20:.1f} MB zipped, over Lambda's "
            f"{zip_limit / 2**20:.0f} MB direct-upload limit; use a container image runtime")
    layers = []
    if extra_files:
        budget = zip_limit - zipped
        # Small enough to sit in the function zip itself?
        estimate = sum(_compressed_size(src) for src, _ in extra_files)
        if estimate + 2 * 2**20 < budget:
            _append(tmp / "function.zip", extra_files, "")
            unzipped += sum(src.stat().st_size for src, _ in extra_files)
        else:
            layers = _cached_layers(extra, python, architecture, extra_files, tmp.parent,
                                    zip_limit)
            unzipped += sum(src.stat().st_size for src, _ in extra_files)
    total_zipped = (tmp / "function.zip").stat().st_size + sum(p.stat().st_size for p in layers)
    if len(layers) > MAX_LAYERS or unzipped > unzipped_limit:
        raise _too_big(name, unzipped, unzipped_limit, zip_limit, extra, reasons,
                       f" ({len(layers)} layers, {total_zipped / 2**20:.0f} MB zipped)")
    from dask_lithops.payload import runtime_key as client_key

    key = dict(client_key())
    key["python"] = python
    return RuntimePackage(
        name=name, version=version, python=python, architecture=architecture,
        function_zip=str(tmp / "function.zip"), layer_zips=[str(p) for p in layers],
        distributions=dict(sorted(dists.items())), runtime_key=key,
        zipped_bytes=total_zipped, unzipped_bytes=unzipped)


def _compressed_size(path: Path) -> int:
    size = path.stat().st_size
    if size < 64 * 1024:
        return size // 2 + 200
    c = zlib.compressobj(6)
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            n += len(c.compress(chunk))
    return n + len(c.flush()) + 200


def _append(zip_path: Path, files: list[tuple[Path, str]], prefix: str) -> None:
    with zipfile.ZipFile(zip_path, "a", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as z:
        for src, rel in files:
            info = zipfile.ZipInfo(prefix + rel, date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (0o755 if os.access(src, os.X_OK) or ".so" in rel
                                  else 0o644) << 16
            z.writestr(info, src.read_bytes(), compresslevel=6)


def _pack_layers(files: list[tuple[Path, str]], tmp: Path, zip_limit: int) -> list[Path]:
    """Split files over layer zips (``python/<site-packages path>``), each under the limit."""
    headroom = 1024 * 1024
    sized = sorted(((_compressed_size(src), src, rel) for src, rel in files),
                   key=lambda t: -t[0])
    bins: list[list] = []
    loads: list[int] = []
    for size, src, rel in sized:  # first-fit decreasing
        for i, load in enumerate(loads):
            if load + size + headroom < zip_limit:
                bins[i].append((src, rel))
                loads[i] += size
                break
        else:
            if size + headroom >= zip_limit:
                raise RuntimeBuildError(
                    f"{rel} is {size / 2**20:.0f} MB compressed, bigger than a Lambda layer "
                    f"may be ({zip_limit / 2**20:.0f} MB); use a container image runtime")
            bins.append([(src, rel)])
            loads.append(size)
    out = []
    for i, b in enumerate(bins):
        path = tmp / f"layer-{i + 1}.zip"
        _append(path, b, "python/")
        out.append(path)
    return out


def _cached_layers(extra: dict, python: str, architecture: str, files, root: Path,
                   zip_limit: int) -> list[Path]:
    """Layer zips of the extra packages, shared by every runtime with the same extras."""
    key = hashlib.sha256(json.dumps([BUILDER_VERSION, python, architecture, zip_limit, sorted(
        (k, d.version) for k, d in extra.items())]).encode()).hexdigest()[:10]
    d = root / f"layers-{key}"
    done = d / ".complete"
    if done.exists():
        return sorted(d.glob("layer-*.zip"))
    tmp = Path(tempfile.mkdtemp(prefix=".layers-", dir=root))
    try:
        _pack_layers(files, tmp, zip_limit)
        (tmp / ".complete").touch()
        if d.exists():
            shutil.rmtree(d)
        os.rename(tmp, d)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sorted(d.glob("layer-*.zip"))


def _read_requirements(path: str) -> list[str]:
    out = []
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line and not line.startswith("-"):
                out.append(line)
    return out


# --------------------------------------------------------------------- pip path


def _build_with_pip(name, python, architecture, extras, cache_dir, zip_limit, unzipped_limit,
                    force, log) -> RuntimePackage:
    """Other client platforms: the same versions as manylinux wheels from the index."""
    core = closure(core_roots(), exclude=PROVIDED | NEVER)
    pins = [f"{d.metadata['Name']}=={d.version}" for d in core.values()]
    extra_pins = []
    for e in extras:
        req = Requirement(e)
        try:
            extra_pins.append(f"{req.name}=={md.version(req.name)}")
        except md.PackageNotFoundError:
            extra_pins.append(e)
    self_files = _self_files()
    dists = {_canonical(p.split("==")[0]): p.split("==", 1)[1] if "==" in p else "?"
             for p in pins + extra_pins}
    dists["dask-lithops"] = _self_version()
    version = runtime_version(name, python, architecture, dists, self_files)
    root = Path(cache_dir) if cache_dir else cache_root()
    target = root / f"{name}-{version}"
    manifest = target / "runtime.json"
    if manifest.exists() and not force:
        return RuntimePackage.load(manifest)
    plat = f"manylinux2014_{'aarch64' if architecture == 'arm64' else 'x86_64'}"
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        site = tmp / "site"
        for group in (pins, extra_pins):
            if not group:
                continue
            log(f"pip install --platform {plat} --python-version {python}: {' '.join(group)}")
            r = subprocess.run(
                [sys.executable, "-m", "pip", "install", "--no-deps", "--only-binary=:all:",
                 "--platform", plat, "--python-version", python, "--implementation", "cp",
                 "--target", str(site / ("core" if group is pins else "extra")), *group],
                capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeBuildError(
                    f"pip could not fetch Linux wheels for python{python} {architecture}:\n"
                    f"{r.stderr[-2000:]}")

        def files_of(d: Path):
            return [(p, p.relative_to(d).as_posix()) for p in sorted(d.rglob("*"))
                    if p.is_file() and _keep(p.relative_to(d).as_posix())] if d.exists() else []

        work = tmp / "pyc"
        work.mkdir()
        fz = _Zip(tmp / "function.zip")
        for arc, data in _self_metadata(dists["dask-lithops"]).items():
            fz.add(arc, data)
        same_py = python == "%d.%d" % sys.version_info[:2]
        for arc, data, x in _file_items(self_files + files_of(site / "core"), "", same_py, work):
            fz.add(arc, data, x)
        zipped = fz.close()
        unzipped = fz.unzipped
        extra_files = files_of(site / "extra")
        layers = _pack_layers(extra_files, tmp, zip_limit) if extra_files else []
        unzipped += sum(p.stat().st_size for p, _ in extra_files)
        if zipped > zip_limit or len(layers) > MAX_LAYERS or unzipped > unzipped_limit:
            raise RuntimeBuildError(
                f"runtime {name!r} is {unzipped / 2**20:.0f} MB unzipped in {len(layers)} "
                f"layers; Lambda allows {unzipped_limit / 2**20:.0f} MB and {MAX_LAYERS} layers. "
                "Remove packages from extra_packages, or use a container image runtime.")
        from dask_lithops.payload import runtime_key as client_key

        key = dict(client_key())
        key["python"] = python
        pkg = RuntimePackage(
            name=name, version=version, python=python, architecture=architecture,
            function_zip=str(target / "function.zip"),
            layer_zips=[str(target / p.name) for p in layers],
            distributions=dict(sorted(dists.items())), runtime_key=key,
            zipped_bytes=zipped + sum(p.stat().st_size for p in layers), unzipped_bytes=unzipped)
        shutil.rmtree(site, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
        manifest.write_text(pkg.to_json())
        return pkg
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
