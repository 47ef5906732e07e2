"""The runtime of a Cloud Run function: a source package that Google's build installs.

The zip holds ``main.py`` (the entry point), ``requirements.txt`` (the client's
exact versions of dask, distributed, cloudpickle, msgpack and everything they
and the user's ``extra_packages`` need, ``name==version``), and dask_lithops'
own sources with their ``.dist-info`` (the ``relay://`` comm's entry point).
The build runs ``pip install -r requirements.txt`` for the function's Python.
Built packages are cached under ``~/.cache/dask-lithops/runtimes/gcp-<name>-<version>``.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dask_lithops.runtime import builder
from dask_lithops.runtime.builder import RuntimeBuildError

ENTRY_POINT = "dask_lithops_handler"
MAIN_PY = f'''"""Entry point of a dask-lithops runtime on Cloud Run functions (generated)."""

from dask_lithops.serverless.backends.gcp_functions.handler import handle_request as {ENTRY_POINT}

__all__ = ["{ENTRY_POINT}"]
'''
#: Python versions Cloud Run functions has runtimes for (``python<major><minor>``).
PYTHONS = ("3.8", "3.9", "3.10", "3.11", "3.12", "3.13")
SOURCE_LIMIT = 100 * 1024 * 1024  # zipped source through generateUploadUrl
#: Never pinned: the build's own tools, and what functions-framework brings.
NOT_PINNED = frozenset({"pip", "setuptools", "wheel", "functions-framework"})
PACKAGING_VERSION = 1  # bump when what goes into a package changes (cache keys include it)


@dataclass
class SourcePackage:
    """A built Cloud Run functions runtime: the source zip and what it pins."""

    name: str
    version: str  # hash of everything that ends up in the function
    python: str
    source_zip: str
    requirements: list = field(default_factory=list)  # requirements.txt lines
    distributions: dict = field(default_factory=dict)  # name -> version
    runtime_key: dict = field(default_factory=dict)  # payload.runtime_key() of the function
    zipped_bytes: int = 0

    @property
    def gcp_runtime(self) -> str:
        return "python" + self.python.replace(".", "")

    def describe(self) -> list[str]:
        return [f"runtime {self.name} version {self.version} ({self.gcp_runtime}): "
                f"{self.zipped_bytes / 2**20:.1f} MB source zip, {len(self.requirements)} "
                "pinned requirements",
                f"  source zip: {self.source_zip}"]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def load(cls, path: Path) -> SourcePackage:
        return cls(**json.loads(path.read_text()))


def build_source_package(name: str = "default", *, extra_packages: list[str] | None = None,
                         requirements_file: str | None = None,
                         cache_dir: str | os.PathLike | None = None, force: bool = False,
                         log=None, package_sync: bool | None = None) -> SourcePackage:
    """``package_sync`` (None: ``lithops.runtime.package_sync``): also pin the client's
    installed versions of dask's optional dependencies, as Lambda's runtime carries them."""
    log = log or (lambda msg: None)
    python = "%d.%d" % sys.version_info[:2]
    if python not in PYTHONS:
        raise RuntimeBuildError(
            f"Cloud Run functions has no python{python} runtime (the client's Python); "
            f"supported: {', '.join(PYTHONS)}. Run the client on one of those.")
    extras = list(extra_packages or [])
    if requirements_file:
        extras += builder._read_requirements(requirements_file)
    if package_sync is None:
        from dask_lithops import config

        package_sync = bool(config.get("runtime.package_sync"))
    from dask_lithops.runtime.contents import lambda_roots

    extras = list(lambda_roots(extras, package_sync))
    exclude = builder.NEVER | NOT_PINNED
    hint = "or remove it from lithops.gcp_functions.extra_packages"
    dists = builder.closure(builder.core_roots(), exclude=exclude, hint=hint)
    if extras:
        dists.update(builder.closure(extras, exclude=exclude, hint=hint))
    pins = {builder._canonical(d.metadata["Name"]): d.version for d in dists.values()}
    requirements = [f"{n}=={v}" for n, v in sorted(pins.items())]
    self_files = builder._self_files()
    self_version = builder._self_version()
    version = builder.runtime_version(
        name, python, f"gcp_functions-{PACKAGING_VERSION}",
        {**pins, "dask-lithops": self_version}, self_files)
    root = Path(cache_dir) if cache_dir else builder.cache_root()
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"gcp-{name}-{version}"
    manifest = target / "runtime.json"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if manifest.exists() and not force:
            return SourcePackage.load(manifest)
        log(f"building runtime {name} ({version}) for Cloud Run functions: "
            f"{len(requirements)} pinned requirements, python{python}")
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        try:
            path = tmp / "source.zip"
            with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as z:
                z.writestr(_info("main.py"), MAIN_PY)
                z.writestr(_info("requirements.txt"), "\n".join(requirements) + "\n")
                for arc, data in builder._self_metadata(self_version).items():
                    z.writestr(_info(arc), data)
                for src, rel in self_files:
                    z.writestr(_info(rel), src.read_bytes())
            size = path.stat().st_size
            if size > SOURCE_LIMIT:
                raise RuntimeBuildError(
                    f"runtime {name!r} source is {size / 2**20:.0f} MB zipped, over the "
                    f"{SOURCE_LIMIT / 2**20:.0f} MB upload limit of Cloud Run functions")
            from dask_lithops.payload import runtime_key as client_key

            pkg = SourcePackage(name=name, version=version, python=python,
                                source_zip=str(target / "source.zip"), requirements=requirements,
                                distributions={**pins, "dask-lithops": self_version},
                                runtime_key=dict(client_key()), zipped_bytes=size)
            if target.exists():
                shutil.rmtree(target)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        manifest.write_text(pkg.to_json())
        return pkg


def _info(arc: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(arc, date_time=(2020, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    return info
