"""Lithops' programming model on LocalhostCluster: Lithops-style programs with checked results.

Most API coverage lives here (one shared cluster); test_executor_remote.py runs a few of
the same programs on the Lambda emulator and on SSH hosts.
"""

from __future__ import annotations

import http.server
import os
import signal
import sys
import threading
import time
import traceback

import cloudpickle
import pytest
from distributed import Client

import dask_lithops as lithops
from dask_lithops import LocalhostCluster, config
from dask_lithops.executor import FuturesList, ResponseFuture
from dask_lithops.storage import CloudObject, Storage, StorageNoSuchKeyError

# Workers import nothing from tests/: ship this module's functions by value, as a script's are.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def client():
    with LocalhostCluster(n_workers=2, threads_per_worker=2, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            yield client


@pytest.fixture
def fexec(client, tmp_path):
    storage_config = {"lithops": {"storage": "localhost"},
                      "localhost": {"storage_root": str(tmp_path / "storage")}}
    with lithops.FunctionExecutor(cluster=client, config=storage_config) as ex:
        yield ex


def double(x):
    return 2 * x


def add(x, y, z=0):
    return x + y + z


def total(results):
    return sum(results)


class Boom(Exception):
    pass


def fail_on_odd(x):
    if x % 2:
        raise Boom(f"odd input {x}")
    return x


# --------------------------------------------------------------------------- calls and iterdata


def test_call_async_map_and_get_result(fexec):
    f = fexec.call_async(double, 21)
    assert isinstance(f, ResponseFuture)
    assert fexec.get_result() == 42  # one call: the value itself, as Lithops returns it
    assert f.done and not f.error and f.result() == 42
    assert {"worker_start_tstamp", "worker_func_exec_time", "host_submit_tstamp",
            "host_result_done_tstamp"} <= set(f.stats)
    assert f.stats["worker_end_tstamp"] >= f.stats["worker_start_tstamp"]

    fs = fexec.map(double, [1, 2, 3])
    assert isinstance(fs, FuturesList) and len(fs) == 3
    assert fexec.get_result() == [2, 4, 6]  # only the unread futures
    assert fexec.get_result(fs) == [2, 4, 6]
    assert fexec.get_result([]) == []  # as in Lithops, [] means "the unread futures": none left

    assert fexec.call_async(add, (1, 2)).result() == 3
    assert fexec.call_async(add, {"x": 1, "y": 2, "z": 3}).result() == 6


@pytest.mark.parametrize("iterdata, extra_args, expected", [
    (range(4), None, [0, 2, 4, 6]),
    ({5}, None, [10]),
    ((x for x in [7, 8]), None, [14, 16]),
    ([[1, 2]], None, [[1, 2, 1, 2]]),  # a list element is one argument
    ("ab", None, ["abab"]),             # a string is one call
])
def test_iterdata_forms(fexec, iterdata, extra_args, expected):
    assert fexec.get_result(fexec.map(double, iterdata, extra_args=extra_args)) == expected


def test_tuples_dicts_and_extra_args(fexec):
    assert fexec.get_result(fexec.map(add, [(1, 2), (3, 4, 5)])) == [3, 12]
    assert fexec.get_result(fexec.map(add, [{"x": 1, "y": 2}, {"x": 3, "y": 4, "z": 5}])) == [3, 12]
    assert fexec.get_result(fexec.map(add, [1, 2], extra_args=(10,))) == [11, 12]
    assert fexec.get_result(fexec.map(add, [(1,), (2,)], extra_args=(10, 100))) == [111, 112]
    assert fexec.get_result(fexec.map(add, [{"x": 1}], extra_args={"y": 5})) == [6]

    def star(*args, **kwargs):
        return args, kwargs

    assert fexec.get_result(fexec.map(star, [(1, 2)])) == [((1, 2), {})]
    assert fexec.get_result(fexec.map(star, [{"a": 1}])) == [((), {"a": 1})]


def test_calls_returning_none_give_no_output(fexec):
    fs = fexec.map(lambda x: None if x == 1 else x, [0, 1, 2])
    assert fexec.get_result(fs) == [0, 2]  # as in Lithops: a None result is not an output


def test_id_and_storage_are_injected_by_name(fexec):
    def tag(x, id, storage):
        storage.put_object("b", f"k{id}", str(x * 10))
        return id, x, type(storage).__name__

    assert fexec.get_result(fexec.map(tag, ["a", "b", "c"])) == [
        (0, "a", "Storage"), (1, "b", "Storage"), (2, "c", "Storage")]
    assert sorted(fexec.storage.list_keys("b")) == ["k0", "k1", "k2"]
    assert fexec.storage.get_object("b", "k2") == b"cccccccccc"


def test_extra_env_reaches_the_function_and_is_restored(fexec):
    def env(x):
        return os.environ.get("DL_TEST_VAR")

    assert fexec.get_result(fexec.map(env, [1, 2], extra_env={"DL_TEST_VAR": True})) == ["True", "True"]
    assert fexec.get_result(fexec.map(env, [1, 2])) == []  # unset again: None, i.e. no output


def test_modules_chunksize_and_memory_are_accepted(fexec):
    fs = fexec.map(double, [1, 2], chunksize=2, runtime_memory=512, include_modules=["json"],
                   exclude_modules=None)
    assert fexec.get_result(fs) == [2, 4]


# --------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("call, message", [
    (lambda ex: ex.map(add, [(1, 2, 3, 4)]), r"iterdata\[0\] = \(1, 2, 3, 4\) does not match add"),
    (lambda ex: ex.map(add, [{"x": 1}]), r"iterdata\[0\].*missing \['y'\]"),
    (lambda ex: ex.map(add, [{"x": 1, "y": 2, "q": 3}]), r"unknown \['q'\]"),
    (lambda ex: ex.map(add, [(1,)], extra_args={"y": 1}), "extra_args must be a tuple"),
    (lambda ex: ex.map(double, [1], timeout=-1), r"timeout = -1 is invalid; allowed: a number of seconds"),
    (lambda ex: ex.map(double, [1], chunksize="x"), r"chunksize = 'x' is invalid"),
    (lambda ex: ex.map(double, [1], extra_env=["A"]), r"extra_env = \['A'\] is invalid"),
    (lambda ex: ex.map(double, [1], include_modules="json"), r"include_modules = 'json' is invalid"),
    (lambda ex: ex.map(42, [1]), "must be callable"),
    (lambda ex: ex.map_reduce(double, [1], total, spawn_reducer=200), r"return_when = 200 is invalid"),
    (lambda ex: ex.map_reduce(double, [1], lambda *r: r, spawn_reducer=0), "must take the list of map"),
    (lambda ex: ex.wait(return_when="all"),
     r"return_when = 'all' is invalid; allowed: ALWAYS \(0\), ANY_COMPLETED \(-1\), ALL_COMPLETED"),
])
def test_bad_arguments_fail_before_any_call(fexec, call, message):
    before = len(fexec.futures)
    with pytest.raises((ValueError, TypeError), match=message):
        call(fexec)
    assert len(fexec.futures) == before


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "cloud"}, r"lithops.mode = 'cloud' is invalid; allowed: localhost, serverless, standalone"),
    ({"backend": "ibm_cf"}, r"lithops.backend = 'ibm_cf' is invalid; allowed: .*aws_lambda"),
    ({"storage": "gcs"}, r"lithops.storage = 'gcs' is invalid; allowed: localhost, aws_s3"),
    ({"monitoring": "kafka"}, r"monitoring = 'kafka' is invalid; allowed: storage, rabbitmq"),
    ({"log_level": "LOUD"}, r"log_level = 'LOUD' is invalid"),
    ({"config": {"localhost": {"n_workers": "many"}}}, r"localhost.n_workers = 'many' is invalid"),
    ({"config_file": "/nonexistent/lithops.yaml"}, r"config_file = '/nonexistent/lithops.yaml' does not"),
])
def test_bad_executor_options_fail_before_a_cluster_starts(kwargs, message):
    with pytest.raises((config.ConfigError, ValueError), match=message):
        lithops.FunctionExecutor(**kwargs)


