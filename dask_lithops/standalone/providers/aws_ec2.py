"""EC2 provider: the VMs of StandaloneCluster(backend="aws_ec2").

As a :class:`~.base.HostProvider` it acquires VMs (``exec_mode``: ``create``
new ones, ``reuse`` this user's stopped ones and create the shortfall, or
``consume`` one existing ``instance_id``), waits until they run and answer SSH
(replacing, a bounded number of times, those that never do, and terminating
their remains), keeps their keepers fed with heartbeats
(:mod:`~dask_lithops.standalone.heartbeat`) and releases them: terminated
(``create``) or stopped (``reuse``, ``delete_on_dismantle=False``); a consumed
VM is left as it was.

Its vocabulary is EC2's: ``create``, ``start``, ``stop``, ``terminate``,
``list`` (blocking boto3 code, run through ``asyncio.to_thread``).  It
uses Lithops' ``aws_ec2`` keys (``region``, ``worker_instance_type``,
``target_ami``, ``ssh_username``, ``ssh_key_name``/``ssh_key_filename``,
``request_spot_instances``, ``vpc_id``, ``public_subnet_id``,
``security_group_id``, ``instance_role``, ``delete_on_dismantle``,
``endpoint_url``, ...) and the ``standalone`` keys (``exec_mode``,
``soft_dismantle_timeout``, ``hard_dismantle_timeout``).

What it makes, every resource tagged ``dask-lithops=true`` and
``dask-lithops-cluster=<id>``:

* a key pair (ed25519, generated here, private key kept 0600 in
  ``ssh_key_filename``) -- reused by later clusters;
* an SSH host key for the VMs (``<ssh_key_filename>.hostkey``), installed by
  the user data, so the client checks each VM's identity on first contact
  (no trust-on-first-use);
* a security group whose ingress allows SSH only from the client's address and
  every port only from members of the group itself -- reused;
* the instances.  Their user data authorizes the key, installs the host key and
  starts the dismantle keeper (:mod:`dask_lithops.standalone.keeper`) now and on
  every boot (cloud-init's per-boot scripts).
"""

from __future__ import annotations

import asyncio
import base64
import getpass
import gzip
import hashlib
import ipaddress
import json
import logging
import os
import socket
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import ClassVar

from dask_lithops import config

from .base import HostProvider, HostSpec

logger = logging.getLogger(__name__)

TAG = "dask-lithops"
TAG_CLUSTER = "dask-lithops-cluster"
TAG_USER = "dask-lithops-user"
TAG_RUNTIME = "dask-lithops-runtime"
TAG_MODE = "dask-lithops-exec-mode"
TAG_KEY = "dask-lithops-key"
EXEC_MODES = ("create", "reuse", "consume")
LIVE_STATES = ("pending", "running", "stopping", "stopped")
# Errors that mean "AWS cannot give you this now": reported as EC2CapacityError.
CAPACITY_ERRORS = {
    "InsufficientInstanceCapacity": "AWS has no capacity for this instance type in this "
                                    "availability zone right now",
    "InsufficientCapacity": "AWS has no capacity for this request right now",
    "InstanceLimitExceeded": "your account's instance limit for this type is reached",
    "VcpuLimitExceeded": "your account's vCPU limit (service quota) is reached",
    "MaxSpotInstanceCountExceeded": "your account's spot instance limit is reached",
    "SpotMaxPriceTooLow": "the spot price is above your maximum",
    "InsufficientFreeAddressesInSubnet": "the subnet has no free IP addresses",
    "InsufficientHostCapacity": "no dedicated host capacity",
    "Unsupported": "the instance type is not offered in this availability zone",
}
EC2_KEYS = ("region", "instance_role", "worker_instance_type", "master_instance_type",
            "target_ami", "ssh_username", "ssh_key_name", "ssh_key_filename",
            "request_spot_instances", "vpc_id", "public_subnet_id", "security_group_id",
            "delete_on_dismantle", "max_workers", "worker_processes", "instance_id",
            "endpoint_url", "associate_public_ip", "n_vms")
STANDALONE_KEYS = ("exec_mode", "soft_dismantle_timeout", "hard_dismantle_timeout",
                   "start_timeout", "start_retries")
UBUNTU_OWNER = "099720109477"
UBUNTU_NAME = "ubuntu/images/hvm-ssd*/ubuntu-jammy-22.04-{arch}-server-*"


class EC2Error(RuntimeError):
    """An EC2 operation failed; the message says which and why."""


class EC2CapacityError(EC2Error):
    """AWS refused to create instances for capacity or quota reasons."""


class VMUnreachableError(EC2Error):
    """A VM never became reachable over SSH."""


