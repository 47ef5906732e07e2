"""SSH test hosts: network namespaces each running a real OpenSSH ``sshd``.

:class:`SSHHost` is a :class:`~dask_lithops.testing.netns.NetnsHost` with its
own address on a :class:`~dask_lithops.testing.netns.Bridge` and a real
``/usr/sbin/sshd -D -e -f <config>`` inside, with throwaway host keys, key
authentication only and root login by key allowed.  :class:`SSHHosts` makes a
bridge, ``n`` hosts, a client key pair and a ``known_hosts`` file naming every
host's key: the shape of "a few machines I can ssh into".

Filesystem: every namespace shares this machine's filesystem (and its system
Python).  To keep hosts apart, each host gets its own directory under the
world's temp dir and its sshd sets ``HOME`` to ``<host dir>/home`` for every
session (``SetEnv``), so ``~`` -- and with it ``~/.dask-lithops``, the default
remote directory of the SSH provider -- is per host.  sshd still starts
sessions (and SFTP) in root's real home directory, so code must resolve remote
paths from ``$HOME`` rather than relying on the working directory; anything
written to absolute paths outside ``$HOME`` *is* shared between hosts.  pip's
cache (``PIP_CACHE_DIR``) is deliberately shared (the machine's own cache) so
runtime installs are fast in tests.

"Killing" a host (:meth:`SSHHosts.kill`) kills every process in its namespace,
sshd included: a simulated VM failure.  ``kill(host, link_down=True)`` also
takes its network link down first so peers see silence rather than resets.

Everything needs root, iproute2 and OpenSSH's server (``sshd``, ``ssh-keygen``).
Every process is stopped by PID and every namespace and temp dir is removed in
``stop()``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from .netns import Bridge, NetnsHost, netns_available

SSHD = os.environ.get("DASK_LITHOPS_TEST_SSHD", "/usr/sbin/sshd")

SSHD_CONFIG = """\
ListenAddress {address}
Port {port}
HostKey {host_key}
PidFile none
AuthorizedKeysFile {authorized_keys}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
UseDNS no
PrintMotd no
PrintLastLog no
MaxSessions 64
MaxStartups 64:30:128
LoginGraceTime 30
AllowTcpForwarding yes
X11Forwarding no
Subsystem sftp internal-sftp
SetEnv {setenv}
"""


def ssh_hosts_available() -> str | None:
    """None when SSH namespace hosts can be made here, else the reason why not."""
    reason = netns_available()
    if reason:
        return reason
    if not os.path.exists(SSHD):
        return f"OpenSSH server not installed ({SSHD} missing; apt-get install openssh-server)"
    if shutil.which("ssh-keygen") is None:
        return "ssh-keygen not installed (apt-get install openssh-client)"
    return None


def _keygen(path: str, comment: str = "dask-lithops-test") -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path],
                   check=True, capture_output=True)
    with open(path + ".pub") as f:
        return f.read().strip()


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


class SSHHost:
    """One namespace host running sshd.

    ``directory`` holds everything of this host (host key, sshd config and log,
    ``home``); it is removed by :meth:`stop`.  ``env`` adds variables to every
    session (sshd ``SetEnv``); ``HOME`` defaults to ``<directory>/home``.
    """

    def __init__(self, bridge: Bridge, authorized_keys: str, directory: str | None = None,
                 address: str | None = None, port: int = 22, env: dict | None = None,
                 name: str | None = None):
        self.netns = NetnsHost(bridge, address=address, name=name)
        self.port = port
        self.authorized_keys = authorized_keys
        self._own_dir = directory is None
        self.directory = directory or tempfile.mkdtemp(prefix="dl-sshhost-")
        self.home = os.path.join(self.directory, "home")
        self.env = {"HOME": self.home, **(env or {})}
        self.host_key_public: str | None = None
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def address(self) -> str:
        return self.netns.address

    @property
    def name(self) -> str:
        return self.netns.name

    def start(self) -> SSHHost:
        os.makedirs(self.home, exist_ok=True)
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
        self.netns.create()
        try:
            host_key = os.path.join(self.directory, "ssh_host_ed25519_key")
            self.host_key_public = _keygen(host_key, comment=f"host-{self.name}")
            ak = os.path.join(self.directory, "authorized_keys")
            with open(ak, "w") as f:
                f.write(self.authorized_keys.strip() + "\n")
            os.chmod(ak, 0o600)
            setenv = " ".join(f'"{k}={v}"' for k, v in self.env.items())
            config = os.path.join(self.directory, "sshd_config")
            with open(config, "w") as f:
                f.write(SSHD_CONFIG.format(address=self.address, port=self.port,
                                           host_key=host_key, authorized_keys=ak,
                                           setenv=setenv))
            self._log = open(os.path.join(self.directory, "sshd.log"), "ab")
            self.proc = self.netns.popen([SSHD, "-D", "-e", "-f", config],
                                         stdin=subprocess.DEVNULL, stdout=self._log,
                                         stderr=subprocess.STDOUT)
        except Exception:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until sshd answers with its banner on the host's address."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"sshd on {self.address} exited: {self.sshd_log()[-2000:]}")
            try:
                with socket.create_connection((self.address, self.port), timeout=1) as s:
                    s.settimeout(2)
                    if s.recv(64).startswith(b"SSH-"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"sshd on {self.address}:{self.port} not ready after {timeout}s")
            time.sleep(0.01)

    def known_hosts_line(self) -> str:
        host = self.address if self.port == 22 else f"[{self.address}]:{self.port}"
        kind, key = self.host_key_public.split()[:2]
        return f"{host} {kind} {key}"

    def sshd_log(self) -> str:
        try:
            with open(os.path.join(self.directory, "sshd.log"), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def processes(self) -> list[tuple[int, str]]:
        """(pid, command line) of every process running on this host."""
        return [(pid, _cmdline(pid)) for pid in self.netns.pids()]

    def kill(self, link_down: bool = False) -> None:
        """Simulated VM failure: every process on the host (sshd too) is killed."""
        if link_down and self.netns.created:
            subprocess.run(["ip", "link", "set", self.netns._veth_host, "down"],
                           capture_output=True)
        self.netns.kill_all(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=5)

    def stop(self) -> None:
        self.netns.delete()  # kills every process in the namespace by PID
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __repr__(self):
        return f"<SSHHost {self.address}:{self.port} {self.name}>"


class SSHHosts:
    """A bridge, ``n`` sshd hosts, a client key pair and a ``known_hosts`` file.

    ``hosts`` are the hosts' addresses (log in as ``user``, i.e. root, with
    ``key_filename``; host keys are in ``known_hosts``).  ``gateway`` is the
    address of this machine as the hosts see it.
    """

    def __init__(self, n: int = 3, env: dict | None = None, share_pip_cache: bool = True):
        self.n = n
        self.user = "root"
        self.env = dict(env or {})
        if share_pip_cache:
            self.env.setdefault("PIP_CACHE_DIR",
                                os.environ.get("PIP_CACHE_DIR")
                                or os.path.expanduser("~/.cache/pip"))
        self.directory: str | None = None
        self.bridge: Bridge | None = None
        self._hosts: dict[str, SSHHost] = {}
        self.key_filename: str | None = None
        self.public_key: str | None = None
        self.known_hosts: str | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> SSHHosts:
        self.directory = tempfile.mkdtemp(prefix=f"dl-sshhosts-{uuid.uuid4().hex[:6]}-")
        try:
            self.bridge = Bridge().create()
            self.key_filename = os.path.join(self.directory, "id_ed25519")
            self.public_key = _keygen(self.key_filename, comment="dask-lithops-test-client")
            self.known_hosts = os.path.join(self.directory, "known_hosts")
            self.add_hosts(self.n)
        except Exception:
            self.stop()
            raise
        return self

    def add_hosts(self, n: int = 1, addresses: list[str] | None = None) -> list[str]:
        """Start ``n`` more hosts (in parallel); return their addresses."""
        addresses = list(addresses or [None] * n)
        new = []
        for addr in addresses:
            d = tempfile.mkdtemp(prefix="host-", dir=self.directory)
            new.append(SSHHost(self.bridge, self.public_key, directory=d, address=addr,
                               env=self.env))
        for h in new:  # address allocation is not thread-safe: do it up front
            if h.netns.address is None:
                h.netns.address = self.bridge.next_address()
        with ThreadPoolExecutor(max(len(new), 1)) as ex:
            futures = [ex.submit(h.start) for h in new]
            errors = [f.exception() for f in futures]
            for h, e in zip(new, errors):
                if e is None:
                    self._hosts[h.address] = h
            if any(errors):
                raise next(e for e in errors if e)
            for f in [ex.submit(h.wait_ready) for h in new]:
                f.result()
        self._write_known_hosts()
        return [h.address for h in new]

    def add_host(self, address: str | None = None) -> str:
        return self.add_hosts(1, [address])[0]

    def _write_known_hosts(self) -> None:
        with open(self.known_hosts, "w") as f:
            for h in self._hosts.values():
                f.write(h.known_hosts_line() + "\n")

    def stop(self) -> None:
        hosts = list(self._hosts.values())
        self._hosts.clear()
        if hosts:
            with ThreadPoolExecutor(len(hosts)) as ex:
                list(ex.map(lambda h: h.stop(), hosts))
        if self.bridge is not None:
            self.bridge.delete()
            self.bridge = None
        if self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def __enter__(self) -> SSHHosts:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- queries and failures --------------------------------------------------------------
    @property
    def hosts(self) -> list[str]:
        return list(self._hosts)

    @property
    def gateway(self) -> str:
        return self.bridge.gateway

    def host(self, host: str | SSHHost) -> SSHHost:
        if isinstance(host, SSHHost):
            return host
        return self._hosts[host.rsplit("@", 1)[-1].split(":")[0]]

    def kill(self, host: str | SSHHost, link_down: bool = False) -> None:
        """Kill every process of ``host`` (sshd too): a simulated VM failure."""
        self.host(host).kill(link_down=link_down)

    def remove_host(self, host: str | SSHHost) -> None:
        h = self.host(host)
        h.stop()
        self._hosts.pop(h.address, None)
        self._write_known_hosts()

    def processes_on(self, host: str | SSHHost) -> list[tuple[int, str]]:
        """(pid, command line) of every process on ``host``, sshd included."""
        return self.host(host).processes()

    def dask_processes_on(self, host: str | SSHHost) -> list[tuple[int, str]]:
        """Processes on ``host`` that run dask / dask-lithops code."""
        return [(pid, cmd) for pid, cmd in self.processes_on(host)
                if "dask" in cmd or "distributed" in cmd]

    def __repr__(self):
        return f"<SSHHosts {self.hosts}>"
