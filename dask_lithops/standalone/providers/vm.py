"""The cloud-neutral part of every VM backend: :class:`VMProvider`.

A VM backend (``aws_ec2``, ...) is a :class:`VMProvider` subclass that makes
only its cloud's calls -- :meth:`~VMProvider.setup`, :meth:`~VMProvider.create`,
:meth:`~VMProvider.start`, :meth:`~VMProvider.stop`,
:meth:`~VMProvider.terminate`, :meth:`~VMProvider.describe`,
:meth:`~VMProvider.reusable` -- and names the keeper's dismantle call
(:attr:`~VMProvider.dismantle_module`, :meth:`~VMProvider.keeper_config`).
Everything else is here, the same for every cloud:

* ``exec_mode`` (Lithops' ``standalone`` key): ``create`` new VMs, ``reuse``
  this user's stopped ones and create the shortfall, or ``consume`` one
  existing ``instance_id``;
* the client's SSH key (ed25519, generated once, kept 0600) and the VMs' SSH
  host key, which the user data installs and the client pins in a
  known_hosts file next to the key (no trust-on-first-use);
* the user data: authorize the key, install the host key, start the dismantle
  keeper (:mod:`dask_lithops.standalone.keeper`) now and on every boot;
* waiting for VMs to run and answer SSH, replacing (``start_retries`` times)
  those that never do and terminating their remains at once;
* heartbeats (:mod:`dask_lithops.standalone.heartbeat`) while the cluster
  lives, and release: terminate (``create``) or stop (``reuse``,
  ``delete_on_dismantle=False``); a consumed VM is left as it was.

The dismantle contract: the keeper on each VM dismantles it when the cluster's
heartbeat is older than ``soft_dismantle_timeout`` (or ``hard_dismantle_timeout``
after boot), by calling ``dismantle(config, delete, root)`` of the backend's
:attr:`~VMProvider.dismantle_module` -- a standard-library-only module shipped
in the user data, with :meth:`~VMProvider.keeper_config` as ``config``.

Blocking methods (every cloud call) run in threads (``asyncio.to_thread``); the
async :class:`~.base.HostProvider` methods never block the loop.
"""

from __future__ import annotations

import asyncio
import base64
import getpass
import gzip
import importlib
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

LIVE_STATES = ("pending", "running", "stopping", "stopped")
STANDALONE_KEYS = ("exec_mode", "soft_dismantle_timeout", "hard_dismantle_timeout",
                   "start_timeout", "start_retries")


class VMError(RuntimeError):
    """A VM operation failed; the message says which and why."""


class VMUnreachableError(VMError):
    """A VM never became reachable over SSH."""


@dataclass
class VM:
    """One VM as a backend describes it; ``state`` in EC2's vocabulary
    (pending, running, stopping, stopped, shutting-down, terminated)."""

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


