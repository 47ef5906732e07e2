"""ServerlessCluster against the offline emulators, one backend after the other, in one run.

    python benchmarks/serverless.py [--backend aws_lambda gcp_functions] [--sizes 1 8 32]
                                    [--queued 128] [--tasks 5000]

Each emulator runs in a child process (its own interpreter and GIL), so its work
does not count against the client's launch rate; on a 2-core machine it still
shares the CPUs with the client and with the environments it starts.

Measures, per backend:
* worker launches per second by ``scale(n)``: launches the platform took
  (Lambda: Event invokes answered 202; Cloud Run functions: worker requests
  sent in full) divided by the time from ``scale(n)`` until the last one
  (target >= 500/s), and the client's CPU per launch.  ``--queued N`` measures
  the same with nothing starting -- Lambda: the function's reserved concurrency
  at 0 (events queue); Cloud Run functions: a function deployed with
  ``maxInstanceCount`` 1 (the rest are answered 429 at once and retried with
  backoff) -- the client's own rate without n cold starts competing for the CPUs.
* per worker, from its environment's process start (the handler reports it) to
  its registration with the scheduler (target <= 1.5 s), with the cold path's
  parts; n=1 is uncontended, larger n cold-start n environments at once.
* throughput on tiny tasks vs LocalhostCluster with the same worker count
  (target >= 0.8x)
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import signal
import statistics
import sys
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


# ---------------------------------------------------------------- emulator in a child process


def _emulator_child(conn, backend: str, kwargs: dict) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # run emu.stop() below
    if backend == "gcp_functions":
        from dask_lithops.testing.gcp_functions_emulator import CloudFunctionsEmulator

        emu = CloudFunctionsEmulator(**kwargs).start()
        info = {"credentials_file": str(emu.credentials_file), "project": emu.project,
                "region": emu.region}
    else:
        from dask_lithops.testing.lambda_emulator import LambdaEmulator

        emu = LambdaEmulator(**kwargs).start()
        info = {}
    try:
        conn.send({"endpoint_url": emu.endpoint_url, "host_address": emu.host_address,
                   "sandboxed": emu.sandboxed, **info})
        while True:
            try:
                name, args = conn.recv()
            except EOFError:
                return
            if name == "stop":
                return
            try:
                attr = getattr(emu, name)
                conn.send(("ok", attr(*args) if callable(attr) else attr))
            except Exception as e:  # noqa: BLE001 -- reported to the parent
                conn.send(("error", repr(e)))
    finally:
        emu.stop()


class EmulatorProcess:
    """A backend's emulator in a spawned child; attributes and methods are called over a pipe."""

    def __init__(self, backend: str = "aws_lambda", **kwargs):
        ctx = multiprocessing.get_context("spawn")
        self.backend = backend
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_emulator_child, args=(child, backend, kwargs),
                                   name=f"{backend}-emulator", daemon=True)
        self.process.start()
        child.close()
        info = self._recv(timeout=120)
        self.endpoint_url = info["endpoint_url"]
        self.host_address = info["host_address"]
        self.sandboxed = info["sandboxed"]
        self.info = info

    def cluster_options(self) -> dict:
        """What a ServerlessCluster needs to use this emulator."""
        opts = {"backend": self.backend, "endpoint_url": self.endpoint_url,
                "contact_address": self.host_address}
        if self.backend == "gcp_functions":
            opts.update(credentials_path=self.info["credentials_file"],
                        project_name=self.info["project"], region=self.info["region"])
        return opts

    def busy(self, function: str) -> bool:
        """Does an environment/instance of ``function`` still exist?"""
        if self.backend == "gcp_functions":
            return any(i.function.rsplit("/", 1)[-1] == function
                       for i in self.call("instances"))
        return any(e.function == function for e in self.call("environments"))

    def _recv(self, timeout: float):
        deadline = time.monotonic() + timeout
        while not self._conn.poll(0.2):
            if not self.process.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the emulator process (pid {self.process.pid}) "
                                   f"{'died' if not self.process.is_alive() else 'hangs'}")
        return self._conn.recv()

    def call(self, name: str, *args):
        self._conn.send((name, args))
        status, value = self._recv(timeout=60)
        if status != "ok":
            raise RuntimeError(f"emulator.{name}: {value}")
        return value

    def stop(self) -> None:
        if self.process.is_alive():
            try:
                self._conn.send(("stop", ()))
            except OSError:
                pass
            self.process.join(90)
        if self.process.is_alive():  # by PID: SIGTERM runs its cleanup, SIGKILL if stuck
            os.kill(self.process.pid, signal.SIGTERM)
            self.process.join(60)
        if self.process.is_alive():
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


