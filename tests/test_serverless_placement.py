"""ServerlessCluster(scheduler="ssh"|"aws_ec2"): the scheduler and the relay on a host of their own.

Functions run in the Lambda emulator's outbound-only sandboxes; the scheduler host is a
namespace host with a real sshd (an SSH test host, or a VM the EC2 world's booter brought
up for moto).  Sandboxes and hosts sit on different test bridges: they reach each other
routed through this machine, as functions reach a cloud host through the internet.
"""

from __future__ import annotations

import os
import sys
import time

import pytest

pytest.importorskip("boto3")
pytest.importorskip("awslambdaric")

from distributed import Client  # noqa: E402

from dask_lithops.serverless import ServerlessCluster  # noqa: E402

EXTRA = ["pandas", "pyarrow", "numpy"]
pytestmark = [pytest.mark.netns, pytest.mark.timeout(300)]


def _route_between_bridges() -> None:
    """Test bridges are separate subnets of this machine: let it route between them."""
    with open("/proc/sys/net/ipv4/ip_forward") as f:
        if f.read().strip() == "1":
            return
    with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
        f.write("1\n")  # left on: other test worlds running now may rely on it too


@pytest.fixture(scope="module")
def ec2_world():
    """moto (EC2, IAM, STS, S3) on a test bridge and the VM booter: this world's AWS."""
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    from dask_lithops.testing.moto_server import DUMMY_CREDENTIALS, moto_available
    from dask_lithops.testing.ssh_hosts import ssh_hosts_available
    from dask_lithops.testing.vm_booter import EC2World

    reason = ssh_hosts_available() or moto_available()
    if reason:
        pytest.skip(f"EC2 test world unavailable: {reason}")
    mp = pytest.MonkeyPatch()
    for k, v in DUMMY_CREDENTIALS.items():
        mp.setenv(k, v)
    try:
        with EC2World() as world:
            yield world
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def emulator(ec2_world):
    """Functions as on Lambda seen from a laptop behind NAT: they reach no address of this
    machine (host_reachable=False) but the world's AWS (role credentials from its STS) and
    hosts on other bridges, as functions reach the internet."""
    from dask_lithops.testing.lambda_emulator import LambdaEmulator, sandbox_unavailable

    reason = sandbox_unavailable()
    if reason:
        pytest.skip(f"Lambda emulator sandboxes unavailable: {reason}")
    _route_between_bridges()
    with LambdaEmulator(sandbox=True, host_reachable=False,
                        aws_endpoint_url=ec2_world.endpoint_url) as emu:
        yield emu


@pytest.fixture(scope="module")
def ssh_host():
    from dask_lithops.testing.ssh_hosts import SSHHosts, ssh_hosts_available

    reason = ssh_hosts_available()
    if reason:
        pytest.skip(f"SSH namespace hosts unavailable: {reason}")
    with SSHHosts(1) as hosts:
        yield hosts


def busy(emu, function):
    return [e for e in emu.environments if e.state in ("busy", "starting")
            and e.function == function]


def wait_for(pred, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.2)
    return pred()


def groupby_p2p(client):
    import dask
    import dask.dataframe as dd
    import numpy as np
    import pandas as pd

    pdf = pd.DataFrame({"k": np.arange(4000) % 37, "v": np.arange(4000.0)})
    ddf = dd.from_pandas(pdf, npartitions=8)
    with dask.config.set({"dataframe.shuffle.method": "p2p"}):
        got = ddf.groupby("k").v.sum(split_out=4).compute().sort_index()
    pd.testing.assert_series_equal(got, pdf.groupby("k").v.sum().sort_index(), check_names=False)


