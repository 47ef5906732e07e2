"""The ``aws_ec2`` backend: EC2's calls and config, on the cloud-neutral :class:`~..vm.VMProvider`.

Its vocabulary is EC2's: ``create`` (RunInstances), ``start``, ``stop``,
``terminate``, ``describe``/``list`` (blocking boto3 code; the base runs it in
threads).  It uses Lithops' ``aws_ec2`` keys (``region``,
``worker_instance_type``, ``master_instance_type``, ``target_ami``,
``ssh_username``, ``ssh_key_name``/``ssh_key_filename``,
``request_spot_instances``, ``vpc_id``, ``public_subnet_id``,
``security_group_id``, ``instance_role``, ``delete_on_dismantle``,
``endpoint_url``, ...); the ``standalone`` keys (``exec_mode``, dismantle
timeouts) are the base's.

What it makes, every resource tagged ``dask-lithops=true`` and
``dask-lithops-cluster=<id>``:

* a key pair (the base's client key, imported) -- reused by later clusters;
* a security group whose ingress allows SSH only from the client's address and
  every port only from members of the group itself -- reused;
* the instances, with the base's user data; a VM's keeper dismantles it through
  :mod:`.dismantle` (StopInstances/TerminateInstances on itself, with the
  instance role's credentials).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from typing import ClassVar

from ..vm import LIVE_STATES, VM, VMError, VMProvider, VMUnreachableError

__all__ = ["EC2Provider", "EC2Error", "EC2CapacityError", "VMUnreachableError",
           "describe_client_error", "LIVE_STATES", "TAG", "TAG_CLUSTER", "TAG_USER", "TAG_MODE"]

logger = logging.getLogger(__name__)

TAG = "dask-lithops"
TAG_CLUSTER = "dask-lithops-cluster"
TAG_USER = "dask-lithops-user"
TAG_RUNTIME = "dask-lithops-runtime"
TAG_MODE = "dask-lithops-exec-mode"
TAG_KEY = "dask-lithops-key"
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
UBUNTU_OWNER = "099720109477"
UBUNTU_NAME = "ubuntu/images/hvm-ssd*/ubuntu-jammy-22.04-{arch}-server-*"


class EC2Error(VMError):
    """An EC2 operation failed; the message says which and why."""


class EC2CapacityError(EC2Error):
    """AWS refused to create instances for capacity or quota reasons."""


def _vm(d: dict) -> VM:
    return VM(d["InstanceId"], d["State"]["Name"], d.get("InstanceType"),
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


class EC2Provider(VMProvider):
    """``backend="aws_ec2"``: EC2 VMs with the resolved ``aws_ec2`` + ``standalone`` options."""

    name: ClassVar[str] = "aws_ec2"
    name_prefix: ClassVar[str] = "ec2"
    section: ClassVar[str] = "aws_ec2"
    dismantle_module: ClassVar[str] = "dask_lithops.standalone.providers.aws_ec2.dismantle"
    # TCP ports open to any address (a serverless scheduler's host: functions have no fixed
    # source address); the group is then one of its own, named after the ports
    public_ports: tuple[int, ...] = ()

    def __init__(self, options: dict, cluster_id: str = "", runtime: str = "default",
                 client_cidr: str | None = None, ssh: dict | None = None):
        super().__init__(options, cluster_id, runtime, client_cidr, ssh)
        self._client = None
        self.key_name: str | None = None
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
        """Key pair ``ssh_key_name`` holding the client key in ``ssh_key_filename``.

        Both unset or the file missing: the key is generated
        (:meth:`~..vm.VMProvider.ensure_client_key`) and imported (tagged).
        """
        name, path = self._key_paths()
        existing = self.call("DescribeKeyPairs", self.client.describe_key_pairs,
                             Filters=[{"Name": "key-name", "Values": [name]}])["KeyPairs"]
        if existing and self.o.get("ssh_key_name") and not os.path.exists(path):
            raise EC2Error(f"key pair {name} exists but its private key file {path} does not; "
                           "give ssh_key_filename")
        generated = self.ensure_client_key(path)
        if existing and generated:  # our old key pair, whose private key is lost: replace it
            self.call("DeleteKeyPair", self.client.delete_key_pair, KeyName=name)
        if not existing or generated:
            self.call("ImportKeyPair", self.client.import_key_pair, KeyName=name,
                      PublicKeyMaterial=self.public_key.encode(),
                      TagSpecifications=_tags("key-pair", {TAG: "true", TAG_USER: self.user,
                                                           TAG_CLUSTER: self.cluster_id}))
        self.key_name = name
        return name

    def ensure_security_group(self) -> str:
        if self.o.get("security_group_id"):
            self.security_group_id = self.o["security_group_id"]
            return self.security_group_id
        name = f"dask-lithops-{self.vpc_id}"
        if self.public_ports:  # a group of its own: these ports are open to everyone
            name += "-public-" + "-".join(str(p) for p in self.public_ports)
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
        for port in self.public_ports:
            if not any(p.get("FromPort") == port and any(r.get("CidrIp") == "0.0.0.0/0"
                                                         for r in p.get("IpRanges", []))
                       for p in perms):
                want.append({"IpProtocol": "tcp", "FromPort": port, "ToPort": port,
                             "IpRanges": [{"CidrIp": "0.0.0.0/0", "Description":
                                           "dask-lithops: functions dial in (TLS, relay token)"}]})
        if want:
            try:
                self.client.authorize_security_group_ingress(GroupId=gid, IpPermissions=want)
            except Exception as e:
                if _error_code(e) != "InvalidPermission.Duplicate":
                    raise describe_client_error(e, "AuthorizeSecurityGroupIngress") from None
        self.security_group_id = gid
        return gid

    def keeper_config(self) -> dict:
        """For :func:`.dismantle.dismantle` on the VM."""
        return {"region": self.region, "endpoint_url": self.o.get("endpoint_url")}

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
        vms = [_vm(i) for i in r["Instances"]]
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
                    out += [_vm(i) for i in res["Instances"]]
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