# --------------------------------------------------------------------------- errors


def test_exceptions_reraise_with_type_and_traceback(fexec):
    fs = fexec.map(fail_on_odd, [0, 1, 2])
    with pytest.raises(Boom, match="odd input 1") as info:
        fexec.get_result(fs)
    frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert "fail_on_odd" in frames  # the function's own frame, from the worker
    assert [f.error for f in fs] == [False, True, False]
    assert fs[1].done and fs[1].success  # Lithops: an error is a final, "successful" status

    assert fexec.get_result(fs, throw_except=False) == [0, None, 2]
    assert fs[1].result(throw_except=False) is None
    with pytest.raises(Boom):
        fs[1].result()
    with pytest.raises(Boom):
        fs[1].status()
    assert fs[1]._exception[0] is Boom


def test_call_timeout(fexec, client):
    t0 = time.monotonic()
    fs = fexec.map(time.sleep, [30], timeout=1)
    with pytest.raises(TimeoutError, match="exceeded maximum time of 1 seconds"):
        fexec.get_result(fs)
    assert time.monotonic() - t0 < 15

    # Lithops' execution_timeout (config) is the default per-call limit
    with lithops.FunctionExecutor(cluster=client, config={"lithops": {"execution_timeout": 1}}) as ex:
        with pytest.raises(TimeoutError, match="exceeded maximum time of 1 seconds"):
            ex.get_result(ex.map(time.sleep, [30]))


