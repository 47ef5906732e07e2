"""Workers that die: recovery or a named error, never an endless wait (LocalhostCluster).

The same base mechanism serves every mode (see dask_lithops.failures); the
serverless and standalone scenarios are in their modes' test modules.
"""

import logging
import os
import sys
import time

import dask
import pytest
from distributed import Client, KilledWorker

from dask_lithops import LocalhostCluster
from dask_lithops.cluster import ClusterClosedError
from dask_lithops.failures import TaskKilledWorkersError, WorkerFailureError
from dask_lithops.testing.workloads import hold_memory, inc


def pid_alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_memory_kill_twice_then_the_cluster_still_computes(start_method, caplog):
    caplog.set_level(logging.INFO, logger="dask_lithops")
    with dask.config.set({"distributed.scheduler.allowed-failures": 1,
                          "lithops.cluster.nanny_start_method": start_method}), \
            LocalhostCluster(n_workers=1, threads_per_worker=1, memory_limit="300MB",
                             dashboard_address=None) as cluster, Client(cluster) as client:
        nanny_pid = next(iter(cluster.workers.values())).process.pid
        start = time.monotonic()
        with pytest.raises(KilledWorker) as err:  # killed twice (allowed-failures=1), failed
            client.submit(hold_memory, 600, pure=False).result(timeout=60)
        assert time.monotonic() - start < 60
        # dask's KilledWorker, saying why the workers died and what to do
        assert isinstance(err.value, TaskKilledWorkersError) and err.value.kind == "out-of-memory"
        assert "ran out of memory" in str(err.value) and "raise memory_limit" in str(err.value)
        # the nanny survived both kills and restarted its worker: the cluster computes
        assert client.submit(inc, 1).result(timeout=30) == 2
        assert pid_alive(nanny_pid)
        assert len(client.scheduler_info()["workers"]) == 1 == len(cluster.worker_spec)
        deadline = time.monotonic() + 10  # the second kill's check may still run
        while time.monotonic() < deadline and len(cluster.worker_failures) < 2:
            time.sleep(0.1)
        oom = [f for f in cluster.worker_failures if f.kind == "out-of-memory"]
        assert len(oom) == 2, cluster.worker_failures
        assert oom[0].detail["limit"] == 300_000_000
        assert "ran out of memory" in str(oom[0]) and "raise memory_limit" in str(oom[0])
        logged = [r for r in caplog.records if r.levelno == logging.ERROR
                  and "ran out of memory" in r.getMessage()]
        assert len(logged) == 1  # once, however often it happens
    assert not pid_alive(nanny_pid)


def test_a_task_that_kills_every_worker_fails_with_the_reason_while_others_finish():
    """The crash loop never triggers (other tasks keep finishing): dask's allowed-failures
    ends the poison task, and its KilledWorker carries the reason and the fix."""
    with LocalhostCluster(n_workers=2, threads_per_worker=2, memory_limit="300MB",
                          dashboard_address=None) as cluster, Client(cluster) as client:
        start = time.monotonic()
        poison = client.submit(hold_memory, 600, pure=False)
        others, i = [], 0
        while not poison.done() and time.monotonic() - start < 90:
            others.append(client.submit(inc, i, pure=False))
            i += 1
            time.sleep(0.05)
        with pytest.raises(KilledWorker) as err:
            poison.result(timeout=1)
        elapsed = time.monotonic() - start
        assert isinstance(err.value, TaskKilledWorkersError), repr(err.value)
        assert err.value.kind == "out-of-memory" and err.value.allowed_failures == 3
        text = str(err.value)
        assert "4 different workers" in text and "ran out of memory" in text, text
        assert "286.10 MiB" in text and "raise memory_limit" in text, text
        assert isinstance(err.value, WorkerFailureError)  # the cluster's own type catches it too
        assert elapsed < 60
        # the other tasks kept finishing meanwhile, every result right; the cluster computes
        assert client.gather(others) == [j + 1 for j in range(i)]
        assert i >= 5
        assert client.submit(inc, 41).result(timeout=30) == 42
        client.wait_for_workers(2, timeout=30)  # the last one killed is back (nanny restart)
        assert len(client.scheduler_info()["workers"]) == 2 == len(cluster.worker_spec)
        assert cluster._gave_up is None  # no crash loop: the error came from allowed-failures


