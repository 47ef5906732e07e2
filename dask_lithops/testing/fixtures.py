"""Pytest fixtures of the test world (import them into a test module or conftest)."""

from __future__ import annotations

import pytest


@pytest.fixture
def ssh_hosts():
    """Three namespace hosts running real sshd (:class:`~dask_lithops.testing.ssh_hosts.SSHHosts`).

    Skipped with the reason when namespaces or sshd are unavailable (e.g. not root).
    """
    from .ssh_hosts import SSHHosts, ssh_hosts_available

    reason = ssh_hosts_available()
    if reason:
        pytest.skip(f"SSH namespace hosts unavailable: {reason}")
    with SSHHosts(3) as hosts:
        yield hosts


from .lambda_emulator.fixtures import lambda_emulator  # noqa: E402,F401