# --------------------------------------------------------------------------- wait


def test_wait_modes(fexec):
    def sleepy(x):
        time.sleep(x)
        return x

    fs = fexec.map(sleepy, [0, 0, 3])
    done, not_done = fexec.wait(fs, return_when=lithops.ANY_COMPLETED)
    assert 1 <= len(done) <= 3 and len(done) + len(not_done) == 3
    assert all(f.success for f in done) and not any(f.done for f in done)  # states, no outputs yet

    done, not_done = fexec.wait(fs, return_when=lithops.ALWAYS)
    assert len(done) + len(not_done) == 3

    with pytest.raises(TimeoutError, match="Timeout of 0.2 seconds exceeded"):
        fexec.wait(fs, timeout=0.2)
    done, not_done = fexec.wait(fs, return_when=60, download_results=True, threadpool_size=4)
    assert len(done) >= 2
    done, not_done = fexec.wait(fs, download_results=True)
    assert len(done) == 3 and not not_done and all(f.done for f in done)
    assert [f.result() for f in fs] == [0, 0, 3]


def test_attach_to_a_cluster_or_an_address(client):
    for target in (client.cluster, client.scheduler.address):
        with lithops.FunctionExecutor(cluster=target) as ex:
            assert ex.get_result(ex.map(double, [4])) == [8]
            own_client = ex.client
        assert own_client.status == "closed"  # its own client closed; the cluster stays
    assert client.cluster.status.name == "running"
    assert client.submit(lambda x: 2 * x, 1).result() == 2
    with pytest.raises(TypeError, match="cluster = 42 is invalid; allowed: a Dask cluster"):
        lithops.FunctionExecutor(cluster=42)


def test_module_level_wait_and_get_result_across_executors(client, fexec):
    with lithops.FunctionExecutor(cluster=client) as other:
        fs = fexec.map(double, [1, 2]) + other.map(double, [3])
        done, not_done = lithops.wait(fs, return_when=lithops.ALL_COMPLETED)
        assert len(done) == 3 and not not_done
        assert lithops.get_result(fs) == [2, 4, 6]
        assert {f.executor_id for f in fs} == {fexec.executor_id, other.executor_id}


# --------------------------------------------------------------------------- composition


def test_map_reduce(fexec):
    fs = fexec.map_reduce(double, range(10), total)
    assert fexec.get_result(fs) == 90
    assert len(fs) == 11 and all(f.done for f in fs)

    fs = fexec.map_reduce(add, [1, 2, 3], lambda results, base: base + sum(results),
                          extra_args=(100,), extra_args_reduce=(1000,), spawn_reducer=lithops.ALWAYS)
    assert fexec.get_result(fs) == 1000 + 306

    with pytest.raises(Boom):
        fexec.get_result(fexec.map_reduce(fail_on_odd, [0, 1], total, spawn_reducer=lithops.ALWAYS))


