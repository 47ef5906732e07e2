"""The emulator's stand-in for Lambda's managed Python runtime.

Lambda's ``python3.x`` runtimes give a function the standard library,
``awslambdaric`` and ``boto3`` (with their dependencies), plus the deployment
zip and its layers; nothing else.  We build the same thing once: a bare venv
(``python -m venv --without-pip``, no system site-packages) into which the
host's installed copies of those distributions are copied file by file from
their ``RECORD`` -- offline and fast -- and cache it under
``~/.cache/dask-lithops/lambda-runtime/``.
"""

from __future__ import annotations

import fcntl
import importlib.metadata as md
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT_DISTRIBUTIONS = ("awslambdaric", "boto3")

#: Lambda's Python runtime identifiers the emulator accepts in ``Runtime``.
PYTHON_RUNTIMES = tuple(f"python3.{m}" for m in range(8, 15))


def runtime_distributions(roots=ROOT_DISTRIBUTIONS) -> list[md.Distribution]:
    """The installed distributions ``roots`` need, resolved through their metadata."""
    from dask_lithops.runtime.builder import closure

    return list(closure(list(roots), exclude=frozenset(),
                        hint="(pip install 'dask-lithops[emulator]')").values())


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dask-lithops" / "lambda-runtime"


def runtime_key() -> str:
    pyver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return (f"{pyver}-awslambdaric-{md.version('awslambdaric')}"
            f"-boto3-{md.version('boto3')}")


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def _base_python() -> str:
    return getattr(sys, "_base_executable", None) or sys.executable


def ensure_runtime(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the managed runtime's interpreter, building the venv on first use."""
    root = Path(cache_dir) if cache_dir else _cache_root()
    root.mkdir(parents=True, exist_ok=True)
    venv = root / runtime_key()
    ready = venv / ".dask-lithops-ready"
    if ready.exists():
        _world_readable(venv)
        return _venv_python(venv)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ready.exists():
            return _venv_python(venv)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        try:
            _build(tmp)
            if venv.exists():
                shutil.rmtree(venv)
            # only activate scripts embed the build path, and nothing here uses them
            os.rename(tmp, venv)
            _world_readable(venv)
            ready.touch()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return _venv_python(venv)


def _world_readable(venv: Path) -> None:
    """mkdtemp made it 0700; environments run as Lambda's unprivileged user read it."""
    if venv.stat().st_mode & 0o777 != 0o755:
        os.chmod(venv, 0o755)


def _build(venv: Path) -> None:
    subprocess.run([_base_python(), "-m", "venv", "--without-pip", str(venv)],
                   check=True, capture_output=True)
    site = _site_packages(venv)
    for dist in runtime_distributions():
        base = Path(dist.locate_file("")).resolve()
        for f in dist.files or ():
            src = Path(dist.locate_file(f)).resolve()
            try:
                rel = src.relative_to(base)
            except ValueError:
                continue  # console scripts etc. outside site-packages
            if not src.is_file():
                continue
            dst = site / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    check = subprocess.run(
        [str(_venv_python(venv)), "-s", "-c",
         "import awslambdaric, boto3, sys; print(sys.path)"],
        capture_output=True, text=True, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    if check.returncode != 0:
        raise RuntimeError(f"the Lambda emulator's runtime venv at {venv} is broken:\n"
                           f"{check.stderr}")