class VMProvider(HostProvider):
    """VMs for a StandaloneCluster; a backend adds its cloud's calls.

    ``options``: the resolved backend section and ``standalone`` keys (what
    :meth:`from_keywords` returns); ``ssh``: the resolved ``lithops.ssh``
    options (connect timeout; for ``consume``, known_hosts and trust policy).

    A backend sets :attr:`name`, :attr:`name_prefix`, :attr:`section`,
    :attr:`keywords` and :attr:`dismantle_module`, and implements the methods
    under "a backend implements" (blocking; one cloud call each, mostly).
    """

    section: ClassVar[str] = ""            # its config section (Lithops' name), e.g. "aws_ec2"
    dismantle_module: ClassVar[str] = ""   # module with the keeper's dismantle(config, delete, root)
    default_ssh_username: ClassVar[str] = "ubuntu"
    public_ip_service: ClassVar[str] = "https://checkip.amazonaws.com"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.section:  # StandaloneCluster keywords it takes: its section's keys and standalone's
            keys = config.PACKAGE_DEFAULTS[config.NAMESPACE][cls.section]
            cls.keywords = tuple(keys) + STANDALONE_KEYS

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
        self.user = getpass.getuser()
        self.vms: list[VM] = []          # the VMs held (acquired, not released)
        self.master_ids: list[str] = []  # ... of which the scheduler's own (not workers)
        self.owned: list[str] = []       # instances this cluster created or started
        self.known_hosts: str | None = None  # next to the key, once set up
        self.key_filename: str | None = None
        self.public_key: str | None = None
        self.host_key_private: str | None = None
        self.host_key_public: str | None = None
        self.start_times: dict[str, float] = {}
        self._client_cidr = client_cidr
        self._heartbeat = None
        self._set_up = False
        self._lock = None  # async: one worker acquisition at a time (max_workers accounting)
        self._mutex = threading.Lock()  # the lists above, shared with the master's thread

    # -- a backend implements ------------------------------------------------------------------
    def setup(self) -> None:
        """Network, firewall and the client key (:meth:`ensure_client_key`); idempotent."""
        raise NotImplementedError

    def create(self, n: int, instance_type: str, mode: str, delete_on_dismantle: bool,
               role: str = "worker") -> list[VM]:
        """Launch ``n`` VMs with :meth:`user_data`, tagged with cluster, user, runtime, role."""
        raise NotImplementedError

    def start(self, ids: list[str]) -> None:
        raise NotImplementedError

    def stop(self, ids: list[str]) -> None:
        raise NotImplementedError

    def terminate(self, ids: list[str]) -> None:
        raise NotImplementedError

    def describe(self, ids: list[str]) -> list[VM]:
        """The VMs ``ids`` as they are now."""
        raise NotImplementedError

    def reusable(self, instance_type: str, role: str = "worker") -> list[VM]:
        """This user's stopped VMs of this type, role, runtime and key, oldest first."""
        raise NotImplementedError

    def claim(self, ids: list[str]) -> None:
        """Mark reused VMs as this cluster's (a tag); optional."""

    def keeper_config(self) -> dict:
        """What the keeper's dismantle call needs on the VM (region, endpoint, ...)."""
        return {}

    def instance_type(self, role: str) -> str:
        """The instance type for ``role`` (``worker`` or ``master``)."""
        return self.o["master_instance_type" if role == "master" else "worker_instance_type"]

    @classmethod
    def validate(cls, options: dict) -> None:
        """The backend's rules across keys (the schema checks each key); raise ConfigError."""

    # -- options -------------------------------------------------------------------------------
    @classmethod
    def from_keywords(cls, ssh: dict, exec_mode: str | None = None,
                      soft_dismantle_timeout: float | None = None,
                      hard_dismantle_timeout: float | None = None,
                      start_timeout: float | None = None, start_retries: int | None = None,
                      **backend_keywords) -> VMProvider:
        """Resolve and validate the backend section and ``lithops.standalone`` (no cloud call)."""
        own = config.section(cls.section, **backend_keywords)
        sa = config.section("standalone", exec_mode=exec_mode,
                            soft_dismantle_timeout=soft_dismantle_timeout,
                            hard_dismantle_timeout=hard_dismantle_timeout,
                            start_timeout=start_timeout, start_retries=start_retries)
        sa = {k: sa[k] for k in STANDALONE_KEYS}  # the VM keys; the rest is the cluster's
        if sa["exec_mode"] == "consume":
            if not own.get("instance_id"):
                raise config.ConfigError(f"exec_mode 'consume' needs lithops.{cls.section}."
                                         "instance_id (the VM to run on)")
            own["n_vms"] = 1
        if int(own["n_vms"]) > int(own["max_workers"]):
            raise config.ConfigError(f"n_vms = {own['n_vms']!r} is invalid; allowed: "
                                     f"1..max_workers ({own['max_workers']})")
        if float(sa["soft_dismantle_timeout"]) > float(sa["hard_dismantle_timeout"]):
            raise config.ConfigError("lithops.standalone.soft_dismantle_timeout must not exceed "
                                     "hard_dismantle_timeout")
        cls.validate({**own, **sa})
        return cls({**own, **sa}, ssh=ssh)

    # -- keys --------------------------------------------------------------------------------
    def ensure_client_key(self, path: str) -> bool:
        """Load the client's SSH key from ``path``, or generate one (ed25519, 0600).

        Sets :attr:`key_filename` and :attr:`public_key`; also the VMs' host key
        (``<path>.hostkey``).  Returns whether the key was generated now.
        """
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519

        generated = False
        if os.path.exists(path):
            with open(path, "rb") as f:
                key = serialization.load_ssh_private_key(f.read(), password=None)
        else:
            key, generated = ed25519.Ed25519PrivateKey.generate(), True
            os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
            _write_private(path, key.private_bytes(serialization.Encoding.PEM,
                                                   serialization.PrivateFormat.OpenSSH,
                                                   serialization.NoEncryption()))
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                               serialization.PublicFormat.OpenSSH).decode()
        if not os.path.exists(path + ".pub"):
            with open(path + ".pub", "w") as f:
                f.write(public + "\n")
        self.key_filename, self.public_key = path, public
        self._ensure_host_key(path + ".hostkey")
        return generated

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
            _write_private(path, pem)
        self.host_key_private = pem.decode()
        self.host_key_public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()

    def client_cidr(self) -> str:
        """The client's address as the VMs see it, /32 (for firewall rules)."""
        if self._client_cidr:
            return self._client_cidr
        endpoint = self.o.get("endpoint_url")
        if endpoint:  # a private endpoint (tests, LocalStack): the address routing to it
            u = urllib.parse.urlsplit(endpoint)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((u.hostname, u.port or 80))
                ip = s.getsockname()[0]
        else:
            ip = urllib.request.urlopen(self.public_ip_service,
                                        timeout=10).read().decode().strip()
        self._client_cidr = str(ipaddress.ip_network(f"{ip}/32"))
        return self._client_cidr

    # -- user data ---------------------------------------------------------------------------
    def _keeper_json(self, delete_on_dismantle: bool) -> str:
        return json.dumps({"soft_dismantle_timeout": float(self.o["soft_dismantle_timeout"]),
                           "hard_dismantle_timeout": float(self.o["hard_dismantle_timeout"]),
                           "delete_on_dismantle": bool(delete_on_dismantle),
                           "heartbeat_file": "__HOME__/.dask-lithops/keeper/heartbeat",
                           "cloud": self.keeper_config()})

    def user_data(self, delete_on_dismantle: bool) -> str:
        """Shell user data: authorize the key, install the host key, start the keeper.

        ``DASK_LITHOPS_VM_ROOT``/``DASK_LITHOPS_VM_HOME`` are unset on a real VM;
        the test world's VM booter sets them to the namespace host's directory.
        """
        from dask_lithops.standalone import keeper

        keeper_b64 = _packed(keeper.__file__)
        dismantle_b64 = _packed(importlib.import_module(self.dismantle_module).__file__)
        user = self.o.get("ssh_username") or self.default_ssh_username
        cfg = self._keeper_json(delete_on_dismantle)
        unpack = ("\"$PY\" -c 'import base64,gzip,sys; sys.stdout.buffer.write("
                  "gzip.decompress(base64.b64decode(sys.argv[1])))'")
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
{unpack} '{keeper_b64}' > "$R/opt/dask-lithops/keeper.py"
{unpack} '{dismantle_b64}' > "$R/opt/dask-lithops/dismantle.py"
cat > "$R/etc/dask-lithops/keeper.json" <<'DLCONFIG'
{cfg}
DLCONFIG
sed -i "s#__HOME__#$H#" "$R/etc/dask-lithops/keeper.json"
cat > "$R/var/lib/cloud/scripts/per-boot/dask-lithops-keeper.sh" <<'DLBOOT'
#!/bin/sh
R="${{DASK_LITHOPS_VM_ROOT:-}}"
PY=$(command -v python3 || command -v python)
nohup "$PY" "$R/opt/dask-lithops/keeper.py" --config "$R/etc/dask-lithops/keeper.json" \\
    --dismantle "$R/opt/dask-lithops/dismantle.py" --root "$R" \\
    >> "$R/var/log/dask-lithops-keeper.log" 2>&1 < /dev/null &
