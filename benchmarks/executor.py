"""Lithops' API on dask-lithops: LocalhostExecutor vs Lithops' own and vs plain client.map.

    .venv/bin/python benchmarks/executor.py [--workers 2] [--tasks 1000] [--repeat 5]

A ``map`` of ``--tasks`` tiny calls followed by ``get_result``, timed on warm workers:

- dask-lithops' ``LocalhostExecutor`` (its LocalhostCluster: ``--workers`` single-threaded
  worker processes) vs plain ``client.gather(client.map(...))`` on the same cluster,
  interleaved, median of ``--repeat`` runs (target >= 0.8x);
- Lithops' own ``LocalhostExecutor`` with the same number of worker processes (one run,
  when ``lithops`` is installed: ``pip install 'dask-lithops[bench]'``; target >= 50x).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import dask_lithops


def inc(x):
    return x + 1


def ours(fexec, n: int) -> float:
    t0 = time.perf_counter()
    fexec.map(inc, range(n))
    results = fexec.get_result()
    elapsed = time.perf_counter() - t0
    assert results == [x + 1 for x in range(n)]
    return elapsed


def plain(client, n: int) -> float:
    t0 = time.perf_counter()
    results = client.gather(client.map(inc, range(n), pure=False))
    elapsed = time.perf_counter() - t0
    assert results == [x + 1 for x in range(n)]
    return elapsed


def lithops_own(n: int, workers: int) -> float | None:
    try:
        import lithops
    except ImportError:
        return None
    fexec = lithops.LocalhostExecutor(
        config={"lithops": {"backend": "localhost", "storage": "localhost"},
                "localhost": {"runtime": sys.executable, "worker_processes": workers}},
        log_level=None)
    try:
        fexec.get_result(fexec.map(inc, range(workers)), show_progressbar=False)  # warm up
        t0 = time.perf_counter()
        results = fexec.get_result(fexec.map(inc, range(n)), show_progressbar=False)
        elapsed = time.perf_counter() - t0
    finally:
        fexec.clean()
        fexec.__exit__(None, None, None)
    assert results == [x + 1 for x in range(n)]
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--skip-lithops", action="store_true")
    args = parser.parse_args()
    n, w = args.tasks, args.workers

    times = {"LocalhostExecutor": [], "client.map": []}
    with dask_lithops.LocalhostExecutor(worker_processes=w, threads_per_worker=1,
                                        dashboard_address=None) as fexec:
        client = fexec.client
        client.wait_for_workers(w)
        ours(fexec, 100)  # warm up: imports, connections
        plain(client, 100)
        for i in range(args.repeat):  # interleaved, alternating who goes first
            pair = [("LocalhostExecutor", lambda: ours(fexec, n)), ("client.map", lambda: plain(client, n))]
            for name, run in (pair if i % 2 == 0 else pair[::-1]):
                times[name].append(run())
    med = {k: statistics.median(v) for k, v in times.items()}
    lith = None if args.skip_lithops else lithops_own(n, w)

    print(f"map of {n} tiny calls + get_result, {w} worker processes; median of {args.repeat} "
          "interleaved runs (Lithops: one run)")
    print(f"{'executor':<34}{'seconds':>10}{'calls/s':>10}")
    rows = [("dask-lithops LocalhostExecutor", med["LocalhostExecutor"]),
            ("plain client.map + gather", med["client.map"])]
    if lith is not None:
        rows.append(("Lithops LocalhostExecutor", lith))
    for name, secs in rows:
        print(f"{name:<34}{secs:>10.3f}{n / secs:>10.0f}")
    print(f"ours / client.map throughput: {med['client.map'] / med['LocalhostExecutor']:.2f}  "
          "(target >= 0.8)")
    if lith is None:
        print("Lithops: not installed (pip install 'dask-lithops[bench]') or skipped")
    else:
        print(f"ours / Lithops throughput: {lith / med['LocalhostExecutor']:.0f}x  (target >= 50x)")


if __name__ == "__main__":
    main()
