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


@pytest.fixture
def ec2_world(monkeypatch):
    """moto's EC2 API on a test bridge's gateway and a VM booter.

    See :class:`~dask_lithops.testing.vm_booter.EC2World`.

    Running instances become namespace hosts with a real sshd.  Dummy AWS
    credentials are set in the environment for the test only.  Skipped with
    the reason when namespaces, sshd or moto are unavailable.
    """
    from .moto_server import DUMMY_CREDENTIALS, moto_available
    from .ssh_hosts import ssh_hosts_available
    from .vm_booter import EC2World

    reason = ssh_hosts_available() or moto_available()
    if reason:
        pytest.skip(f"EC2 test world unavailable: {reason}")
    for k, v in DUMMY_CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    with EC2World() as world:
        yield world


from .gcp_functions_emulator.fixtures import gcp_functions_emulator  # noqa: E402,F401
from .lambda_emulator.fixtures import lambda_emulator  # noqa: E402,F401