def test_futures_list_chaining(fexec):
    fs = fexec.map(double, [1, 2, 3])
    fs.map(lambda x: x + 1)
    assert fs.get_result() == [3, 5, 7]
    fs = fexec.map(double, [1, 2, 3]).map_reduce(double, total)
    assert fs.get_result() == 24


def nested_sum(n):
    inner = lithops.FunctionExecutor()  # on a worker: attaches to the worker's scheduler
    inner.map(double, range(n))
    return sum(inner.get_result())


def nested_map(n):
    return lithops.FunctionExecutor().map(double, range(n))


def test_nested_executors(fexec):
    assert fexec.get_result(fexec.map(nested_sum, [3, 4])) == [6, 12]
    # a function that returns futures: their results take its place, as in Lithops
    assert fexec.get_result(fexec.map(nested_map, [2, 3])) == [0, 2, 0, 2, 4]
    f = fexec.call_async(nested_map, 2)
    assert fexec.get_result(f) == [0, 2]
    assert f.futures and len(f._new_futures) == 2


# --------------------------------------------------------------------------- failures


def flaky(x, marker_dir):
    marker = os.path.join(marker_dir, f"attempt-{x}")
    if not os.path.exists(marker):
        open(marker, "w").close()
        raise Boom(f"first attempt of {x}")
    return x * 3


def test_retrying_executor(fexec, tmp_path):
    with lithops.RetryingFunctionExecutor(fexec) as rexec:
        fs = rexec.map(flaky, [1, 2], extra_args=(str(tmp_path),), retries=2)
        done, pending = rexec.wait(fs, download_results=True)
        assert not pending and [f.result() for f in done] == [3, 6]
        assert [f.failure_count for f in fs] == [1, 1]

        fs = rexec.map(fail_on_odd, [1], retries=1)
        with pytest.raises(Boom):
            rexec.wait(fs)
        assert fs[0].failure_count == 2

    # lithops.retries in the config is the default
    with lithops.FunctionExecutor(cluster=fexec.client, config={"lithops": {"retries": 1}}) as ex:
        rexec = lithops.RetryingFunctionExecutor(ex)
        fs = rexec.map(flaky, [7], extra_args=(str(tmp_path),))
        done, _ = rexec.wait(fs, download_results=True)
        assert done[0].result() == 21 and fs[0].failure_count == 1


def kill_my_worker_once(x, marker_dir):
    marker = os.path.join(marker_dir, f"killed-{x}")
    if x == 3 and not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)  # the worker process dies mid-map
    time.sleep(0.05)
    return x * x


def test_calls_survive_a_killed_worker(fexec, client, tmp_path):
    fs = fexec.map(kill_my_worker_once, range(20), extra_args=(str(tmp_path),))
    assert fexec.get_result(fs) == [x * x for x in range(20)]
    assert os.path.exists(tmp_path / "killed-3")
    client.wait_for_workers(2, timeout=60)


# --------------------------------------------------------------------------- storage


def test_storage_api_on_localhost(tmp_path):
    st = Storage(config={"localhost": {"storage_root": str(tmp_path)}}, backend="localhost")
    st.put_object("bkt", "a/one.txt", b"hello")
    st.put_object("bkt", "a/two.txt", "world")
    st.put_object("bkt", "b/three.txt", open(__file__, "rb"))
    assert st.get_object("bkt", "a/one.txt") == b"hello"
    assert st.get_object("bkt", "a/one.txt", stream=True).read() == b"hello"
    assert st.get_object("bkt", "a/two.txt", extra_get_args={"Range": "bytes=1-3"}) == b"orl"
    assert st.head_object("bkt", "a/two.txt")["content-length"] == "5"
    assert st.list_keys("bkt") == ["a/one.txt", "a/two.txt", "b/three.txt"]
    assert st.list_keys("bkt", "a/") == ["a/one.txt", "a/two.txt"]
    assert [o["Size"] for o in st.list_objects("bkt", "a/")] == [5, 5]
    st.delete_object("bkt", "a/one.txt")
    st.delete_objects("bkt", ["a/two.txt"])
    assert st.list_keys("bkt") == ["b/three.txt"]
    with pytest.raises(StorageNoSuchKeyError):
        st.get_object("bkt", "a/one.txt")
    co = st.put_cloudobject(b"cloud", "bkt")
    assert isinstance(co, CloudObject) and co.backend == "localhost"
    assert st.get_cloudobject(co) == b"cloud"
    st.delete_cloudobject(co)
    assert st.list_keys("bkt") == ["b/three.txt"]
    with pytest.raises(ValueError, match="leaves bucket"):
        st.get_object("bkt", "../../etc/passwd")