# ---------------------------------------------------------------- measurements


def _median(values):
    return statistics.median(values) if values else float("nan")


def _issue(cluster, n: int) -> dict:
    """scale(n), then wait until every invoke returned: the rate and the client's CPU."""
    cpu0 = time.process_time()
    t0 = time.time()
    cluster.scale(n)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        recs = [r for r in list(cluster.usage_tracker.records.values()) if r.invoked >= t0]
        if len(recs) >= n and all(r.accepted for r in recs):
            break
        time.sleep(0.005)  # the timestamps are taken by the cluster; this only polls
    cpu = time.process_time() - cpu0
    accepted = [r.accepted for r in recs if r.accepted]
    last = max(accepted) - t0 if accepted else float("nan")
    return {"accepted": len(accepted), "issued_s": last, "rate": len(accepted) / last,
            "client_cpu_ms": cpu / max(1, len(accepted)) * 1000, "t0": t0}


def bench_scale(emu, n: int, memory: int) -> dict:
    from distributed import Client

    from dask_lithops.serverless import ServerlessCluster

    cluster = ServerlessCluster(**emu.cluster_options(), runtime_memory=memory,
                                runtime_timeout=300, dashboard_address=None,
                                invoke_pool_threads=64)
    with cluster, Client(cluster) as client:
        # the runtime check's environment is reaped first: every worker cold-starts
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and emu.busy(cluster.function_name):
            time.sleep(0.5)
        issued = _issue(cluster, n)
        client.wait_for_workers(n, timeout=300)
        t_all = time.time() - issued["t0"]
        function = cluster.function_name
    if emu.backend == "aws_lambda":
        cold = {i.request_id: i.cold for i in emu.call("invocations", function)}
    else:  # a request is a cold start when its instance's process started after it was sent
        cold = {r.request_id: ((cluster._exit_reports.get(r.name) or {}).get("timeline") or {})
                .get("process_start", 0) > r.invoked - 0.05
                for r in cluster.usage_tracker.records.values()}
    parts = {k: [] for k in ("start->module", "module->handler", "handler->imports",
                             "imports->reachable", "reachable->registered")}
    per_worker, warm = [], 0
    for r in cluster.usage_tracker.records.values():
        report = cluster._exit_reports.get(r.name) or {}
        tl = report.get("timeline") or {}
        if not (r.registered and tl.get("process_start")):
            continue
        if not cold.get(r.request_id, True):
            warm += 1  # a reused environment: not a cold start
            continue
        per_worker.append(r.registered - tl["process_start"])
        # "registered" in the timeline is the worker's own view; the scheduler's is r.registered
        marks = [tl["process_start"], tl["module_loaded"], tl["handler"], tl["imports"],
                 tl.get("reachable"), r.registered]
        for key, a, b in zip(parts, marks, marks[1:]):
            if a and b:
                parts[key].append(b - a)
    return {"n": n, **issued, "all_registered_s": t_all, "cold": len(per_worker), "warm": warm,
            "env_to_registered_median_s": _median(per_worker),
            "env_to_registered_max_s": max(per_worker) if per_worker else float("nan"),
            "parts": {k: _median(v) for k, v in parts.items()},
            "usage": cluster.usage_tracker.summary()}


