"""StandaloneCluster(backend="ssh") vs distributed.SSHCluster on the same namespace hosts.

    sudo .venv/bin/python benchmarks/standalone_ssh.py [--hosts 4] [--tasks 5000]

One run each: time from constructor call to a cluster with every worker
registered, and throughput on ``--tasks`` tiny tasks.  Both use the hosts'
Python that already matches the client (SSHCluster cannot install one), one
worker process per host, nannies on.  StandaloneCluster runs with its defaults
(TLS on, scheduler in this process); SSHCluster with its own (plain TCP,
scheduler on the first host).  Needs root (network namespaces) and asyncssh.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def tiny(x):
    return x + 1


async def measure(make_cluster, n_workers: int, tasks: int) -> dict:
    from distributed import Client

    t0 = time.perf_counter()
    cluster = await make_cluster()
    async with Client(cluster, asynchronous=True) as client:
        await client.wait_for_workers(n_workers, timeout=120)
        ready = time.perf_counter() - t0
        await client.gather(client.map(tiny, range(200), pure=False))  # warm up
        t1 = time.perf_counter()
        futures = client.map(tiny, range(tasks), pure=False)
        total = sum(await client.gather(futures))
        elapsed = time.perf_counter() - t1
        assert total == sum(range(1, tasks + 1))
    await cluster.close()
    return {"ready_s": ready, "tasks_per_s": tasks / elapsed}


async def main(n_hosts: int, tasks: int) -> None:
    import logging

    logging.getLogger("distributed").setLevel(logging.ERROR)
    from dask_lithops.standalone import StandaloneCluster
    from dask_lithops.testing.ssh_hosts import SSHHosts, ssh_hosts_available

    reason = ssh_hosts_available()
    if reason:
        sys.exit(f"cannot make SSH namespace hosts: {reason}")
    with SSHHosts(n_hosts) as world:
        hosts = [f"root@{h}" for h in world.hosts]
        python = sys.executable

        async def ours():
            return await StandaloneCluster(
                hosts=hosts, ssh_key_filename=world.key_filename, known_hosts=world.known_hosts,
                remote_python=python, worker_processes=1, threads_per_worker=1,
                dashboard_address=None, asynchronous=True)

        async def theirs():
            from distributed import SSHCluster

            return await SSHCluster(
                [world.hosts[0]] + world.hosts, remote_python=python,
                connect_options={"known_hosts": world.known_hosts, "username": "root",
                                 "client_keys": [world.key_filename]},
                worker_options={"nthreads": 1}, scheduler_options={"dashboard_address": None},
                asynchronous=True)

        a = await measure(ours, n_hosts, tasks)
        b = await measure(theirs, n_hosts, tasks)
    print(f"hosts={n_hosts} tasks={tasks}")
    print(f"StandaloneCluster: ready {a['ready_s']:.2f}s, {a['tasks_per_s']:.0f} tasks/s")
    print(f"SSHCluster:        ready {b['ready_s']:.2f}s, {b['tasks_per_s']:.0f} tasks/s")
    print(f"bring-up ratio (ours/SSHCluster, target <= 0.8): {a['ready_s'] / b['ready_s']:.2f}")
    print(f"throughput ratio (ours/SSHCluster, target >= 0.9): "
          f"{a['tasks_per_s'] / b['tasks_per_s']:.2f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--hosts", type=int, default=4)
    p.add_argument("--tasks", type=int, default=5000)
    args = p.parse_args()
    asyncio.run(main(args.hosts, args.tasks))