def make_lines(n_lines):
    return "".join(f"line {i:05d} {'x' * (i % 37)}\n" for i in range(n_lines)).encode()


def count_lines(obj):
    data = obj.data_stream.read()
    lines = data.decode().splitlines()
    assert all(line.startswith("line ") for line in lines), lines[:2]
    return {"key": obj.key, "part": obj.part, "lines": [line.split()[1] for line in lines],
            "bucket": obj.bucket, "range": obj.data_byte_range, "chunk_size": obj.chunk_size}


def test_object_iterdata_partitions_keep_lines_whole(fexec):
    st = fexec.storage
    data = {"in/a.txt": make_lines(3000), "in/b.txt": make_lines(1000), "in/empty/": b""}
    for key, body in data.items():
        if not key.endswith("/"):
            st.put_object("data", key, body)

    fs = fexec.map(count_lines, "localhost://data/in/", obj_chunk_size=7000)
    parts = fexec.get_result(fs)
    by_key = {}
    for p in parts:
        by_key.setdefault(p["key"], []).extend(p["lines"])
    assert by_key["in/a.txt"] == [f"{i:05d}" for i in range(3000)]  # every line once, in order
    assert by_key["in/b.txt"] == [f"{i:05d}" for i in range(1000)]
    assert len([p for p in parts if p["key"] == "in/a.txt"]) == -(-len(data["in/a.txt"]) // 7000)

    parts = fexec.get_result(fexec.map(count_lines, "localhost://data/in/b*.txt"))  # a glob
    assert [p["key"] for p in parts] == ["in/b.txt"] and len(parts[0]["lines"]) == 1000

    parts = fexec.get_result(fexec.map(count_lines, ["data/in/a.txt"], obj_chunk_number=4))
    assert [p["part"] for p in parts] == [1, 2, 3, 4]
    assert sum(len(p["lines"]) for p in parts) == 3000

    # map_reduce with one reducer per object
    fs = fexec.map_reduce(lambda obj: len(obj.data_stream.read().splitlines()),
                          ["localhost://data/in/a.txt", "localhost://data/in/b.txt"],
                          total, obj_chunk_size=5000, obj_reduce_by_key=True)
    assert fexec.get_result(fs) == [3000, 1000]
    fs = fexec.map_reduce(lambda obj: len(obj.data_stream.read().splitlines()),
                          "localhost://data/in/", total, obj_chunk_number=3,
                          reducer_one_per_object=True)  # Lithops' older name
    assert sorted(fexec.get_result(fs)) == [1000, 3000]


def test_object_iterdata_exact_ranges_paths_and_urls(fexec, tmp_path):
    body = make_lines(500)
    path = tmp_path / "local.txt"
    path.write_bytes(body)

    def read(obj):
        return obj.data_stream.read()

    chunks = fexec.get_result(fexec.map(read, [str(path)], obj_chunk_size=1000, obj_newline=None))
    assert b"".join(chunks) == body and all(len(c) == 1000 for c in chunks[:-1])
    lines = fexec.get_result(fexec.map(read, [str(tmp_path)], obj_chunk_size=3000))
    assert b"".join(lines) == body

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(tmp_path), **kw)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/local.txt"
        assert b"".join(fexec.get_result(fexec.map(read, [url], obj_chunk_size=4000))) == body
    finally:
        server.shutdown()
        server.server_close()

    with pytest.raises(FileNotFoundError, match="No objects found"):
        fexec.map(read, "localhost://data/nothing-here/")


