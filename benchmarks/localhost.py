"""LocalhostCluster vs distributed.LocalCluster (and Lithops' localhost executor), side by side.

    .venv/bin/python benchmarks/localhost.py [--workers 2] [--repeat 3]

Prints start time and throughput on 5,000 tiny tasks for both clusters with the
same worker count (interleaved runs, medians), then a 100- and 1,000-task map
vs Lithops' LocalhostExecutor when lithops is installed.  Targets: start time
<= 1.2x LocalCluster's, throughput >= 0.9x LocalCluster's, >= 10x Lithops'
localhost throughput on the 1,000-task map.
"""

from __future__ import annotations

import argparse
import statistics
import time

from distributed import Client, LocalCluster

from dask_lithops import LocalhostCluster


def inc(x):
    return x + 1


def measure(make_cluster, workers: int, tasks: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    with make_cluster() as cluster, Client(cluster) as client:
        client.wait_for_workers(workers)
        start = time.perf_counter() - t0
        client.gather(client.map(inc, range(100), pure=False))  # warm up
        t1 = time.perf_counter()
        results = client.gather(client.map(inc, range(tasks), pure=False))
        elapsed = time.perf_counter() - t1
        assert results == [x + 1 for x in range(tasks)]
    return start, tasks / elapsed


def lithops_map(n: int, workers: int) -> float | None:
    try:
        import lithops
    except ImportError:
        return None
    import sys

    fexec = lithops.LocalhostExecutor(
        config={"lithops": {"backend": "localhost", "storage": "localhost"},
                "localhost": {"runtime": sys.executable, "worker_processes": workers}},
        log_level=None)
    t0 = time.perf_counter()
    futures = fexec.map(inc, range(n))
    results = fexec.get_result(futures)
    elapsed = time.perf_counter() - t0
    fexec.clean()
    assert results == [x + 1 for x in range(n)]
    return n / elapsed


def dask_map(workers: int, n: int) -> float:
    with LocalhostCluster(n_workers=workers, threads_per_worker=1, dashboard_address=":0") as c, \
            Client(c) as client:
        client.wait_for_workers(workers)
        client.gather(client.map(inc, range(10), pure=False))
        t0 = time.perf_counter()
        results = client.gather(client.map(inc, range(n), pure=False))
        elapsed = time.perf_counter() - t0
        assert results == [x + 1 for x in range(n)]
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    w = args.workers
    ours = lambda: LocalhostCluster(n_workers=w, threads_per_worker=1, dashboard_address=":0")  # noqa: E731
    theirs = lambda: LocalCluster(n_workers=w, threads_per_worker=1, dashboard_address=":0")  # noqa: E731
    rows = {"LocalhostCluster": [], "LocalCluster": []}
    for _ in range(args.repeat):  # interleaved, so machine noise hits both alike
        rows["LocalhostCluster"].append(measure(ours, w, args.tasks))
        rows["LocalCluster"].append(measure(theirs, w, args.tasks))
    med = {k: (statistics.median(s for s, _ in v), statistics.median(t for _, t in v))
           for k, v in rows.items()}
    print(f"workers={w}, {args.tasks} tiny tasks, median of {args.repeat} interleaved runs")
    print(f"{'cluster':<18}{'start s':>10}{'tasks/s':>12}")
    for k, (s, t) in med.items():
        print(f"{k:<18}{s:>10.2f}{t:>12.0f}")
    start_ratio = med["LocalhostCluster"][0] / med["LocalCluster"][0]
    tput_ratio = med["LocalhostCluster"][1] / med["LocalCluster"][1]
    print(f"start time ratio (ours/LocalCluster): {start_ratio:.2f}  (target <= 1.2)")
    print(f"throughput ratio (ours/LocalCluster): {tput_ratio:.2f}  (target >= 0.9)")

    for n in (100, 1000):
        lith = lithops_map(n, w)
        ours_tp = dask_map(w, n)
        if lith is None:
            print(f"map of {n}: LocalhostCluster {ours_tp:.0f} tasks/s; lithops not installed")
        else:
            print(f"map of {n}: LocalhostCluster {ours_tp:.0f} tasks/s, Lithops LocalhostExecutor "
                  f"{lith:.0f} tasks/s, ratio {ours_tp / lith:.1f}x"
                  + ("  (target >= 10x)" if n == 1000 else ""))


if __name__ == "__main__":
    main()
