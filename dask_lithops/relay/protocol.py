"""Wire format shared by the relay server and the ``relay://`` comm.

Every connection to the relay starts the same way::

    relay  -> peer   frame {"nonce": <32 random bytes>, "v": 1}
    peer   -> relay  MAGIC + frame {"op": ..., "id": ..., "mac": HMAC(token, nonce|op|id|conn)}
    relay  -> peer   frame {"ok": true, ...}  or  {"ok": false, "error": ..., "fatal": bool}

A frame is a 4-byte big-endian length followed by a msgpack map.  The token
itself never crosses the wire: the peer proves it holds the token with an
HMAC over a fresh nonce, so a captured hello cannot be replayed.

``op`` is one of

``register``  a worker's control connection (stays open; carries ``dial``,
              ``ping``/``pong`` and ``reject`` frames afterwards);
``connect``   someone wants to reach worker ``id``; after ``ok`` the socket
              is spliced to the worker's dial-back connection (``ok``
              carries the worker's ``accept`` leg as the relay saw it, and
              whether the worker will try a direct path: ``relay.direct``);
``accept``    a worker dialling back for pending connection ``conn``; after
              ``ok`` the socket is spliced to the waiting ``connect``.

After ``ok`` on ``connect``/``accept`` the relay copies bytes only; the first
byte the connecting side sends says whether the comm continues there or on a
direct connection (``relay.direct``); TLS (when the cluster uses it) is
negotiated end to end after it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import socket
import struct
from dataclasses import dataclass

import msgpack

MAGIC = b"DLR1"
VERSION = 1
MAX_FRAME = 64 * 1024
NONCE_BYTES = 32
HEADER = struct.Struct("!I")
TOKEN_ENV = "DASK_LITHOPS_RELAY_TOKEN"
SCHEME = "relay"
PREFIX = "relay://"


class RelayProtocolError(ConnectionError):
    """The other side spoke something that is not the relay protocol."""


def pack(msg: dict) -> bytes:
    body = msgpack.packb(msg, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise RelayProtocolError(f"relay frame too large ({len(body)} bytes)")
    return HEADER.pack(len(body)) + body


def unpack(body: bytes) -> dict:
    try:
        msg = msgpack.unpackb(body, raw=False)
    except Exception as e:  # malformed bytes from an untrusted peer
        raise RelayProtocolError(f"undecodable relay frame: {e}") from None
    if not isinstance(msg, dict):
        raise RelayProtocolError("relay frame is not a map")
    return msg


def mac(token: str, nonce: bytes, op: str, worker_id: str, conn: str = "") -> bytes:
    data = b"\0".join([nonce, op.encode(), worker_id.encode(), conn.encode()])
    return hmac.new(token.encode(), data, hashlib.sha256).digest()


def check_mac(token: str, nonce: bytes, msg: dict) -> bool:
    got = msg.get("mac")
    if not isinstance(got, bytes):
        return False
    want = mac(token, nonce, str(msg.get("op", "")), str(msg.get("id", "")),
               str(msg.get("conn", "")))
    return hmac.compare_digest(got, want)


def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


# --------------------------------------------------------------------------
# Addresses


@dataclass(frozen=True)
class RelayAddress:
    """``relay://<host>:<port>/<worker-id>`` split in parts (``worker_id`` may be '')."""

    host: str
    port: int
    worker_id: str = ""

    @property
    def relay(self) -> str:
        """``host:port`` of the relay server."""
        return _unparse_host_port(self.host, self.port)

    @property
    def loc(self) -> str:
        return f"{self.relay}/{self.worker_id}" if self.worker_id else self.relay

    @property
    def url(self) -> str:
        return PREFIX + self.loc


