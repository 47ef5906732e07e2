"""Benchmark: StandaloneCluster(backend="aws_ec2") in the test world (moto + VM booter).

    sudo .venv/bin/python benchmarks/standalone_ec2.py [--vms 3] [--soft 10]

Prints: start time (cluster ready, every worker registered) for ``exec_mode``
create, reuse on a cold pool (creates, stops on close) and reuse on a warm pool
(starts the stopped VMs); then how long a SIGKILLed client's VMs keep running
(target: <= soft_dismantle_timeout + 10 s).  VMs' system python lacks dask, so
each fresh VM builds its runtime venv -- what reuse saves, as on real EC2.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from dask_lithops.testing.moto_server import DUMMY_CREDENTIALS
from dask_lithops.testing.vm_booter import EC2World, spawn_client


def start_close(world, n, **kw):
    from distributed import Client

    from dask_lithops import StandaloneCluster

    t0 = time.perf_counter()
    with StandaloneCluster(backend="aws_ec2", n_vms=n, dashboard_address=None,
                           **world.cluster_options(**kw)) as cluster, Client(cluster) as client:
        client.wait_for_workers(n, timeout=300)
        ready = time.perf_counter() - t0
        assert client.submit(sum, [1, 2]).result() == 3
        ids = [v.instance_id for v in cluster.vms]
    return ready, ids


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vms", type=int, default=3)
    ap.add_argument("--soft", type=float, default=10.0)
    ap.add_argument("--python", default="/usr/bin/python3",
                    help="the VMs' python (a bare one: each new VM builds the runtime venv)")
    args = ap.parse_args()
    os.environ.update(DUMMY_CREDENTIALS)
    common = dict(remote_python=args.python, install_runtime=True, start_timeout=120,
                  soft_dismantle_timeout=60)
    with EC2World() as world:
        create, _ = start_close(world, args.vms, exec_mode="create", **common)
        cold, ids1 = start_close(world, args.vms, exec_mode="reuse", **common)
        warm, ids2 = start_close(world, args.vms, exec_mode="reuse", **common)
        assert sorted(ids1) == sorted(ids2), "reuse did not start the stopped VMs"
        print(f"start {args.vms} VMs: create {create:.1f}s | reuse, cold pool {cold:.1f}s | "
              f"reuse, warm pool (stopped VMs started) {warm:.1f}s")

        proc, ids = spawn_client(world, n_vms=args.vms, exec_mode="create",
                                 soft_dismantle_timeout=args.soft, **{
                                     k: v for k, v in common.items()
                                     if k != "soft_dismantle_timeout"})
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        killed = time.time()
        deadline = killed + args.soft + 60
        while time.time() < deadline:
            states = {i["InstanceId"]: i["State"]["Name"] for i in world.instances()
                      if i["InstanceId"] in ids}
            if all(s in ("stopped", "terminated", "stopping", "shutting-down")
                   for s in states.values()) and not set(world.booter.running()) & set(ids):
                break
            time.sleep(0.2)
        downs = [world.booter.event_time(i, "down") for i in ids]
        if None in downs:
            print(f"killed client: VMs still running after {time.time() - killed:.1f}s: {states}")
            sys.exit(1)
        worst = max(downs) - killed
        print(f"killed client (SIGKILL): its {len(ids)} VMs kept running {worst:.1f}s "
              f"(soft_dismantle_timeout {args.soft:.0f}s; target <= {args.soft + 10:.0f}s: "
              f"{'OK' if worst <= args.soft + 10 else 'MISSED'})")
        world.client()  # moto still up: everything below is terminated by clean()
        from dask_lithops.standalone.providers.aws_ec2 import EC2Provider

        EC2Provider(world.cluster_options(soft_dismantle_timeout=1, hard_dismantle_timeout=2),
                    "bench").clean(all_users=True)


if __name__ == "__main__":
    main()
