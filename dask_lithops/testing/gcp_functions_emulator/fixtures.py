"""Pytest fixture of the Cloud Run functions emulator (re-exported by ``dask_lithops.testing.fixtures``)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def gcp_functions_emulator(tmp_path_factory):
    """A started :class:`~dask_lithops.testing.gcp_functions_emulator.CloudFunctionsEmulator`.

    One per test module (``project="test-project"``, ``region="us-central1"``),
    stopped after the module.  Instances are sandboxed when the tests run as root
    with ``ip netns`` and ``nft``.  Instance logs go to a temporary directory.
    """
    from . import CloudFunctionsEmulator

    with CloudFunctionsEmulator(log_dir=tmp_path_factory.mktemp("gcf-logs"),
                                idle_timeout=120) as emu:
        yield emu