def _unparse_host_port(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def parse_relay_address(addr: str, default_port: int | None = None) -> RelayAddress:
    """Parse ``relay://host:port/id``, ``host:port/id``, ``host:port`` or ``host``.

    Raises ``ValueError`` with the offending address on anything else.
    """
    loc = addr[len(PREFIX):] if addr.startswith(PREFIX) else addr
    if "://" in loc:
        raise ValueError(f"not a relay address: {addr!r}")
    hostport, _, worker_id = loc.partition("/")
    if "/" in worker_id:
        raise ValueError(f"invalid relay address {addr!r}: worker id may not contain '/'")
    if hostport.startswith("["):
        host, sep, tail = hostport[1:].partition("]")
        if not sep or (tail and not tail.startswith(":")):
            raise ValueError(f"invalid relay address {addr!r}")
        port_s = tail[1:]
    else:
        host, sep, port_s = hostport.rpartition(":")
        if not sep:
            host, port_s = port_s, ""
    if not port_s:
        if default_port is None:
            raise ValueError(f"missing port in relay address {addr!r}")
        port = default_port
    else:
        try:
            port = int(port_s)
        except ValueError:
            raise ValueError(f"invalid port in relay address {addr!r}") from None
    return RelayAddress(host, port, worker_id)


def unparse_relay_address(host: str, port: int, worker_id: str = "") -> str:
    return RelayAddress(host, port, worker_id).url


# --------------------------------------------------------------------------
# Client-side handshake on a raw non-blocking socket.  Reads are exact (never
# past the relay's last handshake frame) so the socket can afterwards be given
# to tornado, including ``start_tls``, with nothing left in any buffer.


async def recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int,
                       who: str = "relay") -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = await loop.sock_recv_into(sock, view[got:])
        if k == 0:
            raise ConnectionResetError(f"{who} closed the connection during the handshake")
        got += k
    return bytes(buf)


def share_port(sock: socket.socket) -> None:
    """Let other sockets bind the local port ``sock`` is about to bind."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)


async def recv_frame(loop, sock: socket.socket) -> dict:
    (n,) = HEADER.unpack(await recv_exactly(loop, sock, HEADER.size))
    if n > MAX_FRAME:
        raise RelayProtocolError(f"relay frame too large ({n} bytes)")
    return unpack(await recv_exactly(loop, sock, n))


async def open_relay_socket(host: str, port: int, reusable: bool = False) -> socket.socket:
    """Connect a non-blocking TCP socket to the relay (numeric or resolvable host).

    ``reusable``: bind it first with SO_REUSEADDR/SO_REUSEPORT so that a direct
    connection can later leave from the same local port (see ``relay.direct``).
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    last: Exception | None = None
    for family, type_, proto, _, sockaddr in infos:
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            if reusable:
                share_port(sock)
                sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
            await loop.sock_connect(sock, sockaddr)
        except OSError as e:
            sock.close()
            last = e
            continue
        except BaseException:
            sock.close()
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise last or OSError(f"could not resolve relay host {host!r}")


async def client_handshake(sock: socket.socket, token: str, op: str, worker_id: str,
                           conn: str = "", **extra) -> dict:
    """Run the hello exchange on *sock*; return the relay's ``ok`` reply.

    Raises :class:`RelayRefused` when the relay says no.
    """
    loop = asyncio.get_running_loop()
    challenge = await recv_frame(loop, sock)
    nonce = challenge.get("nonce")
    if not isinstance(nonce, bytes) or challenge.get("v") != VERSION:
        raise RelayProtocolError("peer is not a dask-lithops relay (bad challenge)")
    hello = {**extra, "op": op, "id": worker_id, "conn": conn,
             "mac": mac(token, nonce, op, worker_id, conn)}
    await loop.sock_sendall(sock, MAGIC + pack(hello))
    reply = await recv_frame(loop, sock)
    if not reply.get("ok"):
        raise RelayRefused(str(reply.get("error", "refused")), bool(reply.get("fatal")))
    return reply


class RelayRefused(ConnectionRefusedError):
    """The relay refused a request; ``fatal`` means retrying will not help."""

    def __init__(self, reason: str, fatal: bool = False):
        super().__init__(f"relay refused: {reason}")
        self.reason = reason
        self.fatal = fatal