@pytest.fixture(scope="module")
def deployed(emulator):
    """The runtime's function, deployed once (a cluster's first start builds and uploads it)."""
    from dask_lithops.runtime.builder import build_runtime
    from dask_lithops.serverless.backends.aws_lambda import AWSLambdaBackend, resolve_config

    backend = AWSLambdaBackend(resolve_config(endpoint_url=emulator.endpoint_url,
                                              runtime_memory=1024, runtime_timeout=600))
    pkg = build_runtime("default", extra_packages=EXTRA)
    name = backend.get_runtime_key(pkg.name, 1024, pkg.version)
    if backend.get_runtime_info(name) is None:
        backend.deploy_runtime(pkg, 1024, 600)
    return name


def test_local_scheduler_unreachable_fails_fast_with_the_fix(emulator, deployed):
    """A laptop behind NAT with scheduler="local": a clear error within worker_start_timeout,
    before any worker is invoked, and nothing left running (scheduler, relay, invocations)."""
    import re
    import threading

    from dask_lithops.serverless.reachability import SchedulerUnreachable

    events = len([i for i in emulator.invocations() if i.kind == "Event"])
    threads = {t.name for t in threading.enumerate()}
    t0 = time.monotonic()
    with pytest.raises(SchedulerUnreachable) as info:
        ServerlessCluster(endpoint_url=emulator.endpoint_url, scheduler="local",
                          contact_address=emulator.host_address, extra_packages=EXTRA,
                          runtime_memory=1024, runtime_timeout=600, dashboard_address=None,
                          n_workers=2, worker_start_timeout="30s")
    assert time.monotonic() - t0 < 30
    msg = str(info.value)
    host = re.escape(emulator.host_address)
    assert re.search(rf"the scheduler at {host}:\d+ \(", msg), msg
    assert re.search(rf"the relay at {host}:\d+ \(", msg), msg
    assert 'scheduler="aws_ec2"' in msg and "contact_address" in msg and "vpc" in msg, msg
    assert len([i for i in emulator.invocations() if i.kind == "Event"]) == events
    # the scheduler and the relay were closed: nothing listens or serves any more
    assert wait_for(lambda: not [t for t in threading.enumerate()
                                 if t.name not in threads and t.is_alive()
                                 and "invoke" in t.name], 10)


def ssh_scheduler_cluster(emulator, ssh_host, **kwargs) -> ServerlessCluster:
    """A cluster whose scheduler runs on the SSH test host (the host's bare Python)."""
    kwargs.setdefault("runtime_memory", 1024)
    return ServerlessCluster(
        endpoint_url=emulator.endpoint_url, scheduler="ssh",
        scheduler_host=f"root@{ssh_host.hosts[0]}",
        scheduler_options=dict(ssh_key_filename=ssh_host.key_filename,
                               known_hosts=ssh_host.known_hosts, remote_python=sys.executable,
                               install_runtime=False),
        extra_packages=EXTRA, dashboard_address=None, **kwargs)


def test_scheduler_on_an_ssh_host(emulator, ssh_host):
    host = ssh_host.hosts[0]
    cluster = ssh_scheduler_cluster(emulator, ssh_host, runtime_timeout=600,
                                    death_timeout="10s")
    fn = cluster.function_name
    with cluster, Client(cluster) as client:
        # the client reaches the scheduler through its SSH tunnel; functions dial the host
        assert cluster.scheduler_address.startswith("tls://127.0.0.1:")
        assert cluster.worker_scheduler_address == f"tls://{host}:8786"
        assert cluster.relay_address == f"{host}:8788"
        assert cluster._relay_server is None  # no relay in the client
        procs = ssh_host.dask_processes_on(host)
        assert any("remote_scheduler" in cmd for _, cmd in procs), procs
        cluster.scale(2)
        client.wait_for_workers(2, timeout=90)
        workers = client.scheduler_info()["workers"]
        assert all(a.startswith(f"relay://{host}:8788/") for a in workers), workers
        groupby_p2p(client)
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 15  # exit reports reached the cluster: no wait timed out
    assert wait_for(lambda: not busy(emulator, fn)), busy(emulator, fn)
    assert wait_for(lambda: not ssh_host.dask_processes_on(host), 15), \
        ssh_host.dask_processes_on(host)
    usage = cluster.usage()  # from the exit reports the workers posted to the remote scheduler
    assert usage["invocations"] == 2 and usage["running"] == 0
    assert all(r["reason"] == "finished" and r["max_rss_bytes"] for r in usage["workers"]), \
        usage["workers"]


