"""The EC2 VM booter: moto's instances become namespace hosts running a real sshd.

:class:`VMBooter` polls moto's DescribeInstances.  For each instance that is
``running`` and whose private address lies in its bridge's subnet it "boots" a
VM: a network namespace at that address (:class:`VMHost`, an
:class:`~dask_lithops.testing.ssh_hosts.SSHHost`), cloud-init's part (the
instance id in ``<root>/var/lib/cloud/data/instance-id``; on first boot the
instance's user data, on later boots the per-boot scripts), then sshd with the
host key and authorized keys the user data installed.  When the instance stops
or terminates, every process of the namespace is killed and the namespace
removed; the VM's directory (its "disk") survives a stop and is removed on
termination.

User data runs inside the namespace with ``DASK_LITHOPS_VM_ROOT=<vm dir>`` and
``DASK_LITHOPS_VM_HOME=<vm dir>/home``: the VM's files live under its own
directory, never in this machine's ``/etc``.  ``env`` (e.g. moto's dummy
credentials) is added to the user data's environment: what an instance role
provides on a real VM.

``ignore_next(n)``: the next ``n`` instances never boot (no host ever appears
at their address) -- to exercise the provider's replacement path.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from .netns import Bridge
from .ssh_hosts import SSHD, SSHD_CONFIG, SSHHost, _keygen

logger = logging.getLogger(__name__)

DOWN_STATES = ("stopping", "stopped", "shutting-down", "terminated")


class VMHost(SSHHost):
    """A namespace host whose sshd uses the host key and authorized keys of its root dir."""

    def __init__(self, bridge: Bridge, root: str, address: str, env: dict | None = None):
        super().__init__(bridge, authorized_keys="", directory=root, address=address,
                         env=env)
        self.root = root

    def create_namespace(self) -> None:
        os.makedirs(self.home, exist_ok=True)
        self.netns.create()

    def run_script(self, path_or_text: str, env: dict, timeout: float = 60,
                   text: bool = False) -> subprocess.CompletedProcess:
        args = ["sh", "-s"] if text else ["sh", path_or_text]
        return self.netns.run(args, input=path_or_text if text else None,
                              env={**os.environ, **env}, timeout=timeout)

    def start_sshd(self) -> None:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        host_key = os.path.join(self.root, "etc/ssh/ssh_host_ed25519_key")
        if not os.path.exists(host_key):  # no user data installed one: like a stock image
            os.makedirs(os.path.dirname(host_key), exist_ok=True)
            _keygen(host_key, comment=f"host-{self.name}")
        with open(host_key + ".pub") as f:
            self.host_key_public = f.read().strip()
        ak = os.path.join(self.home, ".ssh", "authorized_keys")
        setenv = " ".join(f'"{k}={v}"' for k, v in self.env.items())
        config = os.path.join(self.root, "sshd_config")
        with open(config, "w") as f:
            f.write(SSHD_CONFIG.format(address=self.address, port=self.port, host_key=host_key,
                                       authorized_keys=ak, setenv=setenv))
        self._log = open(os.path.join(self.root, "sshd.log"), "ab")
        self.proc = self.netns.popen([SSHD, "-D", "-e", "-f", config],
                                     stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT)


class VMBooter:
    """Watch moto's instances; boot running ones as namespace hosts, tear down stopped ones."""

    def __init__(self, endpoint_url: str, bridge: Bridge, region: str = "us-east-1",
                 env: dict | None = None, poll_interval: float = 0.2,
                 boot_delay: float = 0.0, first_boot_delay: float = 0.0):
        self.endpoint_url = endpoint_url
        self.bridge = bridge
        self.region = region
        self.env = dict(env or {})
        self.poll_interval = poll_interval
        self.boot_delay = boot_delay
        self.first_boot_delay = first_boot_delay  # a new instance's provisioning (image copy)
        self.directory: str | None = None
        self.hosts: dict[str, VMHost] = {}
        self.roots: dict[str, str] = {}
        self.booted_once: set[str] = set()
        self.ignored: set[str] = set()
        self._ignore_budget = 0
        self.events: list[tuple[float, str, str]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._busy: set[str] = set()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(8, thread_name_prefix="vm-booter")
        self._client = None

    # -- control -----------------------------------------------------------------------------
    def start(self) -> VMBooter:
        import boto3

        self.directory = tempfile.mkdtemp(prefix="dl-vms-")
        self._client = boto3.client("ec2", region_name=self.region,
                                    endpoint_url=self.endpoint_url,
                                    aws_access_key_id="testing",
                                    aws_secret_access_key="testing")
        self._thread = threading.Thread(target=self._loop, daemon=True, name="vm-booter")
        self._thread.start()
        return self

    def ignore_next(self, n: int = 1) -> None:
        """The next ``n`` instances seen running never boot."""
        with self._lock:
            self._ignore_budget += n

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self._pool.shutdown(wait=True)
        hosts, self.hosts = list(self.hosts.values()), {}
        for h in hosts:
            h.stop()
        if self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def __enter__(self) -> VMBooter:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- queries -----------------------------------------------------------------------------
    def running(self) -> dict[str, str]:
        """{instance id: address} of every booted VM."""
        return {iid: h.address for iid, h in self.hosts.items()}

    def event_time(self, instance_id: str, event: str) -> float | None:
        times = [t for t, i, e in self.events if i == instance_id and e == event]
        return times[-1] if times else None

    def keeper_log(self, instance_id: str) -> str:
        root = self.roots.get(instance_id)
        try:
            with open(os.path.join(root, "var/log/dask-lithops-keeper.log")) as f:
                return f.read()
        except (OSError, TypeError):
            return ""

    # -- the loop ----------------------------------------------------------------------------
    def _describe(self) -> list[dict]:
        out = []
        for page in self._client.get_paginator("describe_instances").paginate():
            for res in page["Reservations"]:
                out += res["Instances"]
        return out

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                instances = self._describe()
            except Exception as e:  # moto restarting or stopping: try again
                logger.debug("describe failed: %s", e)
                self._stop.wait(self.poll_interval)
                continue
            for inst in instances:
                iid, state = inst["InstanceId"], inst["State"]["Name"]
                with self._lock:
                    if iid in self._busy:
                        continue
                    if state == "running" and iid not in self.hosts and iid not in self.ignored:
                        ip = inst.get("PrivateIpAddress")
                        if not ip or not self._in_subnet(ip):
                            continue  # never bring up (or target) an address outside our bridge
                        if self._ignore_budget > 0:
                            self._ignore_budget -= 1
                            self.ignored.add(iid)
                            self.events.append((time.time(), iid, "ignored"))
                            continue
                        self._busy.add(iid)
                        self._pool.submit(self._guard, self._boot, iid, ip)
                    elif state in DOWN_STATES and (iid in self.hosts or (
                            state == "terminated" and iid in self.roots)):
                        self._busy.add(iid)
                        self._pool.submit(self._guard, self._shutdown, iid, state)
            self._stop.wait(self.poll_interval)

    def _in_subnet(self, ip: str) -> bool:
        import ipaddress

        return ipaddress.ip_address(ip) in self.bridge.subnet and ip != self.bridge.gateway

    def _guard(self, fn, iid, *args) -> None:
        try:
            fn(iid, *args)
        except Exception as e:
            logger.exception("VM %s: %s failed", iid, fn.__name__)
            self.errors.append(f"{iid}: {fn.__name__}: {e}")
        finally:
            with self._lock:
                self._busy.discard(iid)

    def _boot(self, iid: str, ip: str) -> None:
        delay = self.boot_delay + (self.first_boot_delay if iid not in self.booted_once else 0)
        if delay:
            time.sleep(delay)
        root = self.roots.get(iid)
        if root is None:
            root = self.roots[iid] = tempfile.mkdtemp(prefix=f"{iid}-", dir=self.directory)
        assert root and root != "/"  # user data writes below it, never into this machine's /etc
        os.makedirs(os.path.join(root, "var/lib/cloud/data"), exist_ok=True)
        with open(os.path.join(root, "var/lib/cloud/data/instance-id"), "w") as f:
            f.write(iid + "\n")
        host = VMHost(self.bridge, root, ip, env=self._instance_role_env(iid))
        host.create_namespace()
        self.hosts[iid] = host
        env = {**self.env, "DASK_LITHOPS_VM_ROOT": root, "DASK_LITHOPS_VM_HOME": host.home,
               "HOME": host.home}
        try:
            if iid not in self.booted_once:
                ud = self._client.describe_instance_attribute(
                    InstanceId=iid, Attribute="userData").get("UserData", {}).get("Value")
                if ud:
                    import base64

                    script = base64.b64decode(ud).decode()
                    r = host.run_script(script, env, text=True)
                    if r.returncode:
                        self.errors.append(f"{iid}: user data exited {r.returncode}: "
                                           f"{r.stderr[-1000:]}")
            else:
                per_boot = os.path.join(root, "var/lib/cloud/scripts/per-boot")
                for name in sorted(os.listdir(per_boot)) if os.path.isdir(per_boot) else []:
                    host.run_script(os.path.join(per_boot, name), env)
            self.booted_once.add(iid)
            host.start_sshd()
            host.wait_ready(timeout=10)
        except Exception:
            self.hosts.pop(iid, None)
            host.stop()
            raise
        self.events.append((time.time(), iid, "booted"))

    def _instance_role_env(self, iid: str) -> dict:
        """What the instance metadata service gives a VM with an instance profile: its role's
        temporary credentials (here from moto's STS), set in every SSH session's environment
        with where this world's AWS is (``AWS_ENDPOINT_URL``).  A VM without a profile gets
        no credentials, as on EC2."""
        inst = self._client.describe_instances(InstanceIds=[iid])["Reservations"][0][
            "Instances"][0]
        arn = (inst.get("IamInstanceProfile") or {}).get("Arn")
        if not arn:
            return {}
        import boto3

        kw = dict(endpoint_url=self.endpoint_url, region_name=self.region,
                  aws_access_key_id=self.env.get("AWS_ACCESS_KEY_ID", "testing"),
                  aws_secret_access_key=self.env.get("AWS_SECRET_ACCESS_KEY", "testing"))
        profile = boto3.client("iam", **kw).get_instance_profile(
            InstanceProfileName=arn.rsplit("/", 1)[1])["InstanceProfile"]
        role = profile["Roles"][0]["Arn"]
        c = boto3.client("sts", **kw).assume_role(RoleArn=role, RoleSessionName=iid)[
            "Credentials"]
        return {"AWS_ACCESS_KEY_ID": c["AccessKeyId"], "AWS_SECRET_ACCESS_KEY":
                c["SecretAccessKey"], "AWS_SESSION_TOKEN": c["SessionToken"],
                "AWS_DEFAULT_REGION": self.region, "AWS_ENDPOINT_URL": self.endpoint_url}

    def _shutdown(self, iid: str, state: str) -> None:
        host = self.hosts.get(iid)
        if host is not None:
            host.stop()  # namespace and every process in it gone before it counts as down
            self.hosts.pop(iid, None)
            self.events.append((time.time(), iid, "down"))
        if state == "terminated":
            root = self.roots.pop(iid, None)
            if root:
                shutil.rmtree(root, ignore_errors=True)


class EC2World:
    """Everything an EC2 test needs: a bridge, moto on its gateway, a VPC and subnet
    equal to the bridge's subnet (so instance addresses land on the bridge), and a
    :class:`VMBooter`.  ``cluster_options()`` are the ``aws_ec2`` keywords for it.
    """

    def __init__(self, region: str = "us-east-1", boot_delay: float = 0.0,
                 first_boot_delay: float = 0.0):
        self.region = region
        self.boot_delay = boot_delay
        self.first_boot_delay = first_boot_delay
        self.bridge: Bridge | None = None
        self.moto = None
        self.booter: VMBooter | None = None
        self.directory: str | None = None
        self.vpc_id = self.subnet_id = self.ami = None

    def start(self) -> EC2World:
        from .moto_server import MotoServer

        try:
            self.directory = tempfile.mkdtemp(prefix="dl-ec2world-")
            self.bridge = Bridge(prefix="dle").create()
            self.moto = MotoServer(host=self.bridge.gateway, region=self.region).start()
            self.moto.warm_up()
            ec2 = self.client()
            self.vpc_id = ec2.create_vpc(CidrBlock=str(self.bridge.subnet))["Vpc"]["VpcId"]
            self.subnet_id = ec2.create_subnet(VpcId=self.vpc_id, CidrBlock=str(
                self.bridge.subnet))["Subnet"]["SubnetId"]
            self.ami = ec2.describe_images(Owners=["amazon"], MaxResults=5)["Images"][0]["ImageId"]
            self.booter = VMBooter(self.moto.endpoint_url, self.bridge, region=self.region,
                                   env=self.moto.env, boot_delay=self.boot_delay,
                                   first_boot_delay=self.first_boot_delay).start()
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def endpoint_url(self) -> str:
        return self.moto.endpoint_url

    def client(self):
        return self.moto.client("ec2")

    def cluster_options(self, **overrides) -> dict:
        """Keywords for StandaloneCluster(backend="aws_ec2") in this world."""
        import sys

        opts = dict(endpoint_url=self.endpoint_url, region=self.region, vpc_id=self.vpc_id,
                    public_subnet_id=self.subnet_id, target_ami=self.ami,
                    worker_instance_type="t3.medium", ssh_username="root",
                    ssh_key_filename=os.path.join(self.directory, "id_ed25519"),
                    associate_public_ip=False, remote_python=sys.executable,
                    install_runtime=False, worker_processes=1)
        opts.update(overrides)
        return opts

    def instances(self, **filters) -> list[dict]:
        kw = {"Filters": [{"Name": k.replace("_", "-"), "Values": [v]}
                          for k, v in filters.items()]} if filters else {}
        out = []
        for res in self.client().describe_instances(**kw)["Reservations"]:
            out += res["Instances"]
        return out

    def states(self) -> dict[str, str]:
        return {i["InstanceId"]: i["State"]["Name"] for i in self.instances()}

    def stop(self) -> None:
        if self.booter is not None:
            self.booter.stop()
            self.booter = None
        if self.moto is not None:
            self.moto.stop()
            self.moto = None
        if self.bridge is not None:
            self.bridge.delete()
            self.bridge = None
        if self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def __enter__(self) -> EC2World:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


CLIENT_SCRIPT = r"""
import json, os, sys, time
from dask_lithops import StandaloneCluster
from distributed import Client
opts = json.loads(sys.argv[1])
cluster = StandaloneCluster(backend="aws_ec2", **opts)
client = Client(cluster)
client.wait_for_workers(len(cluster.vms), timeout=120)
assert client.submit(sum, [1, 2, 3]).result() == 6
print("READY " + json.dumps([v.instance_id for v in cluster.vms]), flush=True)
time.sleep(3600)
"""


def spawn_client(world: EC2World, timeout: float = 180, **options):
    """A client process running an EC2 cluster in ``world``; returns (Popen, instance ids).

    For SIGKILL tests: it prints ``READY [ids]`` once its workers computed.
    """
    import json
    import sys

    opts = world.cluster_options(**options)
    proc = subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, json.dumps(opts)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, **world.moto.env}, start_new_session=True)
    deadline = time.monotonic() + timeout
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    while time.monotonic() < deadline:
        if sel.select(timeout=1):
            line = proc.stdout.readline()
            if line.startswith("READY "):
                return proc, json.loads(line.split(" ", 1)[1])
            if not line and proc.poll() is not None:
                break
    proc.kill()
    proc.wait()
    raise RuntimeError(f"client process did not get ready (exit {proc.poll()})")