def bench_queued(emu, n: int, memory: int) -> dict:
    """The launch rate alone: nothing (Cloud Run functions: one instance) starts."""
    from dask_lithops.serverless import ServerlessCluster

    options = dict(**emu.cluster_options(), runtime_memory=memory, runtime_timeout=300,
                   dashboard_address=None, invoke_pool_threads=64)
    if emu.backend == "gcp_functions":
        # a function of its own (memory) deployed with maxInstanceCount 1; the cluster
        # below uses it as it is: all but one request are refused (429) at once
        with ServerlessCluster(**options, max_workers=1):
            pass
    cluster = ServerlessCluster(**options)
    with cluster:
        if emu.backend == "aws_lambda":
            # a function of its own (memory): its queued events never start later
            cluster.backend.client.put_function_concurrency(
                FunctionName=cluster.function_name, ReservedConcurrentExecutions=0)
        runs = []
        for _ in range(3):
            runs.append(_issue(cluster, n))
            cluster.scale(0)
            time.sleep(0.5)
    return {"n": n, "runs": runs}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--backend", nargs="+", default=["aws_lambda", "gcp_functions"],
                   choices=["aws_lambda", "gcp_functions"])
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--queued", type=int, default=128,
                   help="invoke-rate run with nothing starting (0: skip)")
    p.add_argument("--tasks", type=int, default=5000)
    p.add_argument("--throughput-workers", type=int, default=4)
    p.add_argument("--memory", type=int, default=512)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("distributed").setLevel(logging.ERROR)
    from distributed import Client

    from dask_lithops import LocalhostCluster

    sandbox = os.geteuid() == 0
    with LocalhostCluster(n_workers=args.throughput_workers, threads_per_worker=1,
                          dashboard_address=None) as lc, Client(lc) as client:
        client.wait_for_workers(args.throughput_workers)
        local_tps = throughput(client, args.tasks)
    for backend in args.backend:
        run_backend(backend, args, sandbox, local_tps)


def run_backend(backend: str, args, sandbox: bool, local_tps: float) -> None:
    from distributed import Client

    from dask_lithops.serverless import ServerlessCluster

    # idle environments are reaped quickly: each size cold-starts its workers.  (A bigger
    # namespace ``prewarm`` made it worse: the pool refills to it during the burst.)
    if backend == "aws_lambda":
        kwargs = dict(sandbox=sandbox, account_concurrency=1000, idle_timeout=2.0)
    else:
        kwargs = dict(sandbox=sandbox, idle_timeout=2.0)
    with EmulatorProcess(backend, **kwargs) as emu:
        print(f"[{backend}] emulator {emu.endpoint_url} (pid {emu.process.pid}) "
              f"sandboxed={emu.sandboxed}", flush=True)
        for n in args.sizes:
            r = bench_scale(emu, n, args.memory)
            print(f"[{backend}] scale({n}): {r['accepted']} launches taken in "
                  f"{r['issued_s'] * 1000:.1f} ms = {r['rate']:.0f}/s (target >= 500/s, ratio "
                  f"{r['rate'] / 500:.2f}), client CPU {r['client_cpu_ms']:.2f} ms/launch; all "
                  f"registered after {r['all_registered_s']:.2f} s", flush=True)
            print(f"   process start -> registered ({r['cold']} cold starts, {r['warm']} warm "
                  f"skipped): median {r['env_to_registered_median_s']:.2f} s, max "
                  f"{r['env_to_registered_max_s']:.2f} s (target <= 1.5 s, ratio "
                  f"{1.5 / r['env_to_registered_median_s']:.2f}); medians: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in r["parts"].items()), flush=True)
            print(f"   usage: {r['usage']}", flush=True)
            time.sleep(4)  # idle environments are reaped
        if args.queued:
            q = bench_queued(emu, args.queued, args.memory + 64)
            print(f"[{backend}] scale({q['n']}) with nothing starting: "
                  + "; ".join(f"{x['rate']:.0f}/s, {x['client_cpu_ms']:.2f} ms CPU/launch"
                              for x in q["runs"])
                  + f" (target >= 500/s, best ratio {max(x['rate'] for x in q['runs']) / 500:.2f})",
                  flush=True)

        n = args.throughput_workers
        cluster = ServerlessCluster(**emu.cluster_options(), runtime_memory=args.memory,
                                    runtime_timeout=300, dashboard_address=None, n_workers=n)
        with cluster, Client(cluster) as client:
            client.wait_for_workers(n, timeout=300)
            serverless_tps = throughput(client, args.tasks)
    print(f"[{backend}] throughput on {args.tasks} tiny tasks, {n} workers: serverless "
          f"{serverless_tps:.0f} tasks/s (TLS + relay), LocalhostCluster {local_tps:.0f} "
          f"tasks/s: ratio {serverless_tps / local_tps:.2f} (target >= 0.8)", flush=True)


if __name__ == "__main__":
    main()