def test_rotation_with_the_scheduler_on_a_host(emulator, ssh_host):
    """runtime_timeout=20s, a 40 s chain: workers rotate (drained, then retired by the remote
    scheduler), no key is lost or computed twice."""
    import numpy as np

    cluster = ssh_scheduler_cluster(emulator, ssh_host, runtime_memory=1152, runtime_timeout=20)

    def step(prev, i):
        time.sleep(1.0)
        return prev + np.full(1000, i, dtype="int64")

    def transitions(dask_scheduler):
        import collections

        log = list(dask_scheduler.transition_log)
        computed = collections.Counter(str(key) for key, start, finish, *_ in log
                                       if start == "processing" and finish == "memory")
        # a task running on a worker that rotated out, taken away from it
        interrupted = [str(key) for key, start, finish, _, stimulus, *_ in log
                       if start == "processing" and finish != "memory" and "rotate" in stimulus]
        return dict(computed), interrupted

    with cluster, Client(cluster) as client:
        cluster.scale(2)
        client.wait_for_workers(2, timeout=60)
        futures = [client.submit(np.zeros, 1000, dtype="int64", pure=False)]
        for i in range(1, 41):
            futures.append(client.submit(step, futures[-1], i, pure=False))
        results = client.gather(futures)
        for i, r in enumerate(results):
            assert int(r[0]) == i * (i + 1) // 2
        counts, interrupted = client.run_on_scheduler(transitions)
        assert max(counts.values()) == 1, {k: v for k, v in counts.items() if v > 1}
        assert interrupted == []  # drained first: running tasks finished where they ran
        assert len(cluster.usage_tracker.records) >= 2 + 2 * 2  # each slot rotated twice
        assert not [i for i in emulator.invocations(cluster.function_name)
                    if i.status == "timedout"]


def test_task_longer_than_the_function_lifetime_fails_with_the_scheduler_on_a_host(
        emulator, ssh_host):
    """runtime_timeout=20s, a task sleeping 300 s, the scheduler on the SSH host: the task is
    counted as it outlives each worker (the drain runs on that scheduler) and fails naming the
    fix after LIFETIME_ATTEMPTS workers, instead of being retried forever."""
    from dask_lithops.failures import WorkerFailureError
    from dask_lithops.serverless.cluster import LIFETIME_ATTEMPTS

    def sleep_then(seconds, value=None):
        time.sleep(seconds)
        return value

    # the rotation test's function (1152 MB, 20 s); 1024 MB is deployed with 600 s here
    cluster = ssh_scheduler_cluster(emulator, ssh_host, runtime_memory=1152, runtime_timeout=20)
    fn = cluster.function_name
    with cluster, Client(cluster) as client:
        cluster.scale(1)
        client.wait_for_workers(1, timeout=60)
        start = time.monotonic()
        # a tuple key: it goes to the remote scheduler and back (pickled, then msgpack)
        future = client.submit(sleep_then, 300, key=("outlives-workers", 0))
        with pytest.raises(WorkerFailureError) as info:
            future.result(timeout=120)
        elapsed = time.monotonic() - start
        message = str(info.value)
        assert "ran longer than a worker's lifetime" in message, message
        assert "runtime_timeout up to the backend's limit of 900s" in message, message
        assert "split the task" in message and "StandaloneCluster" in message, message
        # bounded: LIFETIME_ATTEMPTS workers' lifetimes plus the replacements' cold starts
        records = cluster.usage()["workers"]
        starts = sum(r["registered"] - r["invoked"] for r in records if r["registered"])
        assert elapsed < LIFETIME_ATTEMPTS * cluster.worker_lifetime + starts + 10, \
            (elapsed, starts)
        assert [f.kind for f in cluster.worker_failures] == ["timeout"]
        assert cluster._lifetime_attempts == {("outlives-workers", 0): LIFETIME_ATTEMPTS}
        # the cluster still works
        assert client.submit(sleep_then, 0.1, 7).result(timeout=60) == 7
    # no invocation is left running, and none ran on to the platform's timeout
    assert wait_for(lambda: not busy(emulator, fn)), busy(emulator, fn)
    timedout = [i for i in emulator.invocations(fn) if i.status == "timedout"]
    assert not timedout, timedout


