"""Workers that die on Lambda (the emulator): a named error within a bound, never a hang."""

from __future__ import annotations

import logging
import sys
import time

import pytest

pytest.importorskip("boto3")
pytest.importorskip("awslambdaric")

from distributed import Client  # noqa: E402
from lambda_world import (  # noqa: E402,F401  (fixtures: emulator, runtime_package)
    emulator,
    make_cluster,
    runtime_package,
    wait_no_busy,
)

from dask_lithops.failures import WorkerFailureError  # noqa: E402
from dask_lithops.serverless.cluster import LIFETIME_ATTEMPTS  # noqa: E402

pytestmark = pytest.mark.timeout(300)


def task_functions():
    """Task functions pickled by value (defined locally): the function's runtime has
    dask_lithops' runtime modules, not this test module nor dask_lithops.testing."""

    def sleep_then(seconds, value=None):
        import time

        time.sleep(seconds)
        return value

    def grow_memory(mb, step_mb=4):
        import time

        chunks = []
        for _ in range(mb // step_mb):
            chunks.append(b"\x01" * (step_mb * 2**20))  # touched pages: resident
            time.sleep(0.01)
        return sum(len(c) for c in chunks)

    return sleep_then, grow_memory


def test_task_longer_than_the_function_lifetime_fails_naming_the_fix(emulator, runtime_package):
    sleep_then, _ = task_functions()
    cluster = make_cluster(emulator, runtime_timeout=20)
    fn = cluster.function_name
    with cluster, Client(cluster) as client:
        cluster.scale(1)
        client.wait_for_workers(1, timeout=60)
        start = time.monotonic()
        with pytest.raises(WorkerFailureError) as info:
            client.submit(sleep_then, 300, pure=False).result(timeout=120)
        elapsed = time.monotonic() - start
        message = str(info.value)
        assert "ran longer than a worker's lifetime" in message
        assert "runtime_timeout up to the backend's limit of 900s" in message
        assert "split the task" in message and "StandaloneCluster" in message
        # bounded: LIFETIME_ATTEMPTS workers' lifetimes (15 s each), plus the replacements'
        # cold starts (measured: seconds alone, tens of seconds on a loaded machine)
        records = cluster.usage()["workers"]
        starts = sum(r["registered"] - r["invoked"] for r in records if r["registered"])
        assert elapsed < LIFETIME_ATTEMPTS * cluster.worker_lifetime + starts + 10, \
            (elapsed, starts)
        assert [f.kind for f in cluster.worker_failures] == ["timeout"]
        # the cluster still works, and no invocation ran on to the platform's timeout
        assert client.submit(sleep_then, 0.1, 7).result(timeout=60) == 7
        timedout = [i for i in emulator.invocations(fn) if i.status == "timedout"]
        assert not timedout
    assert wait_no_busy(emulator, fn) == []


def test_out_of_memory_reason_reaches_the_client_and_close_is_prompt(
        emulator, runtime_package, caplog):
    caplog.set_level(logging.WARNING)
    _, grow_memory = task_functions()
    cluster = make_cluster(emulator, runtime_memory=512)
    fn = cluster.function_name
    with cluster, Client(cluster) as client:
        cluster.scale(1)
        client.wait_for_workers(1, timeout=60)
        # a normal start prints no TLS warning (the handler's reachability probe)
        assert not [r for r in caplog.records if "TLS handshake failed" in r.getMessage()]
        start = time.monotonic()
        with pytest.raises(WorkerFailureError) as info:
            client.submit(grow_memory, 1024, pure=False).result(timeout=120)
        assert time.monotonic() - start < 60
        message = str(info.value)
        assert "ran out of memory" in message and "512.00 MiB" in message
        assert "raise runtime_memory (up to 10240 MB on aws_lambda)" in message
        failures = cluster.worker_failures
        assert failures and {f.kind for f in failures} == {"out-of-memory"}
        reasons = {w["reason"] for w in cluster.usage()["workers"] if w["name"] in
                   {f.name for f in failures}}
        assert reasons == {"out-of-memory"}
        logged = [r for r in caplog.records if "ran out of memory" in r.getMessage()
                  and r.name.startswith("dask_lithops")]
        assert len(logged) == 1
        close_start = time.monotonic()
    # the with block closed the cluster: prompt, and no bogus warning about dead workers
    assert time.monotonic() - close_start < 10
    assert not [r for r in caplog.records if "did not report its end" in r.getMessage()]
    assert wait_no_busy(emulator, fn) == []


def test_a_task_that_kills_every_function_fails_with_the_reason_while_others_finish(
        emulator, runtime_package):
    """Other tasks keep finishing (no crash loop): dask's allowed-failures ends the task,
    its KilledWorker says the functions ran out of memory and what to raise."""
    from distributed import KilledWorker

    from dask_lithops.failures import TaskKilledWorkersError

    sleep_then, grow_memory = task_functions()
    cluster = make_cluster(emulator, runtime_memory=512)
    fn = cluster.function_name
    with cluster, Client(cluster) as client:
        cluster.scale(2)
        client.wait_for_workers(2, timeout=60)
        start = time.monotonic()
        poison = client.submit(grow_memory, 1024, pure=False)
        others, i = [], 0
        while not poison.done() and time.monotonic() - start < 120:
            others.append(client.submit(sleep_then, 0.05, i, pure=False))
            i += 1
            time.sleep(0.1)
        with pytest.raises(KilledWorker) as info:
            poison.result(timeout=1)
        elapsed = time.monotonic() - start
        assert isinstance(info.value, TaskKilledWorkersError), repr(info.value)
        message = str(info.value)
        assert info.value.kind == "out-of-memory", message
        assert "ran out of memory" in message and "512.00 MiB" in message, message
        assert "raise runtime_memory (up to 10240 MB on aws_lambda)" in message, message
        # four deaths, each a replacement's cold start apart
        records = cluster.usage()["workers"]
        starts = sum(r["registered"] - r["invoked"] for r in records if r["registered"])
        assert elapsed < 60 + starts, (elapsed, starts)
        assert client.gather(others) == list(range(i))
        assert cluster._gave_up is None  # allowed-failures ended it, not the crash loop
    assert wait_no_busy(emulator, fn) == []


@pytest.fixture
def client_only_module(tmp_path, monkeypatch):
    (tmp_path / "client_helpers_faas.py").write_text("def half(x):\n    return x / 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import client_helpers_faas

    yield client_helpers_faas
    sys.modules.pop("client_helpers_faas", None)


def test_missing_module_in_the_function_fails_with_the_fix(
        emulator, runtime_package, client_only_module):
    # a function of its own; a replacement caught mid-cold-start by close() cannot be
    # cancelled (nor on Lambda): it ends once the closed scheduler has refused it for
    # REFUSED_GRACE (5 s), not after death_timeout (the default 60 s)
    cluster = make_cluster(emulator, runtime_memory=768)
    fn = cluster.function_name
    with cluster, Client(cluster) as client:
        cluster.scale(2)
        client.wait_for_workers(2, timeout=60)
        start = time.monotonic()
        with pytest.raises(WorkerFailureError) as info:
            client.gather(client.map(client_only_module.half, range(4)))
        assert time.monotonic() - start < 60
        assert "module 'client_helpers_faas' is a local file of the client" in str(info.value)
        assert "client.upload_file" in str(info.value)
        assert {f.kind for f in cluster.worker_failures} == {"missing-module"}
    assert wait_no_busy(emulator, fn) == []


class _ForwardOnce:
    """A TCP forwarder to ``target`` that serves one connection, then stops listening:
    the next dial is refused, as once the cluster (or a tunnel to it) is gone."""

    def __init__(self, host: str, target: tuple[str, int]):
        import socket
        import threading

        self.listener = socket.create_server((host, 0))
        self.port = self.listener.getsockname()[1]
        self.target = target
        self.threads = [threading.Thread(target=self._serve, daemon=True)]
        self.threads[0].start()

    def _serve(self) -> None:
        import socket
        import threading

        conn, _ = self.listener.accept()
        self.listener.close()
        upstream = socket.create_connection(self.target)

        def pipe(src, dst):
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        for src, dst in ((conn, upstream), (upstream, conn)):
            t = threading.Thread(target=pipe, args=(src, dst), daemon=True)
            t.start()
            self.threads.append(t)

    def close(self) -> None:
        self.listener.close()
        for t in self.threads:
            t.join(timeout=5)


def test_a_worker_whose_scheduler_is_gone_ends_at_once(emulator, runtime_package):
    """An invocation whose scheduler refuses connections (the cluster closed, e.g. while
    it cold-started) ends after REFUSED_GRACE with a planned reason, not after
    death_timeout: both when it finds nothing listening at its start, and when the
    scheduler answered its reachability check but is gone before the worker registers."""
    import dataclasses
    import json

    from distributed.comm.addressing import parse_address, parse_host_port

    from dask_lithops.failures import PLANNED
    from dask_lithops.worker import REFUSED_GRACE

    # a function of its own; death_timeout: the default 60 s
    cluster = make_cluster(emulator, runtime_memory=640)
    fn = cluster.function_name
    lam = emulator.client()

    def invoke(payload):
        start = time.monotonic()
        response = lam.invoke(FunctionName=fn, Payload=cluster.worker_event(payload))
        return json.loads(response["Payload"].read()), time.monotonic() - start

    with cluster:
        assert cluster.death_timeout == 60
        template = cluster.launch_payload("gone-0")
        scheme, location = parse_address(template.scheduler_address)
        host, port = parse_host_port(location)
        # 1. the scheduler answers the reachability check, then refuses the registration
        forward = _ForwardOnce(host, (host, port))
        try:
            report, elapsed = invoke(dataclasses.replace(
                template, name="gone-1", scheduler_address=f"{scheme}://{host}:{forward.port}"))
        finally:
            forward.close()
        assert report["reason"] == "scheduler-unreachable" and report["kind"] in PLANNED, report
        assert report["timeline"].get("reachable"), report  # it passed the start check
        # after the grace, not at the first refusal; far below death_timeout
        assert REFUSED_GRACE <= report["duration"] < REFUSED_GRACE + 10, report
        assert elapsed < 30, elapsed  # cold start included
        # 2. nothing listens at all from the start (the handler's start check)
        report, elapsed = invoke(dataclasses.replace(
            template, name="gone-2", scheduler_address=f"{scheme}://{host}:{forward.port}"))
        assert report["reason"] == "scheduler-unreachable", report
        assert REFUSED_GRACE <= report["duration"] < REFUSED_GRACE + 5, report
    assert wait_no_busy(emulator, fn) == []


def test_throttled_invokes_wait_for_capacity_and_are_not_crashes(
        emulator, runtime_package, caplog):
    """Lambda refuses Event invokes over its request rate (TooManyRequestsException, here
    with no retry): the refused workers are not crashes (crash_loop_limit is 3: four
    refusals in a row would have made the cluster give up) and start once there is
    capacity again; one warning names the limit and the fix."""
    from dask_lithops.serverless.cluster import THROTTLED_RETRY

    caplog.set_level(logging.INFO, logger="dask_lithops")
    cluster = make_cluster(emulator, runtime_memory=704, invoke_retries=0)
    fn = cluster.function_name
    emulator.invoke_rate_limit = 1.0  # one invoke a second (a bucket of one)
    try:
        with cluster, Client(cluster) as client:
            time.sleep(1.5)  # the bucket is full: the first invoke goes through
            start = time.monotonic()
            cluster.scale(4)
            client.wait_for_workers(4, timeout=3 * THROTTLED_RETRY + 60)
            elapsed = time.monotonic() - start
            assert elapsed > THROTTLED_RETRY  # three waited for capacity
            assert cluster.throttled >= 4, cluster.throttled  # 3 at once, then 2, then 1
            assert cluster.worker_failures == []
            assert client.submit(lambda x: x + 1, 1).result(timeout=30) == 2
            assert len(cluster.worker_spec) == 4
    finally:
        emulator.invoke_rate_limit = None
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("dask_lithops")]
    warned = [m for m in messages if "until there is capacity" in m]
    assert len(warned) == 1, warned
    assert "TooManyRequestsException" in warned[0] and "lithops.aws_lambda.max_workers" \
        in warned[0]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR
                and r.name.startswith("dask_lithops")]
    assert wait_no_busy(emulator, fn) == []


