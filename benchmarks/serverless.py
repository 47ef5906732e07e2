"""ServerlessCluster(aws_lambda) against the Lambda emulator, in one run.

    python benchmarks/serverless.py [--sizes 8 32] [--tasks 5000] [--throughput-workers 4]

Measures:
* invocations issued per second by ``scale(n)`` (target >= 500/s)
* time from ``scale(n)`` to n workers registered, and per worker from its
  environment's start to its registration (target <= 1.5 s)
* throughput on tiny tasks vs LocalhostCluster with the same worker count
  (target >= 0.8x)
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time


def inc(x):
    return x + 1


def throughput(client, n_tasks: int) -> float:
    client.gather(client.map(inc, range(100), pure=False))  # warm up
    t0 = time.perf_counter()
    results = client.gather(client.map(inc, range(n_tasks), pure=False))
    dt = time.perf_counter() - t0
    assert sum(results) == sum(range(1, n_tasks + 1))
    return n_tasks / dt


def bench_scale(emu, n: int, memory: int) -> dict:
    from distributed import Client

    from dask_lithops.serverless import ServerlessCluster

    cluster = ServerlessCluster(endpoint_url=emu.endpoint_url, contact_address=emu.host_address,
                                runtime_memory=memory, runtime_timeout=300,
                                dashboard_address=None, invoke_pool_threads=64)
    with cluster, Client(cluster) as client:
        t0 = time.perf_counter()
        cluster.scale(n)
        t_return = time.perf_counter() - t0
        while sum(1 for r in cluster.usage_tracker.records.values() if r.request_id) < n:
            time.sleep(0.001)
        t_issued = time.perf_counter() - t0
        client.wait_for_workers(n, timeout=300)
        t_all = time.perf_counter() - t0
    # environment start -> registered, per worker: the emulator's init duration plus the
    # time from the handler's start (its exit report) to the worker's registration
    inits = {i.request_id: (i.init_ms or 0) / 1000 for i in emu.invocations(cluster.function_name)}
    per_worker = []
    for r in cluster.usage_tracker.records.values():
        report = cluster._exit_reports.get(r.name) or {}
        if r.registered and report.get("started"):
            per_worker.append(inits.get(r.request_id, 0) + (r.registered - report["started"]))
    return {"n": n, "scale_returned_s": t_return, "issued_s": t_issued,
            "invocations_per_s": n / t_issued, "all_registered_s": t_all,
            "env_to_registered_median_s": statistics.median(per_worker) if per_worker else None,
            "env_to_registered_max_s": max(per_worker) if per_worker else None,
            "usage": cluster.usage_tracker.summary()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 32])
    p.add_argument("--tasks", type=int, default=5000)
    p.add_argument("--throughput-workers", type=int, default=4)
    p.add_argument("--memory", type=int, default=512)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from distributed import Client

    from dask_lithops import LocalhostCluster
    from dask_lithops.serverless import ServerlessCluster
    from dask_lithops.testing.lambda_emulator import LambdaEmulator

    sandbox = os.geteuid() == 0
    with LambdaEmulator(sandbox=sandbox, account_concurrency=1000) as emu:
        print(f"emulator {emu.endpoint_url} sandboxed={emu.sandboxed}")
        scale_results = [bench_scale(emu, n, args.memory) for n in args.sizes]
        for r in scale_results:
            print(f"scale({r['n']}): returned in {r['scale_returned_s'] * 1000:.1f} ms, "
                  f"{r['n']} invocations issued in {r['issued_s'] * 1000:.1f} ms "
                  f"= {r['invocations_per_s']:.0f}/s (target >= 500/s, ratio "
                  f"{r['invocations_per_s'] / 500:.2f}); all registered after "
                  f"{r['all_registered_s']:.2f} s; environment start -> registered: median "
                  f"{r['env_to_registered_median_s']:.2f} s, max "
                  f"{r['env_to_registered_max_s']:.2f} s (target <= 1.5 s, ratio "
                  f"{1.5 / r['env_to_registered_median_s']:.2f})")
            print(f"   usage: {r['usage']}")

        n = args.throughput_workers
        cluster = ServerlessCluster(endpoint_url=emu.endpoint_url,
                                    contact_address=emu.host_address, runtime_memory=args.memory,
                                    runtime_timeout=300, dashboard_address=None, n_workers=n)
        with cluster, Client(cluster) as client:
            client.wait_for_workers(n, timeout=300)
            serverless_tps = throughput(client, args.tasks)
    with LocalhostCluster(n_workers=n, threads_per_worker=1, dashboard_address=None) as lc, \
            Client(lc) as client:
        client.wait_for_workers(n)
        local_tps = throughput(client, args.tasks)
    print(f"throughput on {args.tasks} tiny tasks, {n} workers: serverless "
          f"{serverless_tps:.0f} tasks/s (TLS + relay), LocalhostCluster {local_tps:.0f} "
          f"tasks/s: ratio {serverless_tps / local_tps:.2f} (target >= 0.8)")


if __name__ == "__main__":
    main()