def test_storage_from_dask_config_needs_a_valid_backend():
    import dask

    with dask.config.set({"lithops.storage": "aws_s3"}):
        from dask_lithops.storage.storage import resolve_storage_config

        assert resolve_storage_config()["backend"] == "aws_s3"
    message = "lithops.storage = 'hdfs' is invalid; allowed: one of 'localhost', 'aws_s3'"
    with dask.config.set({"lithops.storage": "hdfs"}), pytest.raises(config.ConfigError, match=message):
        config.validate_current()


# --------------------------------------------------------------------------- reports


def test_plot_and_job_summary(fexec, tmp_path):
    pytest.importorskip("matplotlib")
    fexec.map(double, range(8))
    fexec.get_result()
    fexec.plot(dst=str(tmp_path / "run"))
    assert (tmp_path / "run_timeline.png").stat().st_size > 1000
    assert (tmp_path / "run_histogram.png").stat().st_size > 1000
    path = fexec.job_summary()
    with open(path) as f:
        rows = f.read().splitlines()
    os.unlink(path)
    assert rows[0].startswith("Job_ID,Function,Invocations")
    assert rows[1].startswith("M000,double,8,")


# --------------------------------------------------------------------------- its own cluster


def test_executor_starts_and_closes_its_cluster(tmp_path):
    config_file = tmp_path / "lithops_config"
    config_file.write_text("lithops:\n  backend: localhost\n  storage: localhost\n"
                           "localhost:\n  worker_processes: 1\n")
    with lithops.FunctionExecutor(config_file=str(config_file), dashboard_address=None) as fexec:
        assert (fexec.mode, fexec.backend, fexec.config["lithops"]["storage"]) == (
            "localhost", "localhost", "localhost")
        cluster = fexec.cluster
        assert len(cluster.workers) == 1
        assert fexec.get_result(fexec.map(double, [1, 2])) == [2, 4]
        fexec.clean()  # closes what it started ...
        assert cluster.status.name == "closed"
        assert fexec.get_result(fexec.map(double, [5])) == [10]  # ... and starts again if used
        second = fexec.cluster
    assert second.status.name == "closed" and fexec.cluster is None


# --------------------------------------------------------------------------- aws_s3 (moto)


@pytest.fixture(scope="module")
def moto_s3():
    from dask_lithops.testing.moto_server import MotoServer, moto_available

    reason = moto_available()
    if reason:
        pytest.skip(reason)
    with MotoServer() as server:
        yield {"lithops": {"storage": "aws_s3"},
               "aws": {"region": "us-east-1", "access_key_id": "testing",
                       "secret_access_key": "testing"},
               "aws_s3": {"endpoint_url": server.endpoint_url, "storage_bucket": "lithops-test"}}


def test_storage_api_on_s3(moto_s3):
    st = Storage(config=moto_s3)
    assert st.backend == "aws_s3" and st.bucket == "lithops-test"
    st.create_bucket("lithops-test")
    st.put_object("lithops-test", "p/one", b"1111")
    st.put_object("lithops-test", "p/two", "22")
    assert st.get_object("lithops-test", "p/one", extra_get_args={"Range": "bytes=1-2"}) == b"11"
    assert st.get_object("lithops-test", "p/two", stream=True).read() == b"22"
    assert st.head_object("lithops-test", "p/one")["content-length"] == "4"
    assert st.list_keys("lithops-test", "p/") == ["p/one", "p/two"]
    assert [o["Size"] for o in st.list_objects("lithops-test", "p/")] == [4, 2]
    co = st.put_cloudobject(b"cloud")
    assert st.get_cloudobject(co) == b"cloud"
    st.delete_cloudobjects([co])
    st.delete_objects("lithops-test", ["p/one", "p/two"])
    assert st.list_keys("lithops-test") == []
    with pytest.raises(StorageNoSuchKeyError):
        st.get_object("lithops-test", "p/one")


