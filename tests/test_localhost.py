"""LocalhostCluster end to end: real worker processes through the shared entry point."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request

import dask
import dask.array as da
import pytest
from distributed import Client, wait

from dask_lithops import LocalhostCluster
from dask_lithops.payload import LaunchPayload, encode


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def worker_pids(client):
    return set(client.run(os.getpid).values())


@pytest.fixture(scope="module")
def client():
    with LocalhostCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            yield client


def test_worker_names_are_strings_equal_to_spec_keys(client):
    cluster = client.cluster
    names = {w["name"] for w in client.scheduler_info()["workers"].values()}
    assert names == set(cluster.worker_spec) == {"localhost-0", "localhost-1"}
    assert all(isinstance(n, str) for n in names)


def test_delayed_graph(client):
    @dask.delayed
    def inc(x):
        return x + 1

    @dask.delayed
    def add(*xs):
        return sum(xs)

    total = add(*[inc(i) for i in range(50)])
    assert total.compute() == sum(range(1, 51))


def test_dataframe_groupby_p2p_shuffle(client):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    import dask.dataframe as dd

    pdf = pd.DataFrame({"k": [i % 13 for i in range(20_000)], "v": range(20_000)})
    ddf = dd.from_pandas(pdf, npartitions=8)
    with dask.config.set({"dataframe.shuffle.method": "p2p"}):
        result = ddf.shuffle("k").groupby("k").v.sum().compute()
    expected = pdf.groupby("k").v.sum()
    assert result.sort_index().tolist() == expected.sort_index().tolist()


def test_array_reduction(client):
    x = da.arange(1_000_000, chunks=50_000)
    assert int((x * 2).sum().compute()) == 2 * sum(range(1_000_000))
    y = da.ones((2000, 2000), chunks=(500, 500))
    assert float((y @ y.T).mean().compute()) == 2000.0


def test_map_gather(client):
    futures = client.map(lambda x: x * x, range(500))
    assert client.gather(futures) == [x * x for x in range(500)]
    assert len({f.key for f in futures}) == 500


def test_upload_file(client, tmp_path):
    module = tmp_path / "dl_uploaded_mod.py"
    module.write_text("def answer():\n    return 42\n")
    client.upload_file(str(module))

    def use():
        import dl_uploaded_mod

        return dl_uploaded_mod.answer()

    assert set(client.run(use).values()) == {42}
    assert client.submit(use, pure=False).result() == 42


def test_get_logs_has_each_workers_log(client):
    client.submit(lambda: print("dl-task-output-marker"), workers=["localhost-0"],
                  pure=False).result()
    deadline = time.time() + 10
    while "dl-task-output-marker" not in (client.cluster.workers["localhost-0"].logs() or ""):
        assert time.time() < deadline, "a task's print never reached its worker's log"
        time.sleep(0.1)
    logs = client.cluster.get_logs()
    assert "dl-task-output-marker" in logs["localhost-0 (process)"]
    for name in ("localhost-0", "localhost-1"):
        assert f"{name} (process)" in logs
        assert "Start Nanny at" in logs[f"{name} (process)"] or \
            "Start worker at" in logs[f"{name} (process)"]
    assert "Scheduler" in logs


def test_dashboard_link_serves(client):
    pytest.importorskip("bokeh")
    link = client.cluster.dashboard_link
    with urllib.request.urlopen(link, timeout=10) as r:
        assert r.status == 200


def test_job_script_shows_what_runs_without_running(client):
    script = client.cluster.job_script()
    assert "-m dask_lithops.worker" in script
    assert "scheduler_address: 'tcp://127.0.0.1:" in script
    assert len(client.scheduler_info()["workers"]) == 2


def test_restart():
    with LocalhostCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        before = worker_pids(client)
        client.restart()
        after = worker_pids(client)
        assert len(after) == 2 and not (before & after)
        assert client.submit(sum, [1, 2, 3]).result() == 6


def test_scale_down_mid_computation_loses_no_key(tmp_path):
    marks = tmp_path / "executions"
    marks.mkdir()

    def work(i):
        # one file per execution: a recomputed (lost) key leaves two
        open(marks / f"{i}-{os.getpid()}-{time.monotonic_ns()}", "w").close()
        time.sleep(0.02)
        return bytes(50_000) + i.to_bytes(4, "little")

    with LocalhostCluster(n_workers=1, threads_per_worker=2, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        cluster.scale(4)
        client.wait_for_workers(4)
        futures = client.map(work, range(200))
        time.sleep(0.5)  # mid-computation
        cluster.scale(2)
        wait(futures)
        cluster.scale(1)
        deadline = time.time() + 30
        while len(client.scheduler_info()["workers"]) != 1 and time.time() < deadline:
            time.sleep(0.1)
        assert len(client.scheduler_info()["workers"]) == 1
        results = client.gather(futures)
        assert [int.from_bytes(r[-4:], "little") for r in results] == list(range(200))
        executed = [name.split("-")[0] for name in os.listdir(marks)]
        assert sorted(map(int, executed)) == list(range(200)), "a key was computed twice"
        while list(cluster.workers) != list(cluster.worker_spec) and time.time() < deadline:
            time.sleep(0.1)  # the retired worker's process is still being stopped
        assert list(cluster.workers) == list(cluster.worker_spec) == ["localhost-0"]


def test_adapt_from_zero_and_back():
    with LocalhostCluster(n_workers=0, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        adaptive = cluster.adapt(minimum=0, maximum=2, interval="200ms", wait_count=3,
                                 target_duration="1s")
        futures = client.map(lambda x: time.sleep(0.5) or x, range(12))
        assert sum(client.gather(futures)) == sum(range(12))
        assert adaptive.log, "adaptive never acted"
        assert max(n for _, rec in adaptive.log for n in [rec.get("n", 0)]) >= 1
        del futures
        deadline = time.time() + 30
        while (cluster.workers or client.scheduler_info()["workers"]) and time.time() < deadline:
            time.sleep(0.2)
        assert not client.scheduler_info()["workers"]
        assert not cluster.workers


def test_async_api():
    async def main():
        async with LocalhostCluster(n_workers=1, asynchronous=True,
                                    dashboard_address=None) as cluster:
            async with Client(cluster, asynchronous=True) as client:
                assert await client.submit(lambda: 41 + 1) == 42
                await cluster.scale(2)
                await client.wait_for_workers(2)
                await cluster  # the launchers have reported back
                assert len(cluster.workers) == 2
                assert await client.submit(lambda: 1, workers=["localhost-1"]) == 1
        return cluster

    cluster = asyncio.run(main())
    assert cluster.status.name == "closed"


def test_close_leaves_no_worker_process():
    with LocalhostCluster(n_workers=2, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        pids = worker_pids(client)
        nanny_pids = {w.process.pid for w in cluster.workers.values()}
    assert pids and nanny_pids
    assert not [p for p in pids | nanny_pids if pid_alive(p)]


def test_sigkilled_client_leaves_no_worker_after_death_timeout(tmp_path):
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent("""
        import json, os, sys, time
        from distributed import Client
        from dask_lithops import LocalhostCluster
        cluster = LocalhostCluster(n_workers=2, death_timeout="4s", dashboard_address=None)
        client = Client(cluster)
        pids = list(client.run(os.getpid).values())
        pids += [w.process.pid for w in cluster.workers.values()]
        print(json.dumps(pids), flush=True)
        time.sleep(600)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    pids = json.loads(proc.stdout.readline())
    assert len(pids) == 4 and all(pid_alive(p) for p in pids)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = time.monotonic()
    while any(pid_alive(p) for p in pids) and time.monotonic() - killed_at < 30:
        time.sleep(0.2)
    survivors = [p for p in pids if pid_alive(p)]
    for p in survivors:
        os.kill(p, signal.SIGKILL)
    assert not survivors, "worker processes outlived their scheduler"
    assert time.monotonic() - killed_at < 4 + 15


