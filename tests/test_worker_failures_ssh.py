"""Workers that die on SSH hosts: replacement or a named error (StandaloneCluster)."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from dask_lithops.testing.workloads import inc

pytestmark = [pytest.mark.netns, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def hosts():
    from dask_lithops.testing.ssh_hosts import SSHHosts, ssh_hosts_available

    reason = ssh_hosts_available()
    if reason:
        pytest.skip(f"SSH namespace hosts unavailable: {reason}")
    with SSHHosts(1) as world:
        yield world


def cluster_kwargs(world, **kw):
    return {**dict(hosts=[f"root@{h}" for h in world.hosts], ssh_key_filename=world.key_filename,
                   known_hosts=world.known_hosts, remote_python=sys.executable,
                   worker_processes=2, threads_per_worker=1, death_timeout=10), **kw}


def no_dask_left(world):
    deadline = time.monotonic() + 15
    while world.dask_processes_on(world.hosts[0]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not world.dask_processes_on(world.hosts[0])


def test_missing_key_file_is_its_own_error(hosts, tmp_path):
    from dask_lithops.standalone import StandaloneCluster
    from dask_lithops.standalone.ssh_transport import SSHKeyFileError

    missing = tmp_path / "no-such-key"
    with pytest.raises(SSHKeyFileError, match="no-such-key does not exist.*ssh_key_filename"):
        StandaloneCluster(**cluster_kwargs(hosts, ssh_key_filename=str(missing)))
    assert no_dask_left(hosts)


@pytest.mark.parametrize("scheduler", ["local", "remote"])
def test_worker_group_killed_while_its_host_lives_is_replaced(hosts, scheduler):
    """With scheduler="remote" the scheduler runs on the host: the cluster learns of the
    loss over the scheduler's RPC (worker stream, FailureMonitor), not in-process."""
    from distributed import Client

    from dask_lithops.standalone import StandaloneCluster

    with StandaloneCluster(**cluster_kwargs(hosts, scheduler=scheduler)) as cluster, \
            Client(cluster) as client:
        client.wait_for_workers(2, timeout=60)
        before = set(client.scheduler_info()["workers"])
        group = next(iter(cluster.workers.values()))
        killed_at = time.monotonic()
        for pid in group.pids:  # each worker's session: nanny and worker process
            os.killpg(pid, signal.SIGKILL)
        deadline = killed_at + 60
        while time.monotonic() < deadline:
            now = set(client.scheduler_info()["workers"])
            if len(now) == 2 and not now & before:
                break
            time.sleep(0.2)
        assert len(now) == 2 and not now & before, now
        assert time.monotonic() - killed_at < 60
        assert client.submit(inc, 1).result(timeout=30) == 2
        assert cluster.worker_failures and len(cluster.worker_spec) == 1
        names = {w["name"] for w in client.scheduler_info()["workers"].values()}
        assert names == set(cluster._members(next(iter(cluster.worker_spec))))
    assert no_dask_left(hosts)


@pytest.fixture
def client_only_module(tmp_path, monkeypatch):
    (tmp_path / "client_helpers_ssh.py").write_text("def triple(x):\n    return 3 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import client_helpers_ssh

    yield client_helpers_ssh
    sys.modules.pop("client_helpers_ssh", None)


def test_missing_module_on_the_hosts_fails_with_the_fix(hosts, client_only_module):
    from distributed import Client

    from dask_lithops.failures import WorkerFailureError
    from dask_lithops.standalone import StandaloneCluster

    with StandaloneCluster(**cluster_kwargs(hosts)) as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=60)
        start = time.monotonic()
        with pytest.raises(WorkerFailureError) as info:
            client.gather(client.map(client_only_module.triple, range(4)))
        assert time.monotonic() - start < 60
        assert "client_helpers_ssh" in str(info.value)
        assert "client.upload_file" in str(info.value)
        assert {f.kind for f in cluster.worker_failures} == {"missing-module"}
    assert no_dask_left(hosts)


def test_missing_package_message_names_both_fixes():
    from dask_lithops.failures import describe

    hosts = str(describe("w", {"kind": "missing-module", "module": "pandas.core"}, "standalone"))
    assert "'pandas.core' is not installed" in hosts
    assert "lithops.runtime.package_sync=True" in hosts and "remote_python" in hosts
    faas = str(describe("w", {"kind": "missing-module", "module": "pandas"}, "serverless"))
    assert 'extra_packages=["pandas"]' in faas and "package_sync" in faas