@dataclass
class VM:
    instance_id: str
    state: str
    instance_type: str | None = None
    private_ip: str | None = None
    public_ip: str | None = None
    image_id: str | None = None
    tags: dict = field(default_factory=dict)
    launch_time: object = None

    @property
    def address(self) -> str | None:
        """Where the client reaches it: its public address, else its private one."""
        return self.public_ip or self.private_ip

    @classmethod
    def from_api(cls, d: dict) -> VM:
        return cls(d["InstanceId"], d["State"]["Name"], d.get("InstanceType"),
                   d.get("PrivateIpAddress"), d.get("PublicIpAddress"), d.get("ImageId"),
                   {t["Key"]: t["Value"] for t in d.get("Tags", [])}, d.get("LaunchTime"))


def _tags(resource: str, tags: dict) -> list[dict]:
    return [{"ResourceType": resource, "Tags": [{"Key": k, "Value": str(v)}
                                                 for k, v in tags.items()]}]


def _error_code(e: Exception) -> str | None:
    return getattr(e, "response", {}).get("Error", {}).get("Code")


def describe_client_error(e: Exception, what: str) -> EC2Error:
    """A clear EC2Error (EC2CapacityError for capacity/limit codes) for a boto3 error."""
    code = _error_code(e)
    message = getattr(e, "response", {}).get("Error", {}).get("Message", str(e))
    if code in CAPACITY_ERRORS:
        return EC2CapacityError(
            f"{what}: {CAPACITY_ERRORS[code]} ({code}: {message}). Try another "
            "worker_instance_type, region or subnet, fewer VMs, or request a quota increase.")
    return EC2Error(f"{what}: {code or type(e).__name__}: {message}")


def _credentials_hint(e: Exception) -> EC2Error:
    return EC2Error(f"AWS credentials are missing or invalid ({e}); configure them the boto3 "
                    "way (env AWS_ACCESS_KEY_ID/..., ~/.aws/credentials or a role)")


