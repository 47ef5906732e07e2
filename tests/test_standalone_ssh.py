"""StandaloneCluster(backend="ssh") on namespace hosts running real sshd."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from dask_lithops.testing.fixtures import ssh_hosts  # noqa: F401

pytestmark = [pytest.mark.netns, pytest.mark.timeout(240)]

MATCHING_PYTHON = sys.executable  # has the client's exact versions: used as it is


def cluster_kwargs(world, **kw):
    return {**dict(hosts=[f"root@{h}" for h in world.hosts], ssh_key_filename=world.key_filename,
                   known_hosts=world.known_hosts, remote_python=MATCHING_PYTHON,
                   worker_processes=1, threads_per_worker=2, death_timeout=10), **kw}


def assert_no_dask_left(world, hosts=None):
    deadline = time.monotonic() + 15
    while True:
        left = {h: world.dask_processes_on(h) for h in hosts or world.hosts}
        if not any(left.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not any(left.values()), left


# -- provider ---------------------------------------------------------------------------------
def test_connect_errors_name_the_host(ssh_hosts, tmp_path):
    from dask_lithops.standalone.ssh_transport import (
        SSHAuthenticationError,
        SSHHostKeyError,
        SSHUnreachableError,
        connect,
    )

    h0, h1, _ = ssh_hosts.hosts
    conn = connect(f"root@{h0}", key_filename=ssh_hosts.key_filename,
                   known_hosts=ssh_hosts.known_hosts)
    assert conn.run("echo $SSH_CONNECTION").stdout.split()[2] == h0
    conn.close()

    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(SSHHostKeyError, match=f"root@{h0}:22.*not in"):
        connect(f"root@{h0}", key_filename=ssh_hosts.key_filename, known_hosts=str(empty))
    with pytest.warns(UserWarning, match="trusting unknown SSH host key"):
        connect(f"root@{h0}", key_filename=ssh_hosts.key_filename, known_hosts=str(empty),
                trust_unknown_hosts=True).close()

    other_key = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other_key)],
                   check=True)
    with pytest.raises(SSHAuthenticationError, match=f"root@{h0}:22.*authentication"):
        connect(f"root@{h0}", key_filename=str(other_key), known_hosts=ssh_hosts.known_hosts,
                allow_agent=False)

    ssh_hosts.kill(h1)
    with pytest.raises(SSHUnreachableError, match=f"root@{h1}:22.*unreachable"):
        connect(f"root@{h1}", key_filename=ssh_hosts.key_filename,
                known_hosts=ssh_hosts.known_hosts, connect_timeout=3)


def test_process_management_and_tunnel(ssh_hosts):
    import socket

    from dask_lithops.standalone.bootstrap import start_processes, stop_processes
    from dask_lithops.standalone.remote_runtime import client_runtime, prepare_host
    from dask_lithops.standalone.ssh_transport import connect

    h = ssh_hosts.hosts[0]
    conn = connect(f"root@{h}", key_filename=ssh_hosts.key_filename,
                   known_hosts=ssh_hosts.known_hosts)
    try:
        rt = prepare_host(conn, client_runtime(), remote_python=MATCHING_PYTHON)
        assert rt.client_address == ssh_hosts.gateway and rt.server_address == h
        marker = "dask-lithops-test-sleep"
        procs = [{"name": f"p{i}", "log": f"{rt.home}/p{i}.log",
                  "argv": ["sh", "-c", f"echo {marker} READY; sleep 300 & wait"]}
                 for i in range(3)]
        res = start_processes(conn, rt, procs, cwd=rt.home, ready_mark=None)
        assert len(res["pids"]) == 3
        assert sum(c == "sleep 300" for _, c in ssh_hosts.processes_on(h)) == 3
        assert stop_processes(conn, rt, res["pids"], marker, grace=2) == []
        assert not any("sleep 300" in c for _, c in ssh_hosts.processes_on(h))

        # a port forward to a server on the host, as for the remote scheduler
        ssh_hosts.host(h).netns.popen(
            [sys.executable, "-c", "import socket; s=socket.create_server(('127.0.0.1', 47123));"
             "c,_=s.accept(); c.sendall(c.recv(100).upper()); c.close()"])
        time.sleep(0.5)
        t = conn.forward_local("127.0.0.1", 47123)
        with socket.create_connection(("127.0.0.1", t.local_port), timeout=5) as s:
            s.sendall(b"through the tunnel")
            assert s.recv(100) == b"THROUGH THE TUNNEL"
    finally:
        conn.close()


# -- cluster ----------------------------------------------------------------------------------
def test_workloads_on_three_hosts(ssh_hosts):
    import dask
    import dask.array as da
    import dask.dataframe as dd
    import numpy as np
    import pandas as pd
    from distributed import Client

    from dask_lithops.standalone import StandaloneCluster

    with StandaloneCluster(**cluster_kwargs(ssh_hosts)) as cluster, Client(cluster) as client:
        client.wait_for_workers(3, timeout=60)
        hosts_of_workers = {w["host"] for w in client.scheduler_info()["workers"].values()}
        assert hosts_of_workers == set(ssh_hosts.hosts)
        assert cluster.scheduler_address.startswith("tls://")

        total = dask.delayed(sum)([dask.delayed(lambda x: x * x)(i) for i in range(100)])
        assert total.compute() == sum(i * i for i in range(100))

        pdf = pd.DataFrame({"k": np.arange(4000) % 37, "v": np.arange(4000)})
        ddf = dd.from_pandas(pdf, npartitions=12)
        shuffled = ddf.shuffle("k", npartitions=9)
        got = shuffled.groupby("k").v.sum().compute().sort_index()
        pd.testing.assert_series_equal(got, pdf.groupby("k").v.sum(), check_names=False)

        x = da.arange(200_000, chunks=10_000).reshape(400, 500).rechunk((100, 100))
        assert int((x.T @ x).sum().compute()) == int((np.arange(200_000).reshape(400, 500).T
                                                     @ np.arange(200_000).reshape(400, 500)).sum())

        logs = cluster.get_logs()
        assert any(k.endswith("(host log)") and "READY" in v for k, v in logs.items())
        pids = cluster.remote_processes()
        assert sorted(pids) == ["ssh-0", "ssh-1", "ssh-2"]

        cluster.scale(hosts=2)  # whole hosts, gracefully
        deadline = time.monotonic() + 30
        while len(client.scheduler_info()["workers"]) != 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(client.scheduler_info()["workers"]) == 2
        assert_no_dask_left(ssh_hosts, hosts=[ssh_hosts.hosts[2]])
        assert client.submit(lambda: 42).result() == 42
    assert_no_dask_left(ssh_hosts)


def test_remote_scheduler_through_tunnel(ssh_hosts):
    from distributed import Client

    from dask_lithops.standalone import StandaloneCluster

    with StandaloneCluster(scheduler="remote", **cluster_kwargs(ssh_hosts)) as cluster, \
            Client(cluster) as client:
        assert cluster.scheduler_address.startswith("tls://127.0.0.1:")
        client.wait_for_workers(3, timeout=60)
        assert client.submit(lambda x: x + 1, 41).result() == 42
        assert sum(client.gather(client.map(lambda x: x * 2, range(50)))) == 2450
        scheduler_procs = [c for _, c in ssh_hosts.processes_on(ssh_hosts.hosts[0])
                           if "remote_scheduler" in c]
        assert len(scheduler_procs) == 1
        if cluster.dashboard_link:
            import urllib.request

            assert cluster.dashboard_link.startswith("http://127.0.0.1:")
            with urllib.request.urlopen(cluster.dashboard_link, timeout=10) as r:
                assert r.status == 200
    assert_no_dask_left(ssh_hosts)


def test_remote_scheduler_launcher_with_relay_on_its_own(ssh_hosts):
    """The launcher a serverless cluster reuses: a scheduler + relay on a host, no
    StandaloneCluster; a worker outside the host reaches peers only through the relay."""
    import asyncio

    from distributed import Client, Security, Worker

    from dask_lithops.relay import new_token, relay_security, worker_addresses
    from dask_lithops.standalone.hosts import HostSetup
    from dask_lithops.standalone.launchers import RemoteScheduler
    from dask_lithops.standalone.remote_runtime import client_runtime
    from dask_lithops.standalone.ssh_transport import HostSpec, run_in_ssh_thread

    h0 = ssh_hosts.hosts[0]
    setup = HostSetup(dict(key_filename=ssh_hosts.key_filename, known_hosts=ssh_hosts.known_hosts),
                      client_runtime(), remote_python=MATCHING_PYTHON)
    security = relay_security(new_token(), Security.temporary())

    async def main():
        host = await run_in_ssh_thread(setup.prepare, HostSpec.parse(f"root@{h0}"))
        try:
            s = RemoteScheduler(host, run_id="relaytest", security=security,
                                protocol="tls://", relay={"port": 0})
            await s
            try:
                assert s.address.startswith("tls://127.0.0.1:")
                assert s.worker_address.startswith(f"tls://{h0}:")
                assert s.relay_address.startswith(f"{h0}:")
                assert s.relay_local_address.startswith("127.0.0.1:")
                async with Worker(s.address, security=security, nthreads=1,
                                  dashboard_address="127.0.0.1:0",
                                  **worker_addresses(s.relay_address, "w-outside")) as w:
                    assert w.address == f"relay://{s.relay_address}/w-outside"
                    async with Client(s.address, security=security, asynchronous=True) as c:
                        # the scheduler on the host gathers the result through the relay
                        assert await c.submit(lambda x: x + 1, 41) == 42
            finally:
                await s.close()
        finally:
            host.close()

    asyncio.run(main())
    assert_no_dask_left(ssh_hosts, hosts=[h0])


def test_host_killed_mid_computation(ssh_hosts):
    from distributed import Client

    from dask_lithops.standalone import StandaloneCluster

    def slow_square(x):
        import time

        time.sleep(0.05)
        return x * x

    with StandaloneCluster(**cluster_kwargs(ssh_hosts)) as cluster, Client(cluster) as client:
        client.wait_for_workers(3, timeout=60)
        futures = client.map(slow_square, range(200), pure=False)
        while sum(f.done() for f in futures) < 30:
            time.sleep(0.05)
        ssh_hosts.kill(ssh_hosts.hosts[1])  # simulated VM failure
        assert sum(client.gather(futures)) == sum(i * i for i in range(200))
        alive = {w["host"] for w in client.scheduler_info()["workers"].values()}
        assert ssh_hosts.hosts[1] not in alive
    assert_no_dask_left(ssh_hosts)


def test_version_mismatch_installs_venv_or_fails_clearly(ssh_hosts, tmp_path):
    """The hosts' system python lacks dask: the runtime venv path, for real."""
    from distributed import Client

    from dask_lithops.standalone import StandaloneCluster
    from dask_lithops.standalone.remote_runtime import RuntimeMismatchError

    # package_sync=False: the minimal venv (tests/test_package_sync.py syncs the whole environment)
    kw = cluster_kwargs(ssh_hosts, remote_python="/usr/bin/python3", package_sync=False)
    with pytest.raises(RuntimeMismatchError, match=r"root@.*dask: client \S+, host not installed"):
        StandaloneCluster(install_runtime=False, **kw)

    shared = str(tmp_path / "remote")  # the hosts share this filesystem: one venv, file-locked
    with StandaloneCluster(remote_dir=shared, **kw) as cluster, Client(cluster) as client:
        client.wait_for_workers(3, timeout=60)
        pythons = {h.runtime.python for h in cluster._host_states.values()}
        assert pythons == {os.path.join(shared, "runtimes", cluster._runtime_spec.key,
                                        "bin", "python")}
        import dask

        assert client.submit(lambda: dask.__version__).result() == dask.__version__
    assert_no_dask_left(ssh_hosts)
    # reused next time, no install
    with StandaloneCluster(remote_dir=shared, **kw) as cluster:
        assert not any(h.runtime.installed for h in cluster._host_states.values())
    assert_no_dask_left(ssh_hosts)