DLBOOT
chmod 700 "$R/var/lib/cloud/scripts/per-boot/dask-lithops-keeper.sh"
"$R/var/lib/cloud/scripts/per-boot/dask-lithops-keeper.sh"
"""

    # -- states ------------------------------------------------------------------------------
    def wait_state(self, ids: list[str], states: tuple[str, ...], timeout: float,
                   interval: float = 0.5) -> list[VM]:
        """Poll until every VM is in one of ``states``; raise naming the laggards."""
        deadline = time.monotonic() + timeout
        while True:
            vms = self.describe(ids)
            if all(v.state in states for v in vms):
                return vms
            if any(v.state == "terminated" for v in vms) and "terminated" not in states:
                gone = [v.instance_id for v in vms if v.state == "terminated"]
                raise VMError(f"instances {gone} were terminated while waiting for {states} "
                              "(spot interruption, capacity or a failed boot)")
            if time.monotonic() > deadline:
                late = {v.instance_id: v.state for v in vms if v.state not in states}
                raise VMError(f"instances not {'/'.join(states)} after {timeout}s: {late}")
            time.sleep(interval)

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
        return HostSpec(vm.address, self.o.get("ssh_username") or self.default_ssh_username, 22,
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

    def _consume(self, n: int, timeout: float) -> list[VM]:
        if self.vms or n < 1:
            return []  # its one VM is held already
        vm = self.describe([self.o["instance_id"]])[0]
        if vm.state in ("stopped", "stopping"):
            if vm.state == "stopping":
                self.wait_state([vm.instance_id], ("stopped",), timeout)
            self.start([vm.instance_id])
        vm = self.wait_state([vm.instance_id], ("running",), timeout)[0]
        self._wait_ssh([vm], timeout)
        return [vm]

    def _get_vms(self, n: int, mine: list[str], role: str = "worker") -> list[VM]:
        """``n`` VMs running and answering SSH: reused, created, and replaced when they
        never come up (``start_retries`` rounds, each within ``start_timeout``)."""
        timeout = float(self.o["start_timeout"])
        if self.exec_mode == "consume":
            return self._consume(n, timeout)
        itype = self.instance_type(role)
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
        retries = int(self.o["start_retries"])
        for attempt in range(retries + 1):
            deadline = time.monotonic() + timeout
            try:
                running = self.wait_state(pending, ("running",), timeout)
            except VMError as e:
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


def _write_private(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _packed(path: str) -> str:
    with open(path, "rb") as f:
        return base64.b64encode(gzip.compress(f.read(), 9)).decode()
