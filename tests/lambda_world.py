"""The Lambda test world shared by the serverless test modules: a sandboxed emulator per
module, the runtime built once, and a cluster pointed at them (import what a module uses)."""

from __future__ import annotations

import os
import time

import pytest

EXTRA = ["pandas", "pyarrow", "numpy"]


@pytest.fixture(scope="module")
def emulator():
    """The Lambda emulator with outbound-only sandboxes (skips where they cannot be made)."""
    pytest.importorskip("awslambdaric")
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces for outbound-only sandboxes)")
    from dask_lithops.testing.lambda_emulator import LambdaEmulator, sandbox_unavailable

    reason = sandbox_unavailable()
    if reason:
        pytest.skip(f"Lambda emulator sandboxes unavailable: {reason}")
    with LambdaEmulator(sandbox=True) as emu:
        yield emu


@pytest.fixture(scope="module")
def runtime_package():
    """The runtime zip, built once (cached under ~/.cache/dask-lithops/runtimes)."""
    from dask_lithops.runtime.builder import build_runtime

    return build_runtime("default", extra_packages=EXTRA)


def make_cluster(emu, **kwargs):
    from dask_lithops.serverless import ServerlessCluster

    kwargs.setdefault("runtime_memory", 1024)
    kwargs.setdefault("runtime_timeout", 120)
    kwargs.setdefault("extra_packages", EXTRA)
    kwargs.setdefault("dashboard_address", None)
    return ServerlessCluster(endpoint_url=emu.endpoint_url, contact_address=emu.host_address,
                             **kwargs)


def busy_environments(emu, function=None):
    return [e for e in emu.environments if e.state in ("busy", "starting")
            and (function is None or e.function == function)]


def wait_no_busy(emu, function, timeout=20.0):
    """The function's environments still busy after ``timeout`` (``[]``: all returned)."""
    deadline = time.monotonic() + timeout
    while busy_environments(emu, function) and time.monotonic() < deadline:
        time.sleep(0.2)
    return busy_environments(emu, function)