def test_object_iterdata_on_s3(client, moto_s3):
    with lithops.FunctionExecutor(cluster=client, config=moto_s3) as fexec:
        st = fexec.storage
        st.create_bucket("s3data")
        st.put_object("s3data", "csv/a.csv", make_lines(2000))
        st.put_object("s3data", "csv/b.csv", make_lines(700))
        fs = fexec.map(count_lines, "s3://s3data/csv/", obj_chunk_size=6000)
        parts = fexec.get_result(fs)
        by_key = {}
        for p in parts:
            by_key.setdefault(p["key"], []).extend(p["lines"])
        assert by_key == {"csv/a.csv": [f"{i:05d}" for i in range(2000)],
                          "csv/b.csv": [f"{i:05d}" for i in range(700)]}
        assert {p["bucket"] for p in parts} == {"s3data"}

        def put_and_get(x, storage):
            storage.put_object("s3data", f"out/{x}", str(x))
            return storage.get_object("s3data", f"out/{x}").decode()

        assert fexec.get_result(fexec.map(put_and_get, [1, 2])) == ["1", "2"]
        assert st.list_keys("s3data", "out/") == ["out/1", "out/2"]


def test_builtins_and_positional_only_parameters(fexec):
    assert fexec.get_result(fexec.map_reduce(double, range(4), sum)) == 12
    assert fexec.get_result(fexec.map(divmod, [(7, 2), (9, 4)])) == [(3, 1), (2, 1)]
    assert fexec.get_result(fexec.map(abs, [-3])) == [3]


def test_cancel_a_queued_call(fexec):
    blockers = fexec.map(time.sleep, [2] * 4)  # every worker thread busy
    f = fexec.call_async(double, 1)
    f.cancel()
    done, _ = fexec.wait([f], throw_except=False)
    assert f.error and f.cancelled()
    from concurrent.futures import CancelledError

    with pytest.raises(CancelledError):
        f.result()
    fexec.wait(blockers)


@pytest.mark.parametrize("name", [
    "FunctionExecutor.__init__", "FunctionExecutor.call_async", "FunctionExecutor.map",
    "FunctionExecutor.map_reduce", "FunctionExecutor.wait", "FunctionExecutor.get_result",
    "FunctionExecutor.plot", "FunctionExecutor.clean", "FunctionExecutor.job_summary",
    "LocalhostExecutor.__init__", "ServerlessExecutor.__init__", "StandaloneExecutor.__init__",
    "RetryingFunctionExecutor.map", "RetryingFunctionExecutor.wait", "wait", "get_result",
    "Storage.__init__", "Storage.get_object", "Storage.put_cloudobject", "Storage.list_objects",
])
def test_signatures_match_lithops(name):
    """Lithops' own parameters, in its order, with its defaults (when lithops is installed)."""
    import inspect

    real = pytest.importorskip("lithops")

    def resolve(root):
        obj = root
        for part in name.split("."):
            obj = getattr(obj, part)
        return inspect.signature(obj).parameters

    theirs, ours = resolve(real), resolve(lithops)
    ours_list = [p for p in ours.values() if p.name in theirs]
    assert [p.name for p in ours_list] == list(theirs), name
    for p in ours_list:
        q = theirs[p.name]
        assert p.kind == q.kind and (p.default == q.default or q.default is inspect.Parameter.empty
                                     or (p.default is None and q.default == {})), (name, p, q)


def test_a_function_workers_cannot_import_fails_its_calls_not_the_workers(fexec, client, tmp_path):
    (tmp_path / "only_on_the_client.py").write_text("def triple(x):\n    return 3 * x\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import only_on_the_client
    finally:
        sys.path.remove(str(tmp_path))
    workers = set(client.scheduler_info()["workers"])
    with pytest.raises(ModuleNotFoundError, match="only_on_the_client"):
        fexec.get_result(fexec.map(only_on_the_client.triple, [1, 2]))
    assert set(client.scheduler_info()["workers"]) == workers  # nobody died
    cloudpickle.register_pickle_by_value(only_on_the_client)  # the fix: ship it by value
    try:
        assert fexec.get_result(fexec.map(only_on_the_client.triple, [1, 2])) == [3, 6]
    finally:
        cloudpickle.unregister_pickle_by_value(only_on_the_client)