def test_invocations_queued_over_concurrency_fail_the_waiting_computation(
        emulator, runtime_package):
    """Lambda queues Event invocations over the concurrency available (here the function's
    reserved concurrency is 0) instead of refusing them: with no worker running, the
    waiting computation fails after worker_start_timeout naming the limit and the fix;
    once there is capacity the queued worker starts and the cluster computes."""
    sleep_then, _ = task_functions()
    cluster = make_cluster(emulator, runtime_memory=576, worker_start_timeout=10)
    fn = cluster.function_name
    lam = emulator.client()
    with cluster, Client(cluster) as client:
        lam.put_function_concurrency(FunctionName=fn, ReservedConcurrentExecutions=0)
        try:
            cluster.scale(1)
            start = time.monotonic()
            with pytest.raises(WorkerFailureError) as info:
                client.submit(sleep_then, 0.1, 5, pure=False).result(timeout=60)
            elapsed = time.monotonic() - start
            message = str(info.value)
            assert "no worker has started within worker_start_timeout (10s)" in message
            assert "reserved concurrency" in message and "raise worker_start_timeout" in message
            assert 10 <= elapsed < 10 + 10, elapsed
            assert cluster.worker_failures == []  # waiting for capacity is not a crash
            assert [i.status for i in emulator.invocations(fn) if i.kind == "Event"] == \
                ["queued"]
        finally:
            lam.delete_function_concurrency(FunctionName=fn)
        # capacity again: the queued invocation starts, computations wait for it again
        assert client.submit(sleep_then, 0.1, 7, pure=False).result(timeout=60) == 7
        assert len(client.scheduler_info()["workers"]) == 1
    assert wait_no_busy(emulator, fn) == []


