"""Pytest fixture of the Lambda emulator (re-exported by ``dask_lithops.testing.fixtures``)."""

from __future__ import annotations

import pytest


@pytest.fixture
def lambda_emulator(tmp_path):
    """A started :class:`~dask_lithops.testing.lambda_emulator.LambdaEmulator`, stopped after.

    Environments are sandboxed (outbound-only namespaces) when the test runs as root with
    ``ip netns`` and ``nft``; otherwise they run unsandboxed.  Log streams go to
    ``tmp_path / "lambda-logs"``.
    """
    from . import LambdaEmulator

    with LambdaEmulator(log_dir=tmp_path / "lambda-logs", idle_timeout=60) as emu:
        yield emu