@pytest.fixture
def client_only_module(tmp_path, monkeypatch):
    """A module importable in the client only (a script's helper next to it)."""
    (tmp_path / "client_helpers.py").write_text("def double(x):\n    return 2 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import client_helpers

    yield client_helpers
    sys.modules.pop("client_helpers", None)


def test_missing_module_fails_the_computation_with_the_fix(client_only_module, caplog):
    with LocalhostCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        start = time.monotonic()
        futures = client.map(client_only_module.double, range(4))
        with pytest.raises(WorkerFailureError) as info:
            client.gather(futures)
        elapsed = time.monotonic() - start
        assert elapsed < 60, elapsed
        message = str(info.value)
        assert "module 'client_helpers' is a local file of the client" in message
        assert f"client.upload_file('{client_only_module.__file__}')" in message
        assert "crash_loop_limit" in message
        failures = cluster.worker_failures
        assert failures and {f.kind for f in failures} == {"missing-module"}
        assert len(failures) <= cluster.crash_loop_limit + 1  # bounded attempts
        logged = [r for r in caplog.records if r.levelno >= logging.ERROR
                  and "cannot run the computation" in r.getMessage()]
        assert len(logged) == 1
        # the cluster's spec and the scheduler agree (once the last ends are handled):
        # dead workers are not replaced; a replacement that got no task lives on
        def names():
            return {w["name"] for w in client.scheduler_info()["workers"].values()}

        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and names() != set(cluster.worker_spec):
            time.sleep(0.1)
        assert names() == set(cluster.worker_spec)
        assert len(cluster.worker_spec) < 2
        pids = [w.process.pid for w in cluster.workers.values()]
        # it works again once the module is there
        cluster.scale(1)
        client.wait_for_workers(1, timeout=30)
        assert client.submit(inc, 1).result(timeout=30) == 2
        pids += [w.process.pid for w in cluster.workers.values()]
    assert not [p for p in pids if pid_alive(p)]


def test_a_crashed_worker_is_replaced_under_a_new_name():
    with LocalhostCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        before = set(cluster.worker_spec)
        victim = sorted(before)[0]
        os.killpg(cluster.workers[victim].process.pid, 9)  # nanny and worker: the whole group
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (victim in cluster.worker_spec or len(
                client.scheduler_info()["workers"]) < 2):
            time.sleep(0.2)
        names = {w["name"] for w in client.scheduler_info()["workers"].values()}
        assert victim not in names and len(names) == 2 and names == set(cluster.worker_spec)
        assert cluster.worker_failures[0].kind == "signal"
        assert "SIGKILL" in str(cluster.worker_failures[0])
        assert client.submit(inc, 1).result(timeout=30) == 2


def test_use_after_close_is_a_clear_error():
    cluster = LocalhostCluster(n_workers=1, dashboard_address=None)
    cluster.close()
    with pytest.raises(ClusterClosedError, match="closed"):
        cluster.scale(2)
    with pytest.raises(ClusterClosedError, match="closed"):
        with cluster:
            pass
    with pytest.raises(ClusterClosedError, match="closed"):
        cluster.get_logs()


def test_a_worker_whose_scheduler_closed_exits_at_once():
    """The entry point (a nanny, as localhost and SSH hosts run it) started after its
    scheduler closed: it exits 0 as scheduler-unreachable after REFUSED_GRACE of refused
    connections, not after death_timeout."""
    import asyncio
    import subprocess

    from distributed import Scheduler

    from dask_lithops.payload import LaunchPayload, encode
    from dask_lithops.worker import READY_MARK, REFUSED_GRACE

    async def closed_scheduler_address():
        async with Scheduler(host="127.0.0.1", port=0, dashboard_address=None) as s:
            return s.address

    address = asyncio.run(closed_scheduler_address())
    payload = LaunchPayload(scheduler_address=address, name="late-0", nanny=True,
                            death_timeout=60.0, memory_limit=None)
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "dask_lithops.worker", "--payload", "-"],
                       input=encode(payload), capture_output=True, timeout=60)
    elapsed = time.monotonic() - start
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert "worker late-0 stopped: scheduler-unreachable" in r.stderr.decode()
    assert READY_MARK.encode() not in r.stdout
    assert REFUSED_GRACE <= elapsed < REFUSED_GRACE + 15, elapsed  # far below death_timeout