def test_p2p_shuffle_longer_than_the_rotations_fails_naming_the_fix(emulator, runtime_package):
    """A p2p shuffle restarts whenever a worker taking part retires; one longer than the time
    between two rotations would restart forever.  It fails after SHUFFLE_RESTARTS with the
    fix, and the fix it names (the task-based shuffle) computes the same under rotation."""
    import dask
    import dask.dataframe as dd
    import numpy as np
    import pandas as pd

    from dask_lithops.serverless.cluster import SHUFFLE_RESTARTS

    def slow(df):
        import time

        time.sleep(0.5)
        return df

    pdf = pd.DataFrame({"k": np.arange(6000) % 37, "v": np.arange(6000.0)})
    ddf = dd.from_pandas(pdf, npartitions=60).map_partitions(slow)
    expected = pdf.groupby("k").v.sum().sort_index()
    # the lifetime test's function (1024 MB, 20 s): a worker retires every ~5 s of 3
    cluster = make_cluster(emulator, runtime_timeout=20)
    with cluster, Client(cluster) as client:
        cluster.scale(3)
        client.wait_for_workers(3, timeout=60)
        start = time.monotonic()
        with dask.config.set({"dataframe.shuffle.method": "p2p"}), \
                pytest.raises(WorkerFailureError) as info:
            ddf.shuffle("k").map_partitions(slow).groupby("k").v.sum().compute()
        elapsed = time.monotonic() - start
        message = str(info.value)
        assert f"restarted {SHUFFLE_RESTARTS} times" in message, message
        assert "'dataframe.shuffle.method': 'tasks'" in message and "runtime_timeout" in message
        records = cluster.usage()["workers"]
        starts = sum(r["registered"] - r["invoked"] for r in records if r["registered"])
        assert elapsed < 2 * cluster.worker_lifetime + starts + 10, (elapsed, starts)
        # the named fix: the task-based shuffle survives the same rotations
        with dask.config.set({"dataframe.shuffle.method": "tasks"}):
            got = ddf.shuffle("k").map_partitions(slow).groupby("k").v.sum().compute()
        pd.testing.assert_series_equal(got.sort_index(), expected, check_names=False)
        assert len(cluster.usage_tracker.records) > 3 + 3  # workers did rotate meanwhile