class EC2Provider(HostProvider):
    """The VMs of one cluster (``cluster_id``) with the resolved ``aws_ec2`` + ``standalone`` options.

    ``ssh``: the resolved ``lithops.ssh`` options (connect timeout; for
    ``consume``, the known_hosts file and trust policy for the existing VM).
    """

    name: ClassVar[str] = "aws_ec2"
    name_prefix: ClassVar[str] = "ec2"
    keywords: ClassVar[tuple[str, ...]] = EC2_KEYS + STANDALONE_KEYS

    def __init__(self, options: dict, cluster_id: str = "", runtime: str = "default",
                 client_cidr: str | None = None, ssh: dict | None = None):
        self.o = dict(options)
        self.cluster_id = cluster_id
        self.runtime = runtime
        self.ssh = dict(ssh or {})
        self.exec_mode = self.o.get("exec_mode") or "create"
        # reuse keeps VMs (stopped); consume never deletes what it did not create
        self.delete_on_dismantle = bool(self.o.get("delete_on_dismantle")) and \
            self.exec_mode == "create"
        self.initial = 1 if self.exec_mode == "consume" else int(self.o.get("n_vms") or 1)
        self.maximum = 1 if self.exec_mode == "consume" else int(self.o.get("max_workers") or 1)
        self.worker_processes = self.o.get("worker_processes")
        self.vms: list[VM] = []        # the VMs held (acquired, not released)
        self.master_ids: list[str] = []  # ... of which the scheduler's own (not workers)
        self.owned: list[str] = []     # instances this cluster created or started
        self.known_hosts: str | None = None  # next to the key, once set up
        self.start_times: dict[str, float] = {}
        self._heartbeat = None
        self._set_up = False
        self._lock = None  # async: one worker acquisition at a time (max_workers accounting)
        self._mutex = threading.Lock()  # the lists above, shared with the master's thread
        self.user = getpass.getuser()
        self._client = None
        self._client_cidr = client_cidr
        self.key_name: str | None = None
        self.key_filename: str | None = None
        self.public_key: str | None = None
        self.host_key_private: str | None = None
        self.host_key_public: str | None = None
        self.subnet_id: str | None = None
        self.vpc_id: str | None = None
        self.security_group_id: str | None = None
        self.created: list[str] = []  # instance ids this cluster created

    # -- client ------------------------------------------------------------------------------
    @property
    def region(self) -> str:
        return (self.o.get("region") or os.environ.get("AWS_REGION")
                or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")

    @property
    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.session.Session().client(
                "ec2", region_name=self.region, endpoint_url=self.o.get("endpoint_url"),
                config=Config(retries={"max_attempts": 5, "mode": "standard"}))
        return self._client

    def call(self, what: str, fn, **kwargs):
        from botocore.exceptions import ClientError, NoCredentialsError

        try:
            return fn(**kwargs)
        except NoCredentialsError as e:
            raise _credentials_hint(e) from None
        except ClientError as e:
            raise describe_client_error(e, what) from None

    def base_tags(self) -> dict:
        return {TAG: "true", TAG_CLUSTER: self.cluster_id, TAG_USER: self.user}

    # -- network, keys, security group ---------------------------------------------------------
    def setup(self) -> None:
        """Subnet, key pair and security group (created or reused); idempotent."""
        self.ensure_network()
        self.ensure_key_pair()
        self.ensure_security_group()

    def ensure_network(self) -> tuple[str, str]:
        subnet = self.o.get("public_subnet_id")
        if subnet:
            d = self.call("DescribeSubnets", self.client.describe_subnets,
                          SubnetIds=[subnet])["Subnets"][0]
            if self.o.get("vpc_id") and d["VpcId"] != self.o["vpc_id"]:
                raise EC2Error(f"public_subnet_id {subnet} is in {d['VpcId']}, not in vpc_id "
                               f"{self.o['vpc_id']}")
            self.subnet_id, self.vpc_id = subnet, d["VpcId"]
            return self.vpc_id, self.subnet_id
        filters = [{"Name": "vpc-id", "Values": [self.o["vpc_id"]]}] if self.o.get("vpc_id") \
            else [{"Name": "default-for-az", "Values": ["true"]}]
        subnets = self.call("DescribeSubnets", self.client.describe_subnets,
                            Filters=filters)["Subnets"]
        if not subnets:
            raise EC2Error("no subnet to launch into: give public_subnet_id (and vpc_id), or "
                           "create a default VPC in region " + self.region)
        subnets.sort(key=lambda s: (-s.get("AvailableIpAddressCount", 0), s["SubnetId"]))
        self.subnet_id, self.vpc_id = subnets[0]["SubnetId"], subnets[0]["VpcId"]
        return self.vpc_id, self.subnet_id

    def _key_paths(self) -> tuple[str, str]:
        name = self.o.get("ssh_key_name") or f"dask-lithops-{self.user}-" + hashlib.sha256(
            f"{self.user}@{socket.gethostname()}".encode()).hexdigest()[:8]
        path = self.o.get("ssh_key_filename") or os.path.join(
            os.path.expanduser("~/.dask-lithops/ec2"), f"{name}.{self.region}.id_ed25519")
        return name, os.path.expanduser(path)

    def ensure_key_pair(self) -> str:
        """Key pair ``ssh_key_name`` with its private key in ``ssh_key_filename``.

        Both unset or the file missing: an ed25519 key is generated, imported
        (tagged) and kept 0600.  The VMs' host key is kept next to it.
        """
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519

        name, path = self._key_paths()
        existing = self.call("DescribeKeyPairs", self.client.describe_key_pairs,
                             Filters=[{"Name": "key-name", "Values": [name]}])["KeyPairs"]
        generated = False
        if os.path.exists(path):
            with open(path, "rb") as f:
                key = serialization.load_ssh_private_key(f.read(), password=None)
        elif existing and self.o.get("ssh_key_name"):
            raise EC2Error(f"key pair {name} exists but its private key file {path} does not; "
                           "give ssh_key_filename")
        else:
            key, generated = ed25519.Ed25519PrivateKey.generate(), True
            os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                               serialization.PublicFormat.OpenSSH).decode()
        if existing and generated:  # our old key pair, whose private key is lost: replace it
            self.call("DeleteKeyPair", self.client.delete_key_pair, KeyName=name)
        if not existing or generated:
            self.call("ImportKeyPair", self.client.import_key_pair, KeyName=name,
                      PublicKeyMaterial=public.encode(),
                      TagSpecifications=_tags("key-pair", {TAG: "true", TAG_USER: self.user,
                                                           TAG_CLUSTER: self.cluster_id}))
        if not os.path.exists(path + ".pub"):
            with open(path + ".pub", "w") as f:
                f.write(public + "\n")
        self.key_name, self.key_filename, self.public_key = name, path, public
        self._ensure_host_key(path + ".hostkey")
        return name

    def _ensure_host_key(self, path: str) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519

        if os.path.exists(path):
            with open(path, "rb") as f:
                pem = f.read()
            key = serialization.load_ssh_private_key(pem, password=None)
        else:
            key = ed25519.Ed25519PrivateKey.generate()
            pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption())
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
        self.host_key_private = pem.decode()
        self.host_key_public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()

    def client_cidr(self) -> str:
        """The client's address as the VMs see it, /32 (SSH is allowed from there only)."""
        if self._client_cidr:
            return self._client_cidr
        endpoint = self.o.get("endpoint_url")
        if endpoint:  # a private endpoint (tests, LocalStack): the address routing to it
            u = urllib.parse.urlsplit(endpoint)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((u.hostname, u.port or 80))
                ip = s.getsockname()[0]
        else:
            ip = urllib.request.urlopen("https://checkip.amazonaws.com",
                                        timeout=10).read().decode().strip()
        self._client_cidr = str(ipaddress.ip_network(f"{ip}/32"))
        return self._client_cidr

    def ensure_security_group(self) -> str:
        if self.o.get("security_group_id"):
            self.security_group_id = self.o["security_group_id"]
            return self.security_group_id
        name = f"dask-lithops-{self.vpc_id}"
        found = self.call("DescribeSecurityGroups", self.client.describe_security_groups,
                          Filters=[{"Name": "group-name", "Values": [name]},
                                   {"Name": "vpc-id", "Values": [self.vpc_id]}])
        if found["SecurityGroups"]:
            sg = found["SecurityGroups"][0]
            gid = sg["GroupId"]
            perms = sg.get("IpPermissions", [])
        else:
            gid = self.call("CreateSecurityGroup", self.client.create_security_group,
                            GroupName=name, VpcId=self.vpc_id,
                            Description="dask-lithops: SSH from clients, Dask inside the group",
                            TagSpecifications=_tags("security-group", {
                                TAG: "true", TAG_USER: self.user,
                                TAG_CLUSTER: self.cluster_id}))["GroupId"]
            perms = []
        cidr = self.client_cidr()
        want = []
        if not any(p.get("FromPort") == 22 and any(r.get("CidrIp") == cidr
                                                    for r in p.get("IpRanges", []))
                   for p in perms):
            want.append({"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
                         "IpRanges": [{"CidrIp": cidr, "Description": "dask-lithops client"}]})
        if not any(any(g.get("GroupId") == gid for g in p.get("UserIdGroupPairs", []))
                   for p in perms):
            want.append({"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": gid}]})
        if want:
            try:
                self.client.authorize_security_group_ingress(GroupId=gid, IpPermissions=want)
            except Exception as e:
                if _error_code(e) != "InvalidPermission.Duplicate":
                    raise describe_client_error(e, "AuthorizeSecurityGroupIngress") from None
        self.security_group_id = gid
        return gid

    # -- user data ---------------------------------------------------------------------------
    def keeper_config(self, delete_on_dismantle: bool) -> dict:
        return {"soft_dismantle_timeout": float(self.o["soft_dismantle_timeout"]),
                "hard_dismantle_timeout": float(self.o["hard_dismantle_timeout"]),
                "delete_on_dismantle": bool(delete_on_dismantle), "region": self.region,
                "endpoint_url": self.o.get("endpoint_url"),
                "heartbeat_file": "__HOME__/.dask-lithops/keeper/heartbeat"}

    def user_data(self, delete_on_dismantle: bool) -> str:
        """Shell user data: authorize the key, install the host key, start the keeper.

        ``DASK_LITHOPS_VM_ROOT``/``DASK_LITHOPS_VM_HOME`` are unset on a real VM;
        the test world's VM booter sets them to the namespace host's directory.
        """
        from dask_lithops.standalone import keeper

        with open(keeper.__file__, "rb") as f:
            keeper_b64 = base64.b64encode(gzip.compress(f.read(), 9)).decode()
        user = self.o.get("ssh_username") or "ubuntu"
        cfg = json.dumps(self.keeper_config(delete_on_dismantle))
        return f"""#!/bin/sh
# dask-lithops VM bootstrap: authorize the client's key, install the client-chosen
# SSH host key, start the dismantle keeper (now and on every boot).
set -u
R="${{DASK_LITHOPS_VM_ROOT:-}}"
U='{user}'
H="${{DASK_LITHOPS_VM_HOME:-$(getent passwd "$U" | cut -d: -f6)}}"
umask 077
mkdir -p "$H/.ssh" "$H/.dask-lithops/keeper" "$R/etc/ssh" "$R/etc/dask-lithops" \\
    "$R/opt/dask-lithops" "$R/var/lib/cloud/scripts/per-boot" "$R/var/log"
grep -qF '{self.public_key}' "$H/.ssh/authorized_keys" 2>/dev/null || \\
    echo '{self.public_key}' >> "$H/.ssh/authorized_keys"
cat > "$R/etc/ssh/ssh_host_ed25519_key" <<'DLHOSTKEY'
{self.host_key_private.strip()}
DLHOSTKEY
echo '{self.host_key_public}' > "$R/etc/ssh/ssh_host_ed25519_key.pub"
chmod 600 "$R/etc/ssh/ssh_host_ed25519_key"
if [ -z "$R" ]; then
    chown -R "$U:" "$H/.ssh" "$H/.dask-lithops"
    systemctl restart ssh 2>/dev/null || systemctl restart sshd 2>/dev/null || \\
        service ssh restart 2>/dev/null || true
fi
PY=$(command -v python3 || command -v python)
"$PY" -c 'import base64,gzip,sys; sys.stdout.buffer.write(gzip.decompress(base64.b64decode(sys.argv[1])))' \\
    '{keeper_b64}' > "$R/opt/dask-lithops/keeper.py"
cat > "$R/etc/dask-lithops/keeper.json" <<'DLCONFIG'
{cfg}
DLCONFIG
sed -i "s#__HOME__#$H#" "$R/etc/dask-lithops/keeper.json"
cat > "$R/var/lib/cloud/scripts/per-boot/dask-lithops-keeper.sh" <<'DLBOOT'
#!/bin/sh
R="${{DASK_LITHOPS_VM_ROOT:-}}"
PY=$(command -v python3 || command -v python)
nohup "$PY" "$R/opt/dask-lithops/keeper.py" --config "$R/etc/dask-lithops/keeper.json" \\
    --root "$R" >> "$R/var/log/dask-lithops-keeper.log" 2>&1 < /dev/null &
DLBOOT
chmod 700 "$R/var/lib/cloud/scripts/per-boot/dask-lithops-keeper.sh"
"$R/var/lib/cloud/scripts/per-boot/dask-lithops-keeper.sh"
"""

    # -- instances ---------------------------------------------------------------------------
    def image_id(self) -> str:
        if self.o.get("target_ami"):
            return self.o["target_ami"]
        arch = "arm64" if str(self.o.get("worker_instance_type", "")).split(".")[0].endswith(
            "g") else "amd64"
        images = self.call("DescribeImages", self.client.describe_images,
                           Owners=[UBUNTU_OWNER],
                           Filters=[{"Name": "name", "Values": [UBUNTU_NAME.format(arch=arch)]},
                                    {"Name": "state", "Values": ["available"]}])["Images"]
        if not images:
            raise EC2Error(f"no Ubuntu 22.04 image found in {self.region}; give target_ami")
        self.o["target_ami"] = max(images, key=lambda i: i.get("CreationDate", ""))["ImageId"]
        return self.o["target_ami"]

    def instance_tags(self, mode: str, role: str = "worker") -> dict:
        return {**self.base_tags(), TAG_RUNTIME: self.runtime, TAG_MODE: mode,
                TAG_KEY: self.key_name, "dask-lithops-role": role,
                "Name": f"dask-lithops-{role}-{self.cluster_id}"}

    def create(self, n: int, instance_type: str, mode: str,
               delete_on_dismantle: bool, role: str = "worker") -> list[VM]:
        """Launch ``n`` instances in one request (AWS creates them in parallel)."""
        if n <= 0:
            return []
        kwargs = dict(
            ImageId=self.image_id(), InstanceType=instance_type, MinCount=n, MaxCount=n,
            KeyName=self.key_name, UserData=self.user_data(delete_on_dismantle),
            InstanceInitiatedShutdownBehavior="terminate" if delete_on_dismantle else "stop",
            NetworkInterfaces=[{
                "DeviceIndex": 0, "SubnetId": self.subnet_id,
                "Groups": [self.security_group_id],
                "AssociatePublicIpAddress": bool(self.o.get("associate_public_ip")),
                "DeleteOnTermination": True}],
            TagSpecifications=_tags("instance", self.instance_tags(mode, role))
            + _tags("volume", self.base_tags()),
        )
        if self.o.get("instance_role"):
            kwargs["IamInstanceProfile"] = {"Name": self.o["instance_role"]}
        if self.o.get("request_spot_instances"):
            kwargs["InstanceMarketOptions"] = {
                "MarketType": "spot", "SpotOptions": {
                    "SpotInstanceType": "one-time",
                    "InstanceInterruptionBehavior": "terminate"}}
        what = f"RunInstances ({n} x {instance_type} in {self.region}, subnet {self.subnet_id})"
        r = self.call(what, self.client.run_instances, **kwargs)
        vms = [VM.from_api(i) for i in r["Instances"]]
        self.created += [v.instance_id for v in vms]
        logger.info("created %s", [v.instance_id for v in vms])
        return vms

    def describe(self, ids: list[str] | None = None, filters: list[dict] | None = None) -> list[VM]:
        kwargs = {}
        if ids:
            kwargs["InstanceIds"] = list(ids)
        if filters:
            kwargs["Filters"] = filters
        out = []
        paginator = self.client.get_paginator("describe_instances")
        try:
            for page in paginator.paginate(**kwargs):
                for res in page["Reservations"]:
                    out += [VM.from_api(i) for i in res["Instances"]]
        except Exception as e:
            if _error_code(e):
                raise describe_client_error(e, "DescribeInstances") from None
            raise
        return out

    def reusable(self, instance_type: str, role: str = "worker") -> list[VM]:
        """This user's stopped VMs of this type, role, runtime and key, oldest first."""
        vms = self.describe(filters=[
            {"Name": "tag:dask-lithops-role", "Values": [role]},
            {"Name": f"tag:{TAG}", "Values": ["true"]},
            {"Name": f"tag:{TAG_USER}", "Values": [self.user]},
            {"Name": f"tag:{TAG_RUNTIME}", "Values": [self.runtime]},
            {"Name": f"tag:{TAG_KEY}", "Values": [self.key_name]},
            {"Name": f"tag:{TAG_MODE}", "Values": ["reuse"]},
            {"Name": "instance-type", "Values": [instance_type]},
            {"Name": "image-id", "Values": [self.image_id()]},
            {"Name": "instance-state-name", "Values": ["stopped"]}])
        return sorted(vms, key=lambda v: (str(v.launch_time), v.instance_id))

    def claim(self, ids: list[str]) -> None:
        """Tag reused VMs with this cluster's id."""
        if ids:
            self.call("CreateTags", self.client.create_tags, Resources=list(ids),
                      Tags=[{"Key": TAG_CLUSTER, "Value": self.cluster_id}])

    def start(self, ids: list[str]) -> None:
        if ids:
            self.call(f"StartInstances {ids}", self.client.start_instances, InstanceIds=list(ids))

    def stop(self, ids: list[str]) -> None:
        if ids:
            self.call(f"StopInstances {ids}", self.client.stop_instances, InstanceIds=list(ids))

    def terminate(self, ids: list[str]) -> None:
        if ids:
            self.call(f"TerminateInstances {ids}", self.client.terminate_instances,
                      InstanceIds=list(ids))

    def wait_state(self, ids: list[str], states: tuple[str, ...], timeout: float,
                   interval: float = 0.5) -> list[VM]:
        """Poll until every instance is in one of ``states``; raise naming the laggards."""
        deadline = time.monotonic() + timeout
        while True:
            vms = self.describe(ids)
            if all(v.state in states for v in vms):
                return vms
            if any(v.state == "terminated" for v in vms) and "terminated" not in states:
                gone = [v.instance_id for v in vms if v.state == "terminated"]
                raise EC2Error(f"instances {gone} were terminated while waiting for {states} "
                               "(spot interruption, capacity or a failed boot)")
            if time.monotonic() > deadline:
                late = {v.instance_id: v.state for v in vms if v.state not in states}
                raise EC2Error(f"instances not {'/'.join(states)} after {timeout}s: {late}")
            time.sleep(interval)

    def list(self, cluster_id: str | None = None, states=LIVE_STATES) -> list[VM]:
        filters = [{"Name": f"tag:{TAG}", "Values": ["true"]}]
        if cluster_id:
            filters.append({"Name": f"tag:{TAG_CLUSTER}", "Values": [cluster_id]})
        if states:
            filters.append({"Name": "instance-state-name", "Values": list(states)})
        return self.describe(filters=filters)

    def tagged_key_pairs(self) -> list[dict]:
        return self.call("DescribeKeyPairs", self.client.describe_key_pairs,
                         Filters=[{"Name": f"tag:{TAG}", "Values": ["true"]}])["KeyPairs"]

    def tagged_security_groups(self) -> list[dict]:
        return self.call("DescribeSecurityGroups", self.client.describe_security_groups,
                         Filters=[{"Name": f"tag:{TAG}", "Values": ["true"]}])["SecurityGroups"]

    def clean(self, all_users: bool = False, timeout: float = 300.0) -> dict:
        """Terminate every tagged instance; delete tagged key pairs and security groups."""
        vms = [v for v in self.list(states=LIVE_STATES)
               if all_users or v.tags.get(TAG_USER) == self.user]
        ids = [v.instance_id for v in vms]
        self.terminate(ids)
        if ids:
            self.wait_state(ids, ("terminated",), timeout)
        keys = [k for k in self.tagged_key_pairs()
                if all_users or {t["Key"]: t["Value"] for t in k.get("Tags", [])}.get(
                    TAG_USER) == self.user]
        for k in keys:
            self.call("DeleteKeyPair", self.client.delete_key_pair, KeyName=k["KeyName"])
        groups = [g for g in self.tagged_security_groups()
                  if all_users or {t["Key"]: t["Value"] for t in g.get("Tags", [])}.get(
                      TAG_USER) == self.user]
        deleted_groups = []
        for g in groups:
            for attempt in range(30):  # ENIs of just-terminated instances linger a little
                try:
                    self.client.delete_security_group(GroupId=g["GroupId"])
                    deleted_groups.append(g["GroupId"])
                    break
                except Exception as e:
                    if _error_code(e) != "DependencyViolation" or attempt == 29:
                        raise describe_client_error(e, f"DeleteSecurityGroup {g['GroupId']}") \
                            from None
                    time.sleep(2)
        return {"instances": ids, "key_pairs": [k["KeyName"] for k in keys],
                "security_groups": deleted_groups}

    # -- HostProvider: options -----------------------------------------------------------------
    @classmethod
    def from_keywords(cls, ssh: dict, exec_mode: str | None = None, n_vms: int | None = None,
                      soft_dismantle_timeout: float | None = None,
                      hard_dismantle_timeout: float | None = None,
                      start_timeout: float | None = None, start_retries: int | None = None,
                      **ec2_keywords) -> EC2Provider:
        """Resolve and validate ``lithops.aws_ec2`` / ``lithops.standalone`` (no API call)."""
        ec2 = config.section("aws_ec2", n_vms=n_vms, **ec2_keywords)
        sa = config.section("standalone", exec_mode=exec_mode,
                            soft_dismantle_timeout=soft_dismantle_timeout,
                            hard_dismantle_timeout=hard_dismantle_timeout,
                            start_timeout=start_timeout, start_retries=start_retries)
        mode = sa["exec_mode"]
        if mode not in EXEC_MODES:
            raise config.ConfigError(f"lithops.standalone.exec_mode = {mode!r} is invalid; "
                                     f"allowed: {', '.join(EXEC_MODES)}")
        if mode == "consume":
            if not ec2["instance_id"]:
                raise config.ConfigError("exec_mode 'consume' needs lithops.aws_ec2.instance_id "
                                         "(the VM to run on)")
            ec2["n_vms"] = 1
        n = int(ec2["n_vms"])
        if not 1 <= n <= int(ec2["max_workers"]):
            raise config.ConfigError(f"n_vms = {n!r} is invalid; allowed: 1..max_workers "
                                     f"({ec2['max_workers']})")
        if float(sa["soft_dismantle_timeout"]) > float(sa["hard_dismantle_timeout"]):
            raise config.ConfigError("lithops.standalone.soft_dismantle_timeout must not exceed "
                                     "hard_dismantle_timeout")
        return cls({**ec2, **sa}, ssh=ssh)

    # -- HostProvider: acquire, release, close ---------------------------------------------------
    def _provider_lock(self):
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    async def acquire(self, n: int) -> list[HostSpec]:
        async with self._provider_lock():
            t0 = time.monotonic()
            vms = await asyncio.to_thread(self._acquire, n)
            self.start_times.setdefault("vms_ready", time.monotonic() - t0)
            return [self.host_spec(v) for v in vms]

    async def acquire_scheduler_host(self) -> HostSpec | None:
        """A VM of ``master_instance_type`` for the scheduler (none in consume mode).

        Not under the acquisition lock (the master does not count against
        ``max_workers``), so it can start while the worker VMs do.
        """
        if self.exec_mode == "consume":
            return None
        vms = await asyncio.to_thread(self._acquire, 1, "master")
        return self.host_spec(vms[0]) if vms else None

    async def release(self, hosts: list[HostSpec]) -> None:
        ids = [h.id for h in hosts if h.id]
        async with self._provider_lock():
            await asyncio.to_thread(self._release, ids)

    async def close(self) -> None:
        async with self._provider_lock():
            await asyncio.to_thread(self._release, [v.instance_id for v in self.vms] +
                                    list(self.owned), final=True)

    def summary(self) -> str:
        vms = ", ".join(f"{v.instance_id}@{v.address}" for v in self.vms) or "none yet"
        return f"exec_mode={self.exec_mode!r}, vms=[{vms}]"

    def host_spec(self, vm: VM) -> HostSpec:
        ours = self.exec_mode != "consume"  # our VMs: our key, our pinned host key (no TOFU)
        return HostSpec(vm.address, self.o.get("ssh_username") or "ubuntu", 22,
                        key_filename=self.key_filename,
                        known_hosts=self.known_hosts if ours else None,
                        trust_unknown_hosts=False if ours else None, id=vm.instance_id)

    # -- blocking parts ----------------------------------------------------------------------
    def _ensure_set_up(self) -> None:
        from dask_lithops.standalone.heartbeat import Heartbeat

        with self._mutex:
            if self._set_up:
                return
            self.setup()
            if self.exec_mode != "consume":
                self.known_hosts = self.key_filename + ".known_hosts"
            self._heartbeat = Heartbeat(
                self.cluster_id, self.o["soft_dismantle_timeout"],
                self.o["hard_dismantle_timeout"], self.delete_on_dismantle, self._reconnect)
            self._set_up = True

    def _acquire(self, n: int, role: str = "worker") -> list[VM]:
        self._ensure_set_up()
        mine: list[str] = []  # owned by this call: dismantled if it fails
        try:
            vms = self._get_vms(n, mine, role)
        except BaseException:
            self._release(mine)
            raise
        with self._mutex:
            self.vms += vms
            if role == "master":
                self.master_ids += [v.instance_id for v in vms]
            if self.exec_mode != "consume":
                self._heartbeat.start()
        return vms

    def _get_vms(self, n: int, mine: list[str], role: str = "worker") -> list[VM]:
        o = self.o
        itype = o["master_instance_type" if role == "master" else "worker_instance_type"]
        timeout = float(o["start_timeout"])
        if self.exec_mode == "consume":
            if self.vms or n < 1:
                return []  # its one VM is held already
            vm = self.describe([o["instance_id"]])[0]
            if vm.state in ("stopped", "stopping"):
                if vm.state == "stopping":
                    self.wait_state([vm.instance_id], ("stopped",), timeout)
                self.start([vm.instance_id])
            vm = self.wait_state([vm.instance_id], ("running",), timeout)[0]
            self._wait_ssh([vm], timeout)
            return [vm]
        if role == "worker":
            n = min(n, self.maximum - len([v for v in self.vms
                                           if v.instance_id not in self.master_ids]))
        if n < 1:
            return []

        def own(ids):
            with self._mutex:
                self.owned += ids
            mine.extend(ids)

        pending: list[str] = []
        if self.exec_mode == "reuse":
            reuse = [v.instance_id for v in self.reusable(itype, role)[:n]]
            if reuse:
                self.claim(reuse)
                self.start(reuse)
                own(reuse)
                pending += reuse
                logger.info("reusing stopped VMs %s", reuse)
        new = self.create(n - len(pending), itype, self.exec_mode, self.delete_on_dismantle,
                          role)
        own([v.instance_id for v in new])
        pending += [v.instance_id for v in new]
        ready: list[VM] = []
        retries = int(o["start_retries"])
        for attempt in range(retries + 1):
            deadline = time.monotonic() + timeout
            try:
                running = self.wait_state(pending, ("running",), timeout)
            except EC2Error as e:
                running = [v for v in self.describe(pending) if v.state == "running"]
                logger.warning("%s", e)
            failed = [i for i in pending if i not in {v.instance_id for v in running}]
            ok, unreachable = self._wait_ssh(running, max(1.0, deadline - time.monotonic()))
            ready += ok
            failed += [v.instance_id for v in unreachable]
            if not failed:
                return ready
            # the partial resources of a VM that never came up are removed at once
            self.terminate(failed)
            with self._mutex:
                self.owned = [i for i in self.owned if i not in failed]
            mine[:] = [i for i in mine if i not in failed]
            if attempt == retries:
                raise VMUnreachableError(
                    f"VMs {failed} never became reachable over SSH within {timeout}s "
                    f"(start_timeout), after {retries} replacements; terminated them")
            logger.warning("VMs %s never became reachable within %ss: terminated, creating "
                           "%d replacements", failed, timeout, len(failed))
            new = self.create(len(failed), itype, self.exec_mode, self.delete_on_dismantle,
                              role)
            own([v.instance_id for v in new])
            pending = [v.instance_id for v in new]
        return ready

    def _write_known_hosts(self, vms: list[VM]) -> None:
        if self.exec_mode == "consume":
            return
        import fcntl

        kind, key = self.host_key_public.split()[:2]
        with open(self.known_hosts + ".lock", "w") as lock:  # clusters may start at once
            fcntl.flock(lock, fcntl.LOCK_EX)
            lines = []
            if os.path.exists(self.known_hosts):
                with open(self.known_hosts) as f:
                    lines = f.read().splitlines()
            lines += [f"{v.address} {kind} {key}" for v in vms]
            tmp = f"{self.known_hosts}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write("\n".join(dict.fromkeys(lines)) + "\n")
            os.replace(tmp, self.known_hosts)

    def _connect_vm(self, vm: VM, timeout: float):
        from ..ssh_transport import connect, connect_defaults

        spec = self.host_spec(vm)
        kw = spec.connect_kwargs(connect_defaults(self.ssh))
        kw["connect_timeout"] = min(kw["connect_timeout"], max(1.0, timeout))
        return connect(spec, **kw)

    def _reconnect(self, vm_id: str):
        return self._connect_vm(next(v for v in self.vms if v.instance_id == vm_id), 5)

    def _wait_ssh(self, vms: list[VM], timeout: float) -> tuple[list[VM], list[VM]]:
        """Wait (in parallel) until each VM accepts our key; write its first heartbeat."""
        from ..ssh_transport import SSHError

        if not vms:
            return [], []
        self._write_known_hosts(vms)

        def one(vm: VM):
            deadline = time.monotonic() + timeout
            last = None
            while time.monotonic() < deadline:
                try:
                    conn = self._connect_vm(vm, deadline - time.monotonic())
                except SSHError as e:
                    last = e
                    time.sleep(0.5)
                    continue
                self._heartbeat.add(vm.instance_id, conn)
                return True
            logger.warning("VM %s (%s): not reachable: %s", vm.instance_id, vm.address, last)
            return False

        with ThreadPoolExecutor(min(32, len(vms))) as ex:
            results = list(ex.map(one, vms))
        return ([v for v, r in zip(vms, results) if r],
                [v for v, r in zip(vms, results) if not r])

    def _release(self, ids: list[str], final: bool = False) -> None:
        if self._heartbeat is not None:
            if final:
                self._heartbeat.stop()
            else:
                self._heartbeat.remove(ids)
        with self._mutex:
            self.vms = [v for v in self.vms if v.instance_id not in ids]
            self.master_ids = [i for i in self.master_ids if i not in ids]
            mine = [i for i in dict.fromkeys(ids) if i in self.owned]
            self.owned = [i for i in self.owned if i not in mine]
        if not mine:
            return
        if self.delete_on_dismantle:
            self.terminate(mine)
            self.wait_state(mine, ("shutting-down", "terminated"), 120)
        else:
            self.stop(mine)
            self.wait_state(mine, ("stopping", "stopped"), 120)
        logger.info("%s %s", "terminated" if self.delete_on_dismantle else "stopped", mine)
