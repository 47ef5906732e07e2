"""The build step: the uploaded source's ``requirements.txt`` in an isolated environment.

Like Google's Python buildpack, a build extracts the source (``main.py`` at its
root), creates a fresh virtual environment with no access to the host's
site-packages, installs ``requirements.txt`` with pip (adding
``functions-framework`` when the requirements do not name it) and fails with
pip's own error when it cannot.  Environments are cached by the hash of what
went into them (requirements, Python, functions-framework version) under
``~/.cache/dask-lithops/gcp-functions-builds/`` -- Cloud Build caches layers too --
so a second build of the same requirements takes no time.

Everything here is blocking and runs in the emulator's thread pool.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PIP_TIMEOUT = 900


class BuildError(Exception):
    """The build failed; the message is what the operation's error says."""


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dask-lithops" / "gcp-functions-builds"


def _base_python() -> str:
    return getattr(sys, "_base_executable", None) or sys.executable


def functions_framework_requirement() -> str:
    try:
        return f"functions-framework=={md.version('functions-framework')}"
    except md.PackageNotFoundError:
        return "functions-framework"


def _names(requirements: str) -> set[str]:
    out = set()
    for line in requirements.splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)", line)
        if m and not line.startswith("-"):
            out.add(re.sub(r"[-_.]+", "-", m.group(1)).lower())
    return out


def extract_source(zip_path: Path, dest: Path) -> Path:
    """Extract the uploaded archive into ``dest``; it must hold ``main.py`` at its root."""
    dest.mkdir(parents=True)
    try:
        with zipfile.ZipFile(zip_path) as z:
            z.extractall(dest)
    except zipfile.BadZipFile as e:
        raise BuildError(f"Build failed: the uploaded source is not a zip archive ({e})") from None
    if not (dest / "main.py").is_file():
        raise BuildError("Build failed: missing main.py and GOOGLE_FUNCTION_SOURCE not specified. "
                         "Either create the function in main.py or specify "
                         "GOOGLE_FUNCTION_SOURCE to point to the file that contains the "
                         "function")
    return dest


def build_environment(source: Path, cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the interpreter of an environment with ``source/requirements.txt`` installed."""
    req_file = source / "requirements.txt"
    requirements = req_file.read_text() if req_file.is_file() else ""
    extra = [] if "functions-framework" in _names(requirements) else \
        [functions_framework_requirement()]
    key = hashlib.sha256("\n".join([
        f"{sys.version_info.major}.{sys.version_info.minor}", requirements, *extra,
    ]).encode()).hexdigest()[:24]
    root = Path(cache_dir) if cache_dir else _cache_root()
    root.mkdir(parents=True, exist_ok=True)
    venv = root / key
    python = venv / "bin" / "python"
    if (venv / ".ready").exists():
        os.chmod(venv, 0o755)  # mkdtemp made it 0700; instances run unprivileged
        return python
    with open(root / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (venv / ".ready").exists():
            return python
        tmp = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=root))
        try:
            subprocess.run([_base_python(), "-m", "venv", "--without-pip", str(tmp)],
                           check=True, capture_output=True)
            reqs = tmp / "requirements.txt"
            reqs.write_text(requirements + "\n" + "\n".join(extra) + "\n")
            try:
                r = subprocess.run(
                    [sys.executable, "-m", "pip", "--python", str(tmp / "bin" / "python"),
                     "install", "--no-input", "--disable-pip-version-check",
                     "--no-warn-script-location", "-r", str(reqs)],
                    capture_output=True, text=True, timeout=PIP_TIMEOUT,
                    env={**os.environ, "PIP_REQUIRE_VIRTUALENV": "0"})
            except subprocess.TimeoutExpired:
                raise BuildError(f"Build failed: pip install -r requirements.txt did not finish "
                                 f"within {PIP_TIMEOUT} s") from None
            if r.returncode != 0:
                lines = [ln for ln in (r.stderr or r.stdout).splitlines()
                         if ln.strip() and not ln.startswith("WARNING: Location")]
                raise BuildError("Build failed: pip install -r requirements.txt failed:\n"
                                 + "\n".join(lines[-30:]))
            if venv.exists():
                shutil.rmtree(venv)
            # the venv's scripts embed the build path; only bin/python is used
            os.rename(tmp, venv)
            os.chmod(venv, 0o755)  # mkdtemp made it 0700; instances run unprivileged
            (venv / ".ready").touch()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return python
