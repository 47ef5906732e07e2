"""Namespace hosts on a test bridge: the network every namespace test world stands on."""

import socket
import subprocess
import sys
import threading

import pytest

from dask_lithops.testing.netns import Bridge, NetnsHost, netns_available, nft_available

REASON = netns_available() or (None if nft_available() else "nft is not installed")
pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(REASON is not None, reason=f"needs network namespaces: {REASON}")]

DIAL = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=0.5)
print(s.recv(10).decode())
"""


@pytest.fixture
def bridge():
    b = Bridge().create()
    yield b
    b.delete()


def _serve(host: str) -> tuple[socket.socket, int]:
    server = socket.socket()
    server.bind((host, 0))
    server.listen(16)

    def loop():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.sendall(b"hello")
            conn.close()

    threading.Thread(target=loop, daemon=True).start()
    return server, server.getsockname()[1]


def _dial(ns: NetnsHost, host: str, port: int) -> str:
    r = ns.run([sys.executable, "-c", DIAL, host, str(port)], timeout=10)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_gateway_stays_reachable_while_hosts_come_and_go(bridge):
    """A host that learned the gateway's MAC keeps reaching it after other hosts leave.

    An unset bridge address follows the lowest port MAC; a namespace that cached it then
    sent its SYNs to a port that no longer existed (awslambdaric's 100 ms connect failed).
    """
    server, port = _serve(bridge.gateway)
    mac = open(f"/sys/class/net/{bridge.name}/address").read().strip()
    first = NetnsHost(bridge, inbound=False).create()
    second = NetnsHost(bridge, inbound=False).create()
    try:
        # the lowest possible port MAC: an unset bridge address would take it
        subprocess.run(["ip", "link", "set", second._veth_host, "address", "02:00:00:00:00:01"],
                       check=True)
        assert _dial(first, bridge.gateway, port) == "hello"  # first caches the gateway MAC
        second.delete()
        assert open(f"/sys/class/net/{bridge.name}/address").read().strip() == mac
        assert _dial(first, bridge.gateway, port) == "hello"
    finally:
        second.delete()
        first.delete()
        server.close()

