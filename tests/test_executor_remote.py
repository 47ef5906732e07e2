"""Lithops-style programs on the Lambda emulator and on SSH test hosts (few, lean tests).

Functions run in outbound-only sandboxes (Lambda) or on namespace hosts (SSH); object
iterdata comes from moto's S3 served where those workers can reach it (the emulator's host
address, the hosts' gateway), with the storage credentials given in the Lithops config as a
Lithops user gives them.  The API itself is covered on LocalhostCluster (test_executor.py).
"""

from __future__ import annotations

import os
import sys
import time

import cloudpickle
import pytest

import dask_lithops as lithops
from dask_lithops.testing.fixtures import ssh_hosts  # noqa: F401

cloudpickle.register_pickle_by_value(sys.modules[__name__])

EXTRA = ["pandas", "pyarrow", "numpy"]  # as tests/test_serverless.py: one cached runtime package


def storage_config(endpoint_url):
    return {"lithops": {"storage": "aws_s3"},
            "aws_s3": {"endpoint_url": endpoint_url, "region": "us-east-1",
                       "access_key_id": "testing", "secret_access_key": "testing",
                       "storage_bucket": "lithops-remote"}}


def put_lines(storage, bucket, key, n):
    storage.create_bucket(bucket)
    storage.put_object(bucket, key, "".join(f"row {i}\n" for i in range(n)))


def line_numbers(obj):
    return [int(line.split()[1]) for line in obj.data_stream.read().decode().splitlines()]


def square(x):
    return x * x


class Boom(Exception):
    pass


def explode(x):
    raise Boom(f"no {x}")


def nested(n):
    inner = lithops.FunctionExecutor()  # inside a task: the worker's own scheduler
    return sum(inner.get_result(inner.map(square, range(n))))


def where(x):
    from distributed import get_worker

    time.sleep(0.05)
    return get_worker().address.rsplit(":", 1)[0].split("//")[-1], os.getpid()


def run_lithops_program(fexec, bucket):
    """The same Lithops program on any mode: every result checked."""
    assert fexec.get_result(fexec.map(square, range(20))) == [x * x for x in range(20)]
    assert fexec.call_async(square, 7).result() == 49
    assert fexec.get_result(fexec.map_reduce(square, range(10), sum)) == 285
    with pytest.raises(Boom, match="no 3"):
        fexec.get_result(fexec.map(explode, [3]))
    assert fexec.get_result(fexec.map(nested, [3, 4])) == [5, 14]

    put_lines(fexec.storage, bucket, "in/rows.txt", 3000)
    parts = fexec.get_result(fexec.map(line_numbers, f"s3://{bucket}/in/", obj_chunk_size=5000))
    assert len(parts) > 3 and [n for p in parts for n in p] == list(range(3000))


# --------------------------------------------------------------------------- Lambda emulator


def _sandbox_reason():
    if os.geteuid() != 0:
        return "needs root (network namespaces for outbound-only sandboxes)"
    from dask_lithops.testing.lambda_emulator import sandbox_unavailable

    return sandbox_unavailable()


@pytest.fixture(scope="module")
def lambda_fexec():
    pytest.importorskip("awslambdaric")
    reason = _sandbox_reason()
    if reason:
        pytest.skip(f"Lambda emulator sandboxes unavailable: {reason}")
    from dask_lithops.testing.lambda_emulator import LambdaEmulator
    from dask_lithops.testing.moto_server import MotoServer

    with LambdaEmulator(sandbox=True) as emu, MotoServer(host=emu.host_address) as moto:
        # no worker count: the cluster adapts to the work, as Lithops invokes per call
        with lithops.ServerlessExecutor(
                backend="aws_lambda", config=storage_config(moto.endpoint_url),
                max_workers=3, endpoint_url=emu.endpoint_url, contact_address=emu.host_address,
                runtime_memory=1024, runtime_timeout=120, extra_packages=EXTRA,
                dashboard_address=None) as fexec:
            yield fexec


@pytest.mark.timeout(300)
def test_lithops_program_on_lambda(lambda_fexec):
    fexec = lambda_fexec
    assert fexec.mode == "serverless" and fexec.backend == "aws_lambda"
    adaptive = fexec.cluster._adaptive
    assert (adaptive.minimum, adaptive.maximum) == (0, 3)
    run_lithops_program(fexec, "lambda-data")
    assert 1 <= len(fexec.client.scheduler_info()["workers"]) <= 3


def die_once(x, marker):
    from dask_lithops.storage.storage import cached_storage

    if x == 0:
        storage = cached_storage(marker["storage_config"])
        try:
            storage.head_object(marker["bucket"], "died")
        except Exception:
            storage.put_object(marker["bucket"], "died", b"1")
            os._exit(1)  # the function's worker process dies mid-map
    time.sleep(0.2)
    return x + 100


@pytest.mark.timeout(300)
def test_calls_of_a_killed_lambda_worker_are_rerun(lambda_fexec):
    fexec = lambda_fexec
    fexec.storage.create_bucket("lambda-kill")
    marker = {"storage_config": fexec.storage.config, "bucket": "lambda-kill"}
    fs = fexec.map(die_once, range(6), extra_args=(marker,))
    assert fexec.get_result(fs, timeout=240) == [x + 100 for x in range(6)]
    assert fexec.storage.list_keys("lambda-kill") == ["died"]


# --------------------------------------------------------------------------- SSH hosts


@pytest.mark.netns
@pytest.mark.timeout(240)
def test_lithops_program_on_ssh_hosts(ssh_hosts):  # noqa: F811
    from dask_lithops.testing.moto_server import MotoServer

    with MotoServer(host=ssh_hosts.gateway) as moto, lithops.StandaloneExecutor(
            backend="ssh", config=storage_config(moto.endpoint_url),
            hosts=[f"root@{h}" for h in ssh_hosts.hosts], ssh_key_filename=ssh_hosts.key_filename,
            known_hosts=ssh_hosts.known_hosts, remote_python=sys.executable, worker_processes=1,
            threads_per_worker=2, death_timeout=10, dashboard_address=None) as fexec:
        assert fexec.mode == "standalone" and fexec.backend == "ssh"
        fexec.client.wait_for_workers(3, timeout=60)
        run_lithops_program(fexec, "ssh-data")
        hosts = {h for h, _ in fexec.get_result(fexec.map(where, range(30)))}
        assert len(hosts) >= 2 and hosts <= set(ssh_hosts.hosts)  # the calls ran on the hosts
        cluster = fexec.cluster
    assert cluster.status.name == "closed"