# -- aws_ec2: a small VM (moto + the VM booter) ------------------------------------------------
def vm_options(world, **overrides) -> dict:
    """scheduler_options for the scheduler's VM in the EC2 world (StandaloneCluster's keys)."""
    opts = world.cluster_options(master_instance_type="t3.micro", start_timeout=60, **overrides)
    for key in ("worker_instance_type", "worker_processes"):
        opts.pop(key)
    return opts


def namespaces() -> set[str]:
    import subprocess

    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def parquet_on_s3(world, monkeypatch):
    """A dataset on the world's S3 (moto), as a user has it: s3://dask-lithops-data/table/."""
    import io

    import numpy as np
    import pandas as pd

    s3 = world.moto.client("s3")
    s3.create_bucket(Bucket="dask-lithops-data")
    pdf = pd.DataFrame({"k": np.arange(6000) % 41, "v": np.arange(6000.0)})
    for i in range(6):
        buf = io.BytesIO()
        pdf.iloc[i * 1000:(i + 1) * 1000].to_parquet(buf, index=False)
        s3.put_object(Bucket="dask-lithops-data", Key=f"table/part-{i}.parquet",
                      Body=buf.getvalue())
    # where S3 is in this world, for the client (the scheduler's VM and the functions are told
    # by the world, as AWS's own endpoints need no telling)
    monkeypatch.setenv("AWS_ENDPOINT_URL", world.endpoint_url)
    return "s3://dask-lithops-data/table/", pdf


def instance_profile(world, name="dask-lithops-scheduler") -> str:
    """An instance profile for the scheduler's VM: its role reads the dataset's metadata."""
    iam = world.moto.client("iam")
    if not iam.list_instance_profiles()["InstanceProfiles"]:
        iam.create_role(RoleName=name, AssumeRolePolicyDocument="{}")
        iam.create_instance_profile(InstanceProfileName=name)
        iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)
    return name


