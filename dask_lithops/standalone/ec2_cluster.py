"""StandaloneCluster(backend="aws_ec2"): VMs created (or reused) on EC2, bootstrapped over SSH.

The EC2 part is a front stage to the SSH standalone cluster: on start it gets
the VMs (``exec_mode``: ``create`` new ones, ``reuse`` this user's stopped ones
and create the shortfall, or ``consume`` one existing ``instance_id``), waits
until they run and answer SSH (replacing, a bounded number of times, those
that never do, and terminating their remains), then hands their addresses to
:class:`~dask_lithops.standalone.cluster.StandaloneCluster`, which prepares
the runtime and runs the scheduler and worker groups exactly as for SSH hosts.

While the cluster lives it refreshes a heartbeat file on every VM; the keeper
on the VM (:mod:`dask_lithops.standalone.keeper`, started by the user data)
dismantles its VM ``soft_dismantle_timeout`` after the last heartbeat and
always ``hard_dismantle_timeout`` after boot.  ``close()`` terminates created
VMs (or stops them: ``reuse``, or ``delete_on_dismantle=False``) itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar

from dask_lithops import config

from .cluster import StandaloneCluster
from .providers.aws_ec2 import EXEC_MODES, VM, EC2Error, EC2Provider, VMUnreachableError
from .providers.ssh import HostSpec, SSHError, connect

logger = logging.getLogger(__name__)

HEARTBEAT = '"$HOME/.dask-lithops/keeper/heartbeat"'
HEARTBEAT_CMD = (f'mkdir -p "$HOME/.dask-lithops/keeper" && cat > {HEARTBEAT[:-1]}.tmp" && '
                 f'mv -f {HEARTBEAT[:-1]}.tmp" {HEARTBEAT}')

EC2_KEYS = ("region", "instance_role", "worker_instance_type", "master_instance_type",
            "target_ami", "ssh_username", "ssh_key_name", "ssh_key_filename",
            "request_spot_instances", "vpc_id", "public_subnet_id", "security_group_id",
            "delete_on_dismantle", "max_workers", "worker_processes", "instance_id",
            "endpoint_url", "associate_public_ip", "n_vms")
STANDALONE_KEYS = ("exec_mode", "soft_dismantle_timeout", "hard_dismantle_timeout",
                   "start_timeout", "start_retries")


class EC2Cluster(StandaloneCluster):
    """Dask on EC2 VMs (``StandaloneCluster(backend="aws_ec2", ...)``).

    Parameters (each falls back to ``lithops.aws_ec2.*`` / ``lithops.standalone.*``,
    Lithops' key names)
    ----------
    exec_mode: "create", "reuse" or "consume"
        ``create``: new VMs, terminated on close (stopped when
        ``delete_on_dismantle=False``).  ``reuse``: start this user's stopped
        VMs of the same instance type, image, key and runtime, create only the
        shortfall; stop (never terminate) on close.  ``consume``: the existing
        VM ``instance_id``; started if stopped, left as it is on close.
    n_vms: int
        VMs to run workers on (at most ``max_workers``).
    worker_processes: int or "AUTO"
        Worker processes per VM (AUTO: its cores).
    soft_dismantle_timeout, hard_dismantle_timeout: seconds
        A VM that lost its cluster is dismantled this long after; every VM
        this long after boot.
    start_timeout: seconds
        For a VM to run and answer SSH; one that does not is terminated and
        replaced, at most ``start_retries`` times.
    region, endpoint_url, worker_instance_type, target_ami, ssh_username,
    ssh_key_name, ssh_key_filename, request_spot_instances, vpc_id,
    public_subnet_id, security_group_id, instance_role, associate_public_ip:
        Where and what to launch (see docs/standalone-ec2.md).
    **kwargs:
        Options of the SSH :class:`StandaloneCluster` (``scheduler``,
        ``remote_python``, ``install_runtime``, ...) and of every cluster.
    """

    name_prefix = "ec2"
    backend: ClassVar[str] = "aws_ec2"

    def __init__(self, backend: str | None = "aws_ec2", exec_mode: str | None = None,
                 n_vms: int | None = None, *, soft_dismantle_timeout: float | None = None,
                 hard_dismantle_timeout: float | None = None, start_timeout: float | None = None,
                 start_retries: int | None = None, worker_processes=None, **kwargs):
        if backend not in (None, "aws_ec2"):
            raise config.ConfigError(f"backend = {backend!r} is invalid for EC2Cluster; "
                                     "allowed: aws_ec2")
        ec2_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in EC2_KEYS}
        ec2 = config.section("aws_ec2", n_vms=n_vms, worker_processes=worker_processes,
                             **ec2_kw)
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
        self.exec_mode = mode
        # reuse keeps VMs (stopped); consume never deletes what it did not create
        self.delete_on_dismantle = bool(ec2["delete_on_dismantle"]) and mode == "create"
        self.ec2_options = {**ec2, **sa}
        self.n_vms = n
        self.vms: list[VM] = []
        self.provider: EC2Provider | None = None
        self.start_times: dict[str, float] = {}
        self._owned: list[str] = []   # instances this cluster created or started
        self._known_hosts: str | None = None  # next to the key, once the provider has it
        self._hb_conns: dict[str, object] = {}
        self._hb_stop = threading.Event()
        self._hb_thread: threading.Thread | None = None
        user = ec2["ssh_username"] or "ubuntu"
        ssh_kw = {}
        if mode != "consume":  # our VMs: our key, our host key, checked (no TOFU)
            ssh_kw = {"trust_unknown_hosts": False}
        placeholders = [f"{user}@pending-vm-{i}" for i in range(n)]
        super().__init__(backend="ssh", hosts=placeholders, ssh_username=user,
                         worker_processes=ec2["worker_processes"], **ssh_kw, **kwargs)

    # ------------------------------------------------------------------ VMs
    def _make_provider(self) -> EC2Provider:
        return EC2Provider(self.ec2_options, self.cluster_id, runtime=self._runtime_spec.key)

    async def _prepare_hosts(self) -> None:
        t0 = time.monotonic()
        self.provider = self._make_provider()
        try:
            self.vms = await asyncio.to_thread(self._acquire_vms)
            self.start_times["vms_ready"] = time.monotonic() - t0
            user = self.ssh_options["ssh_username"] or "ubuntu"
            self.host_specs = [HostSpec(v.address, user, 22) for v in self.vms]
            self._start_heartbeat()
            await super()._prepare_hosts()
            self.start_times["hosts_prepared"] = time.monotonic() - t0
        except BaseException:
            await self._dismantle()
            raise

    def _acquire_vms(self) -> list[VM]:
        p, o = self.provider, self.ec2_options
        p.setup()
        self.ssh_options["ssh_key_filename"] = p.key_filename
        if self.exec_mode != "consume":
            self._known_hosts = self.ssh_options["known_hosts"] = p.key_filename + ".known_hosts"
        itype = o["worker_instance_type"]
        timeout = float(o["start_timeout"])
        if self.exec_mode == "consume":
            vm = p.describe([o["instance_id"]])[0]
            if vm.state in ("stopped", "stopping"):
                if vm.state == "stopping":
                    p.wait_state([vm.instance_id], ("stopped",), timeout)
                p.start([vm.instance_id])
            vm = p.wait_state([vm.instance_id], ("running",), timeout)[0]
            self._wait_ssh([vm], timeout)
            return [vm]
        pending: list[str] = []
        if self.exec_mode == "reuse":
            reuse = [v.instance_id for v in p.reusable(itype)[:self.n_vms]]
            if reuse:
                p.claim(reuse)
                p.start(reuse)
                self._owned += reuse
                pending += reuse
                logger.info("reusing stopped VMs %s", reuse)
        new = p.create(self.n_vms - len(pending), itype, self.exec_mode,
                       self.delete_on_dismantle)
        self._owned += [v.instance_id for v in new]
        pending += [v.instance_id for v in new]
        ready: list[VM] = []
        retries = int(o["start_retries"])
        for attempt in range(retries + 1):
            deadline = time.monotonic() + timeout
            try:
                running = p.wait_state(pending, ("running",), timeout)
            except EC2Error as e:
                running = [v for v in p.describe(pending) if v.state == "running"]
                logger.warning("%s", e)
            failed = [i for i in pending if i not in {v.instance_id for v in running}]
            ok, unreachable = self._wait_ssh(running, max(1.0, deadline - time.monotonic()))
            ready += ok
            failed += [v.instance_id for v in unreachable]
            if not failed:
                return ready
            # the partial resources of a VM that never came up are removed at once
            p.terminate(failed)
            self._owned = [i for i in self._owned if i not in failed]
            if attempt == retries:
                raise VMUnreachableError(
                    f"VMs {failed} never became reachable over SSH within {timeout}s "
                    f"(start_timeout), after {retries} replacements; terminated them")
            logger.warning("VMs %s never became reachable within %ss: terminated, creating "
                           "%d replacements", failed, timeout, len(failed))
            new = p.create(len(failed), itype, self.exec_mode, self.delete_on_dismantle)
            self._owned += [v.instance_id for v in new]
            pending = [v.instance_id for v in new]
        return ready

    def _write_known_hosts(self, vms: list[VM]) -> None:
        if self.exec_mode == "consume":
            return
        import fcntl

        kind, key = self.provider.host_key_public.split()[:2]
        with open(self._known_hosts + ".lock", "w") as lock:  # clusters may start at once
            fcntl.flock(lock, fcntl.LOCK_EX)
            lines = []
            if os.path.exists(self._known_hosts):
                with open(self._known_hosts) as f:
                    lines = f.read().splitlines()
            lines += [f"{v.address} {kind} {key}" for v in vms]
            tmp = f"{self._known_hosts}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write("\n".join(dict.fromkeys(lines)) + "\n")
            os.replace(tmp, self._known_hosts)

    def _connect_vm(self, vm: VM, timeout: float):
        user = self.ssh_options["ssh_username"] or "ubuntu"
        kw = self._connect_kwargs()
        kw["connect_timeout"] = min(kw["connect_timeout"], max(1.0, timeout))
        return connect(HostSpec(vm.address, user, 22), **kw)

    def _wait_ssh(self, vms: list[VM], timeout: float) -> tuple[list[VM], list[VM]]:
        """Wait (in parallel) until each VM accepts our key; write its first heartbeat."""
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
                self._heartbeat_one(conn)
                self._hb_conns[vm.instance_id] = conn
                return True
            logger.warning("VM %s (%s): not reachable: %s", vm.instance_id, vm.address, last)
            return False

        with ThreadPoolExecutor(min(32, len(vms))) as ex:
            results = list(ex.map(one, vms))
        return ([v for v, r in zip(vms, results) if r],
                [v for v, r in zip(vms, results) if not r])

    # ------------------------------------------------------------------ heartbeat
    def _heartbeat_payload(self) -> str:
        o = self.ec2_options
        return json.dumps({"cluster": self.cluster_id, "time": time.time(),
                           "soft_dismantle_timeout": float(o["soft_dismantle_timeout"]),
                           "hard_dismantle_timeout": float(o["hard_dismantle_timeout"]),
                           "delete_on_dismantle": self.delete_on_dismantle})

    def _heartbeat_one(self, conn) -> None:
        conn.run(HEARTBEAT_CMD, input=self._heartbeat_payload(), timeout=10)

    @property
    def heartbeat_interval(self) -> float:
        return max(0.5, min(30.0, float(self.ec2_options["soft_dismantle_timeout"]) / 5))

    def _start_heartbeat(self) -> None:
        if self.exec_mode == "consume" or self._hb_thread is not None:
            return

        def loop():
            with ThreadPoolExecutor(8, thread_name_prefix="dask-lithops-heartbeat") as ex:
                while not self._hb_stop.wait(self.heartbeat_interval):
                    conns = list(self._hb_conns.items())

                    def beat(item):
                        iid, conn = item
                        try:
                            if not conn.is_active():
                                vm = next(v for v in self.vms if v.instance_id == iid)
                                conn = self._hb_conns[iid] = self._connect_vm(vm, 5)
                            self._heartbeat_one(conn)
                        except Exception as e:  # the keeper acts if this persists
                            logger.debug("heartbeat to %s failed: %s", iid, e)

                    list(ex.map(beat, conns))

        self._hb_thread = threading.Thread(target=loop, daemon=True,
                                           name=f"dask-lithops-heartbeat-{self.cluster_id}")
        self._hb_thread.start()

    def _stop_heartbeat(self) -> None:
        self._hb_stop.set()
        if self._hb_thread is not None:
            self._hb_thread.join(timeout=30)
            self._hb_thread = None
        conns, self._hb_conns = list(self._hb_conns.values()), {}
        for c in conns:
            try:
                c.close()
            except Exception:
                pass

    # ------------------------------------------------------------------ dismantle
    async def _dismantle(self) -> None:
        await asyncio.to_thread(self._stop_heartbeat)
        owned, self._owned = list(self._owned), []
        if owned and self.provider is not None:
            await asyncio.to_thread(self._dismantle_vms, owned)

    def _dismantle_vms(self, ids: list[str]) -> None:
        p = self.provider
        if self.delete_on_dismantle:
            p.terminate(ids)
            p.wait_state(ids, ("shutting-down", "terminated"), 120)
        else:
            p.stop(ids)
            p.wait_state(ids, ("stopping", "stopped"), 120)
        logger.info("%s %s", "terminated" if self.delete_on_dismantle else "stopped", ids)

    async def _close(self):
        try:
            await super()._close()
        finally:
            await self._dismantle()

    def __repr__(self) -> str:
        vms = ", ".join(f"{v.instance_id}@{v.address}" for v in self.vms) or "none yet"
        return (f"StandaloneCluster(backend='aws_ec2', exec_mode={self.exec_mode!r}, "
                f"{self.scheduler_address!r}, vms=[{vms}], "
                f"workers={len(self.scheduler_info.get('workers', {}))}, "
                f"status={self.status.name})")