def test_unknown_host_key_rejected_by_cluster(ssh_hosts, tmp_path):
    from dask_lithops.standalone import StandaloneCluster
    from dask_lithops.standalone.ssh_transport import SSHHostKeyError

    partial = tmp_path / "known_hosts"
    lines = open(ssh_hosts.known_hosts).read().splitlines()
    partial.write_text("\n".join(lines[:2]) + "\n")  # the third host is unknown
    kw = cluster_kwargs(ssh_hosts)
    kw["known_hosts"] = str(partial)
    with pytest.raises(SSHHostKeyError, match=ssh_hosts.hosts[2].replace(".", r"\.")):
        StandaloneCluster(**kw)
    assert_no_dask_left(ssh_hosts)


def test_workers_exit_when_client_dies(ssh_hosts, tmp_path):
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal
        from distributed import Client
        from dask_lithops.standalone import StandaloneCluster
        cluster = StandaloneCluster(hosts={[f"root@{h}" for h in ssh_hosts.hosts]!r},
            ssh_key_filename={ssh_hosts.key_filename!r}, known_hosts={ssh_hosts.known_hosts!r},
            remote_python={MATCHING_PYTHON!r}, worker_processes=1, death_timeout=8)
        client = Client(cluster)
        client.wait_for_workers(3, timeout=60)
        print("READY", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert "READY" in r.stdout, r.stderr[-3000:]
    deadline = time.monotonic() + 40
    while any(ssh_hosts.dask_processes_on(h) for h in ssh_hosts.hosts):
        assert time.monotonic() < deadline, {h: ssh_hosts.dask_processes_on(h)
                                             for h in ssh_hosts.hosts}
        time.sleep(0.5)