def test_scheduler_on_an_ec2_vm(emulator, ec2_world, monkeypatch):
    import dask
    import dask.dataframe as dd
    import pandas as pd

    path, pdf = parquet_on_s3(ec2_world, monkeypatch)
    cluster = ServerlessCluster(
        endpoint_url=emulator.endpoint_url, scheduler="aws_ec2",
        scheduler_options=vm_options(ec2_world, instance_role=instance_profile(ec2_world)),
        extra_packages=EXTRA, runtime_memory=1024, runtime_timeout=600, death_timeout="10s",
        dashboard_address=None)
    fn = cluster.function_name
    with cluster, Client(cluster) as client:
        vms = cluster.remote_host.provider.vms
        assert len(vms) == 1
        vm = vms[0]
        inst = ec2_world.instances(instance_id=vm.instance_id)[0]
        assert inst["InstanceType"] == "t3.micro"
        assert {t["Key"]: t["Value"] for t in inst["Tags"]}["dask-lithops-role"] == "master"
        assert cluster.worker_scheduler_address == f"tls://{vm.address}:8786"
        assert cluster.relay_address == f"{vm.address}:8788"
        # the security group opens SSH to the client and the two ports to the functions only
        sg = ec2_world.client().describe_security_groups(
            GroupIds=[cluster.remote_host.provider.security_group_id])["SecurityGroups"][0]
        open_ports = {p.get("FromPort"): [r["CidrIp"] for r in p.get("IpRanges", [])]
                      for p in sg["IpPermissions"] if p.get("IpRanges")}
        assert open_ports == {22: [f"{ec2_world.bridge.gateway}/32"],
                              8786: ["0.0.0.0/0"], 8788: ["0.0.0.0/0"]}, open_ports
        vm_namespace = ec2_world.booter.hosts[vm.instance_id].name
        assert vm_namespace in namespaces()
        cluster.scale(2)
        client.wait_for_workers(2, timeout=90)
        # the workers read the parquet from S3 with their function's credentials
        creds = client.run(lambda: os.environ.get("AWS_ACCESS_KEY_ID"))
        assert len(creds) == 2 and os.environ["AWS_ACCESS_KEY_ID"] not in creds.values(), creds
        df = dd.read_parquet(path, filesystem="arrow")
        with dask.config.set({"dataframe.shuffle.method": "p2p"}):
            got = df.groupby("k").v.sum(split_out=3).compute().sort_index()
        pd.testing.assert_series_equal(got, pdf.groupby("k").v.sum().sort_index(),
                                       check_names=False)
    assert wait_for(lambda: not busy(emulator, fn)), busy(emulator, fn)
    assert wait_for(lambda: ec2_world.states()[vm.instance_id] == "terminated", 30), \
        ec2_world.states()
    assert wait_for(lambda: vm.instance_id not in ec2_world.booter.running(), 15)
    assert wait_for(lambda: vm_namespace not in namespaces(), 15), vm_namespace


CLIENT = r"""
import json, sys, time
from distributed import Client
from dask_lithops.serverless import ServerlessCluster
opts = json.loads(sys.argv[1])
cluster = ServerlessCluster(**opts)
client = Client(cluster)
client.wait_for_workers(2, timeout=120)
assert client.submit(lambda x: x + 1, 41).result() == 42
vm = cluster.remote_host.provider.vms[0].instance_id
print("READY " + json.dumps([vm, cluster.function_name]), flush=True)
time.sleep(3600)
"""


def test_sigkilled_client_vm_stopped_by_its_keeper(emulator, ec2_world):
    import json
    import signal
    import subprocess

    soft, death = 8.0, 5.0
    opts = dict(endpoint_url=emulator.endpoint_url, scheduler="aws_ec2",
                scheduler_options=vm_options(ec2_world, exec_mode="reuse",
                                             soft_dismantle_timeout=soft),
                extra_packages=EXTRA, runtime_memory=1024, runtime_timeout=600,
                death_timeout=f"{death}s", dashboard_address=None, n_workers=2)
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, json.dumps(opts)],
                            stdout=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, **ec2_world.moto.env})
    try:
        line = proc.stdout.readline()
        assert line.startswith("READY "), line
        vm, fn = json.loads(line.split(" ", 1)[1])
        assert len(busy(emulator, fn)) == 2
        assert ec2_world.states()[vm] == "running"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_wall, killed = time.time(), time.monotonic()
    # every invocation ends once its worker has lost the scheduler for death_timeout
    assert wait_for(lambda: not busy(emulator, fn), death + 15), busy(emulator, fn)
    assert time.monotonic() - killed <= death + 10, time.monotonic() - killed
    # the VM's keeper stops it (reuse mode) once the client's heartbeats are gone
    assert wait_for(lambda: ec2_world.states()[vm] in ("stopped", "terminated"), soft + 20)
    assert wait_for(lambda: vm not in ec2_world.booter.running())
    down = ec2_world.booter.event_time(vm, "down") - killed_wall
    assert down <= soft + 10, down
    assert ec2_world.states()[vm] == "stopped"
