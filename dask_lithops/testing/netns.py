"""Test hosts as Linux network namespaces on one bridge.

A :class:`Bridge` is a host-side Linux bridge with its own /24 (or any subnet
given); each :class:`NetnsHost` is a network namespace with a veth leg on that
bridge, its own address and a default route to the bridge's gateway address,
so processes inside reach the host at ``bridge.gateway`` and each other at
their addresses.  ``NetnsHost(inbound=False)`` installs an nftables input
policy that drops every new inbound connection while allowing outbound ones
(the shape of a Lambda sandbox).

Everything here needs root, ``ip`` (iproute2) and, for the firewall, ``nft``.
Every object records what it made and removes it in ``delete()``; processes are
killed by PID (``ip netns pids``).
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import shutil
import signal
import subprocess
import time
import uuid
from contextlib import contextmanager

INBOUND_DROP_RULES = """\
table inet dask_lithops_sandbox {
    chain input {
        type filter hook input priority 0; policy drop;
        iif "lo" accept
        ct state established,related accept
%s    }
}
"""


def inbound_drop_rules(gateway: str | None = None, ports: tuple = ()) -> str:
    """Drop new inbound connections, except from ``gateway`` to TCP ``ports``."""
    extra = ""
    if ports:
        extra = (f"        ip saddr {gateway} tcp dport {{ {', '.join(map(str, ports))} }} "
                 f"accept\n")
    return INBOUND_DROP_RULES % extra

_LOCK_FILE = "/tmp/dask-lithops-netns.lock"


def netns_available() -> str | None:
    """Return None when namespaces can be made here, else the reason why not."""
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    probe = "dlprobe" + uuid.uuid4().hex[:6]
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as e:
        return f"ip netns add failed: {e.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def nft_available() -> bool:
    return shutil.which("nft") is not None


def _ip(*args: str, netns: str | None = None, check: bool = True, input: str | None = None):
    cmd = ["ip", *args] if netns is None else ["ip", "netns", "exec", netns, "ip", *args]
    return subprocess.run(cmd, check=check, capture_output=True, text=True, input=input)


@contextmanager
def _global_lock():
    with open(_LOCK_FILE, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _local_mac() -> str:
    """A random locally administered unicast MAC address."""
    octets = bytearray(os.urandom(6))
    octets[0] = (octets[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in octets)


def _subnets_in_use() -> list[ipaddress.IPv4Network]:
    out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    nets = []
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            nets.append(ipaddress.ip_interface(parts[parts.index("inet") + 1]).network)
    return nets


class Bridge:
    """A host bridge that namespace hosts attach to.

    ``subnet=None`` picks a free /24 in 10.213.0.0/16, so concurrent test runs
    do not collide.  ``gateway`` is the host's address on the bridge: what a
    process in a namespace dials to reach a server on the host.
    """

    def __init__(self, subnet: str | None = None, gateway: str | None = None, prefix: str = "dl"):
        self.name = f"{prefix}br{uuid.uuid4().hex[:6]}"
        self._subnet_arg = subnet
        self._gateway_arg = gateway
        self.subnet: ipaddress.IPv4Network | None = None
        self.gateway: str | None = None
        self._allocated: set[str] = set()
        self._cursor = 0
        self.created = False

    def create(self) -> Bridge:
        with _global_lock():
            if self._subnet_arg:
                self.subnet = ipaddress.ip_network(self._subnet_arg)
            else:
                used = _subnets_in_use()
                for third in range(1, 255):
                    candidate = ipaddress.ip_network(f"10.213.{third}.0/24")
                    if not any(candidate.overlaps(n) for n in used):
                        self.subnet = candidate
                        break
                else:
                    raise RuntimeError("no free /24 left in 10.213.0.0/16 for a test bridge")
            self.gateway = self._gateway_arg or str(next(self.subnet.hosts()))
            # A bridge whose address is not set takes the lowest MAC among its ports, so it
            # changes as namespaces come and go; hosts that cached the old one then send
            # to nobody until ARP times out (a dropped SYN, a connect stuck for a second).
            _ip("link", "add", "name", self.name, "address", _local_mac(), "type", "bridge")
            self.created = True
            _ip("addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.name)
            _ip("link", "set", self.name, "up")
        return self

    def next_address(self) -> str:
        # round robin: an address given back is reused as late as possible, since the host's
        # neighbour cache may still map it to the MAC of the namespace that had it before
        hosts = [str(a) for a in self.subnet.hosts()]
        for i in range(len(hosts)):
            a = hosts[(self._cursor + i) % len(hosts)]
            if a != self.gateway and a not in self._allocated:
                self._allocated.add(a)
                self._cursor = (self._cursor + i + 1) % len(hosts)
                return a
        raise RuntimeError(f"bridge {self.name}: subnet {self.subnet} is full")

    def release_address(self, address: str) -> None:
        self._allocated.discard(address)

    def delete(self) -> None:
        if self.created:
            _ip("link", "del", self.name, check=False)
            self.created = False

    def __enter__(self):
        return self.create()

    def __exit__(self, *exc):
        self.delete()


class NetnsHost:
    """One namespace host on a :class:`Bridge`.

    ``inbound=False`` makes it accept no new inbound connection (outbound
    only) except, when ``inbound_ports`` are given, from the bridge's gateway (the
    host) to those TCP ports -- how a front end on the host reaches a server inside.
    ``run``/``popen`` execute commands inside; ``kill_all`` kills every process in
    the namespace by PID; ``delete`` removes the namespace.
    """

    def __init__(self, bridge: Bridge, address: str | None = None, inbound: bool = True,
                 name: str | None = None, inbound_ports: tuple = ()):
        self.bridge = bridge
        self.id = uuid.uuid4().hex[:6]
        self.name = name or f"dlns{self.id}"
        self.address = address
        self.inbound = inbound
        self.inbound_ports = tuple(inbound_ports)
        self.created = False
        self._veth_host = f"dlv{self.id}h"
        self._veth_ns = f"dlv{self.id}n"

    def create(self) -> NetnsHost:
        if self.address is None:
            self.address = self.bridge.next_address()
        _ip("netns", "add", self.name)
        self.created = True
        try:
            _ip("link", "add", self._veth_host, "type", "veth", "peer", "name", self._veth_ns)
            _ip("link", "set", self._veth_ns, "netns", self.name)
            _ip("link", "set", self._veth_host, "master", self.bridge.name)
            _ip("link", "set", self._veth_host, "up")
            _ip("link", "set", "lo", "up", netns=self.name)
            _ip("addr", "add", f"{self.address}/{self.bridge.subnet.prefixlen}",
                "dev", self._veth_ns, netns=self.name)
            _ip("link", "set", self._veth_ns, "up", netns=self.name)
            _ip("route", "add", "default", "via", self.bridge.gateway, netns=self.name)
            if not self.inbound:
                if not nft_available():
                    raise RuntimeError("nft (nftables) is needed for an outbound-only namespace")
                subprocess.run(["ip", "netns", "exec", self.name, "nft", "-f", "-"],
                               input=inbound_drop_rules(self.bridge.gateway,
                                                        self.inbound_ports), text=True, check=True,
                               capture_output=True)
        except Exception:
            self.delete()
            raise
        return self

    def command(self, args: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def popen(self, args: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.command(args), **kwargs)

    def run(self, args: list[str], **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.command(args), **kwargs)

    def pids(self) -> list[int]:
        if not self.created:
            return []
        out = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True,
                             text=True).stdout
        return [int(p) for p in out.split()]

    def kill_all(self, sig: int = signal.SIGKILL, wait: float = 5.0) -> None:
        deadline = time.monotonic() + wait
        while True:
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)

    def delete(self) -> None:
        if not self.created:
            return
        self.kill_all()
        _ip("link", "del", self._veth_host, check=False)
        _ip("netns", "del", self.name, check=False)
        # forget its MAC, so a namespace that gets the address next is reached at once
        _ip("neigh", "del", self.address, "dev", self.bridge.name, check=False)
        self.bridge.release_address(self.address)
        self.created = False

    def __enter__(self):
        return self.create()

    def __exit__(self, *exc):
        self.delete()

    def __repr__(self):
        return f"<NetnsHost {self.name} {self.address} inbound={self.inbound}>"


def leftover_namespaces(prefix: str = "dlns") -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]
