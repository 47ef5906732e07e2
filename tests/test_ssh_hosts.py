"""The SSH test world: namespace hosts with real sshd."""

import subprocess

import pytest

from dask_lithops.testing.fixtures import ssh_hosts  # noqa: F401
from dask_lithops.testing.netns import leftover_namespaces
from dask_lithops.testing.ssh_hosts import SSHHosts, ssh_hosts_available

pytestmark = pytest.mark.netns


def _ssh(world, host, command, known_hosts=None):
    return subprocess.run(
        ["ssh", "-i", world.key_filename, "-o", f"UserKnownHostsFile={known_hosts or world.known_hosts}",
         "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
         f"root@{host}", command], capture_output=True, text=True, timeout=30)


def test_hosts_have_own_address_home_and_key_login(ssh_hosts):
    assert len(ssh_hosts.hosts) == 3 and len(set(ssh_hosts.hosts)) == 3
    homes = set()
    for h in ssh_hosts.hosts:
        r = _ssh(ssh_hosts, h, "echo $HOME; echo $SSH_CONNECTION")
        assert r.returncode == 0, r.stderr
        home, conn = r.stdout.split("\n")[:2]
        homes.add(home)
        assert home.startswith(ssh_hosts.directory)
        client_addr, _, server_addr, port = conn.split()
        assert client_addr == ssh_hosts.gateway and server_addr == h and port == "22"
    assert len(homes) == 3


def test_unknown_host_key_is_rejected_by_openssh(ssh_hosts, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    r = _ssh(ssh_hosts, ssh_hosts.hosts[0], "true", known_hosts=str(empty))
    assert r.returncode != 0 and "Host key verification failed" in r.stderr


def test_kill_simulates_vm_failure(ssh_hosts):
    h = ssh_hosts.hosts[1]
    r = _ssh(ssh_hosts, h, "setsid nohup sleep 300 >/dev/null 2>&1 < /dev/null & echo started")
    assert r.returncode == 0
    assert any("sleep 300" in cmd for _, cmd in ssh_hosts.processes_on(h))
    ssh_hosts.kill(h)
    assert ssh_hosts.processes_on(h) == []
    assert _ssh(ssh_hosts, h, "true").returncode != 0
    # the other hosts are unaffected
    assert _ssh(ssh_hosts, ssh_hosts.hosts[0], "true").returncode == 0


def test_stop_removes_everything():
    reason = ssh_hosts_available()
    if reason:
        pytest.skip(f"SSH namespace hosts unavailable: {reason}")
    world = SSHHosts(2).start()
    names = [world.host(h).name for h in world.hosts]
    directory = world.directory
    extra = world.add_host()
    assert len(world.hosts) == 3 and _ssh(world, extra, "true").returncode == 0
    world.stop()
    import os
    assert not os.path.exists(directory)
    assert not set(names) & set(leftover_namespaces())
