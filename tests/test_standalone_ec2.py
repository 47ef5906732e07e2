"""StandaloneCluster(backend="aws_ec2") against moto + the VM booter (namespace hosts, real sshd)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from dask_lithops.testing.fixtures import ec2_world  # noqa: F401

pytestmark = [pytest.mark.netns, pytest.mark.timeout(240)]

DOWN = ("stopped", "terminated")


def cluster(world, **kw):
    from dask_lithops import StandaloneCluster

    kw.setdefault("dashboard_address", None)
    kw.setdefault("start_timeout", 30)
    return StandaloneCluster(backend="aws_ec2", **world.cluster_options(**kw))


def wait_for(pred, timeout=20.0, interval=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    return pred()


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_create_compute_close(ec2_world, capsys):
    import re

    import dask
    import dask.dataframe as dd
    import pandas as pd
    from distributed import Client

    from dask_lithops.standalone.providers.aws_ec2 import EC2Provider

    with cluster(ec2_world, n_vms=3, exec_mode="create", threads_per_worker=2) as c, \
            Client(c) as client:
        assert c.backend == "aws_ec2" and isinstance(c.provider, EC2Provider)
        client.wait_for_workers(3, timeout=60)
        ids = [v.instance_id for v in c.vms]
        hosts = {iid: h.name for iid, h in ec2_world.booter.hosts.items() if iid in ids}
        assert set(hosts) == set(ids)
        # every worker runs on a VM, at the instance's private address
        addrs = {w["host"] for w in client.scheduler_info()["workers"].values()}
        assert addrs == {v.private_ip for v in c.vms}

        pdf = pd.DataFrame({"k": [i % 17 for i in range(6000)], "v": range(6000)})
        df = dd.from_pandas(pdf, npartitions=12)
        with dask.config.set({"dataframe.shuffle.method": "p2p"}):
            got = df.shuffle("k").groupby("k").v.sum().compute()
        pd.testing.assert_series_equal(got.sort_index(), pdf.groupby("k").v.sum().sort_index())

        # tags, key pair and security group as promised
        inst = ec2_world.instances(instance_id=ids[0])[0]
        tags = {t["Key"]: t["Value"] for t in inst["Tags"]}
        assert tags["dask-lithops"] == "true" and tags["dask-lithops-cluster"] == c.cluster_id
        assert "PublicIpAddress" not in inst
        sg = ec2_world.client().describe_security_groups(
            GroupIds=[c.provider.security_group_id])["SecurityGroups"][0]
        ssh = [p for p in sg["IpPermissions"] if p.get("FromPort") == 22]
        assert [r["CidrIp"] for r in ssh[0]["IpRanges"]] == [f"{ec2_world.bridge.gateway}/32"]
        inside = [p for p in sg["IpPermissions"] if p.get("UserIdGroupPairs")]
        assert inside[0]["UserIdGroupPairs"][0]["GroupId"] == sg["GroupId"]
        assert {t["Key"]: t["Value"] for t in sg["Tags"]}["dask-lithops"] == "true"
    # the VM boot is a console phase, with its duration (dask_lithops.progress)
    assert re.search(r"dask-lithops: starting 3 aws_ec2 VMs: done in [\d.]+ s \(3 reachable "
                     r"over SSH\)", capsys.readouterr().err)
    states = {i: s for i, s in ec2_world.states().items() if i in ids}
    assert set(states.values()) == {"terminated"}, states
    assert wait_for(lambda: not set(ec2_world.booter.running()) & set(ids))
    assert not set(hosts.values()) & namespaces()
    assert not ec2_world.booter.errors


def test_remote_scheduler_runs_on_a_master_vm(ec2_world):
    """scheduler="remote": the scheduler gets a VM of its own, of master_instance_type
    (Lithops' master VM; dask-cloudprovider's scheduler instance), reached through SSH."""
    from distributed import Client

    ec2_world.booter.first_boot_delay = 4.0  # so VMs started one after another would show
    with cluster(ec2_world, n_vms=2, exec_mode="create", scheduler="remote",
                 master_instance_type="t3.small", worker_instance_type="t3.micro") as c, \
            Client(c) as client:
        client.wait_for_workers(2, timeout=90)
        ids = [v.instance_id for v in c.vms]
        masters = [v for v in c.vms if v.instance_id in c.provider.master_ids]
        workers = [v for v in c.vms if v.instance_id not in c.provider.master_ids]
        assert len(masters) == 1 and len(workers) == 2
        types = {i["InstanceId"]: i["InstanceType"] for i in ec2_world.instances()}
        assert types[masters[0].instance_id] == "t3.small"
        assert {types[v.instance_id] for v in workers} == {"t3.micro"}
        master = ec2_world.instances(instance_id=masters[0].instance_id)[0]
        role = {t["Key"]: t["Value"] for t in master["Tags"]}
        assert role["dask-lithops-role"] == "master"
        # the master was created while the workers' VMs started, not after they were up
        launched = [i["LaunchTime"] for i in ec2_world.instances() if i["InstanceId"] in ids]
        assert (max(launched) - min(launched)).total_seconds() < 3.0, launched
        # the scheduler runs on the master, workers only on the worker VMs
        assert c.scheduler.worker_address.split("://")[1].startswith(masters[0].private_ip + ":")
        assert c.scheduler_address.startswith("tls://127.0.0.1:")  # the SSH tunnel
        addrs = {w["host"] for w in client.scheduler_info()["workers"].values()}
        assert addrs == {v.private_ip for v in workers}
        x = client.map(lambda i: i * i, range(40))
        assert client.submit(sum, x).result() == sum(i * i for i in range(40))
        assert "scheduler (host log)" in c.get_logs(workers=False)
    states = {i: s for i, s in ec2_world.states().items() if i in ids}
    assert set(states.values()) == {"terminated"}, states
    assert wait_for(lambda: not set(ec2_world.booter.running()) & set(ids))
    assert not ec2_world.booter.errors


def test_scale_creates_and_releases_vms(ec2_world):
    from distributed import Client

    with cluster(ec2_world, n_vms=1, max_workers=3, exec_mode="create") as c, \
            Client(c) as client:
        client.wait_for_workers(1, timeout=60)
        first = {v.instance_id for v in c.vms}
        c.scale(hosts=5)  # beyond the VM held: the provider creates more, up to max_workers
        client.wait_for_workers(3, timeout=120)
        held = {v.instance_id for v in c.vms}
        assert len(held) == 3 and first < held
        assert len(ec2_world.instances()) == 3
        addrs = {w["host"] for w in client.scheduler_info()["workers"].values()}
        assert addrs == {v.private_ip for v in c.vms}
        assert client.submit(lambda x: x + 1, 41).result() == 42

        c.scale(hosts=1)  # VMs whose workers are retired are terminated while the cluster lives
        assert wait_for(lambda: len(client.scheduler_info()["workers"]) == 1, timeout=60)
        assert wait_for(lambda: len(c.vms) == 1, timeout=60)  # released once the group stopped
        released = held - {v.instance_id for v in c.vms}
        assert len(released) == 2
        assert wait_for(lambda: {ec2_world.states()[i] for i in released} == {"terminated"},
                        timeout=60), {i: ec2_world.states()[i] for i in released}
        assert client.submit(lambda x: x * 2, 21).result() == 42
    assert set(ec2_world.states().values()) == {"terminated"}
    assert wait_for(lambda: not set(ec2_world.booter.running()) & held)


def test_reuse_starts_stopped_vms_faster(ec2_world):
    from distributed import Client

    ec2_world.booter.first_boot_delay = 2.0  # a fresh instance provisions longer than a restart
    timings, vm_ids = [], []
    for _ in range(2):
        t0 = time.perf_counter()
        with cluster(ec2_world, n_vms=2, exec_mode="reuse") as c, Client(c) as client:
            client.wait_for_workers(2, timeout=60)
            timings.append(time.perf_counter() - t0)
            vm_ids.append(sorted(v.instance_id for v in c.vms))
            assert client.submit(lambda x: x * 2, 21).result() == 42
        states = ec2_world.states()
        assert {states[i] for i in vm_ids[-1]} <= {"stopping", "stopped"}  # stopped, kept
        assert wait_for(lambda: not set(ec2_world.booter.running()) & set(vm_ids[-1]))
    assert vm_ids[0] == vm_ids[1], "the second cluster must start the stopped VMs"
    assert len(ec2_world.instances()) == 2, "no VM may be created when stopped ones exist"
    assert timings[1] < timings[0], timings


def test_sigkill_client_keeper_dismantles(ec2_world):
    from dask_lithops.testing.vm_booter import spawn_client

    soft = 5.0
    proc, ids = spawn_client(ec2_world, n_vms=2, exec_mode="reuse", soft_dismantle_timeout=soft,
                             start_timeout=30)
    assert set(ids) <= set(ec2_world.booter.running())
    time.sleep(soft + 1)  # heartbeats keep a live client's VMs running past the soft timeout
    assert {ec2_world.states()[i] for i in ids} == {"running"}
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = time.time()
    stopped = wait_for(lambda: all(ec2_world.states()[i] in DOWN for i in ids),
                       timeout=soft + 15)
    assert stopped, {i: ec2_world.states()[i] for i in ids}
    assert wait_for(lambda: not set(ec2_world.booter.running()) & set(ids))
    down = max(ec2_world.booter.event_time(i, "down") for i in ids) - killed
    assert down <= soft + 10, down
    assert {ec2_world.states()[i] for i in ids} == {"stopped"}  # reuse: stopped, not terminated
    assert "StopInstances" in ec2_world.booter.keeper_log(ids[0]) or \
        "dismantling" in ec2_world.booter.keeper_log(ids[0])


def test_vm_that_never_boots_is_replaced(ec2_world):
    from distributed import Client

    ec2_world.booter.ignore_next(1)
    with cluster(ec2_world, n_vms=2, start_timeout=6, start_retries=1) as c, Client(c) as client:
        client.wait_for_workers(2, timeout=60)
        ids = {v.instance_id for v in c.vms}
        ignored = ec2_world.booter.ignored
        assert len(ignored) == 1 and not ignored & ids
        assert ec2_world.states()[next(iter(ignored))] == "terminated"  # its remains removed
        assert client.submit(sum, [1, 2]).result() == 3
    assert len(ec2_world.instances()) == 3
    assert set(ec2_world.states().values()) == {"terminated"}


def test_unreachable_vms_fail_after_bounded_retries(ec2_world):
    from dask_lithops.standalone.providers.aws_ec2 import VMUnreachableError

    ec2_world.booter.ignore_next(10)
    with pytest.raises(VMUnreachableError, match="never became reachable"):
        cluster(ec2_world, n_vms=1, start_timeout=3, start_retries=1)
    assert len(ec2_world.instances()) == 2  # the first and one replacement
    assert set(ec2_world.states().values()) == {"terminated"}


def test_vm_list_and_clean(ec2_world):
    from click.testing import CliRunner

    from dask_lithops.cli import main

    with cluster(ec2_world, n_vms=2, exec_mode="reuse") as c:
        ids = [v.instance_id for v in c.vms]
    args = ["--endpoint-url", ec2_world.endpoint_url, "--region", ec2_world.region]
    r = CliRunner().invoke(main, ["vm", "list", *args])
    assert r.exit_code == 0, r.output
    for i in ids:
        assert i in r.output
    assert "key-pair" in r.output and "security-group" in r.output
    r = CliRunner().invoke(main, ["clean", "--yes", *args])
    assert r.exit_code == 0, r.output
    assert {ec2_world.states()[i] for i in ids} == {"terminated"}
    ec2 = ec2_world.client()
    tagged = [{"Name": "tag:dask-lithops", "Values": ["true"]}]
    assert not ec2.describe_key_pairs(Filters=tagged)["KeyPairs"]
    assert not ec2.describe_security_groups(Filters=tagged)["SecurityGroups"]
    r = CliRunner().invoke(main, ["vm", "list", *args])
    assert "0 VMs, 0 key pairs, 0 security groups" in r.output, r.output


def test_bad_options_fail_before_anything_is_created(ec2_world):
    from dask_lithops import config

    with pytest.raises(config.ConfigError, match="exec_mode"):
        cluster(ec2_world, exec_mode="borrow")
    with pytest.raises(config.ConfigError, match="instance_id"):
        cluster(ec2_world, exec_mode="consume")
    with pytest.raises(config.ConfigError, match="n_vms"):
        cluster(ec2_world, n_vms=5, max_workers=2)
    assert ec2_world.instances() == []


def test_capacity_errors_are_reported_clearly():
    """AWS capacity/quota refusals (moto cannot produce them) become EC2CapacityError."""
    from botocore.exceptions import ClientError

    from dask_lithops.standalone.providers.aws_ec2 import (
        EC2CapacityError,
        EC2Error,
        describe_client_error,
    )

    err = ClientError({"Error": {"Code": "InsufficientInstanceCapacity",
                                 "Message": "We currently do not have sufficient capacity"}},
                      "RunInstances")
    e = describe_client_error(err, "RunInstances (3 x c5.large in us-east-1)")
    assert isinstance(e, EC2CapacityError)
    assert "no capacity" in str(e) and "3 x c5.large" in str(e) and "instance_type" in str(e)
    e = describe_client_error(ClientError({"Error": {"Code": "VcpuLimitExceeded",
                                                     "Message": "limit"}}, "RunInstances"), "x")
    assert isinstance(e, EC2CapacityError) and "vCPU limit" in str(e)
    e = describe_client_error(ClientError({"Error": {"Code": "InvalidAMIID.NotFound",
                                                     "Message": "no"}}, "RunInstances"), "x")
    assert type(e) is EC2Error and "InvalidAMIID.NotFound" in str(e)