def test_runtime_mismatch_is_a_clear_error_not_a_hang():
    class SkewedCluster(LocalhostCluster):
        def launch_payload(self, name):
            payload = super().launch_payload(name)
            payload.runtime_key = {**payload.runtime_key, "distributed": "1999.1.0"}
            return payload

    with pytest.raises(Exception) as e:
        SkewedCluster(n_workers=1, dashboard_address=None)
    text = str(e.value) + str(e.value.__cause__ or "")
    assert "RuntimeMismatch" in text
    assert "distributed: client 1999.1.0, worker" in text


def test_entry_point_rejects_bad_payload():
    r = subprocess.run([sys.executable, "-m", "dask_lithops.worker", "--payload", "-"],
                       input=encode({"name": 3, "scheduler_address": "tcp://x:1"}),
                       capture_output=True, timeout=60)
    assert r.returncode == 2
    assert b"DASK_LITHOPS_ERROR" in r.stdout and b"must be a string" in r.stdout
    payload = LaunchPayload(scheduler_address="tcp://127.0.0.1:1", name="w").to_dict()
    payload["bogus"] = 1
    r = subprocess.run([sys.executable, "-m", "dask_lithops.worker", "--payload", "-"],
                       input=encode(payload), capture_output=True, timeout=60)
    assert r.returncode == 2 and b"unknown launch payload keys ['bogus']" in r.stdout


def test_workers_inherit_the_clients_dask_config_without_losing_defaults():
    from dask_lithops.cluster import inherited_config

    with dask.config.set({"distributed.worker.memory.target": 0.42, "dl-test.value": [1, 2]}):
        assert inherited_config()["distributed"]["worker"]["memory"] == {"target": 0.42}
        with LocalhostCluster(n_workers=1, dashboard_address=":0") as cluster, \
                Client(cluster) as client:
            seen = client.run(lambda: (
                dask.config.get("distributed.worker.memory.target"),
                dask.config.get("dl-test.value"),
                dask.config.get("distributed.worker.memory.spill"),
            ))
    assert list(seen.values()) == [(0.42, [1, 2], dask.config.get("distributed.worker.memory.spill"))]


def test_credentials_in_the_clients_config_never_reach_workers():
    from dask_lithops.cluster import inherited_config

    secrets_set = {"lithops.aws.access_key_id": "AKIACLIENT",
                   "lithops.aws.secret_access_key": "client-secret",
                   "lithops.aws.session_token": "client-token",
                   "dl-test.db.password": "hunter2", "dl-test.keep": "visible"}
    with dask.config.set(secrets_set):
        sent = repr(inherited_config())
        assert "visible" in sent
        assert not any(v in sent for v in ("AKIACLIENT", "client-secret", "client-token", "hunter2"))
        with LocalhostCluster(n_workers=1, dashboard_address=":0") as cluster, \
                Client(cluster) as client:
            seen = client.run(lambda: (dask.config.get("lithops.aws.secret_access_key", None),
                                       dask.config.get("dl-test.db.password", None),
                                       dask.config.get("dl-test.keep", None)))
    assert list(seen.values()) == [(None, None, "visible")]
