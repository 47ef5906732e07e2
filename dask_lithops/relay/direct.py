"""Direct paths between relay:// peers: TCP simultaneous open, the relay as rendezvous.

Neither a function sandbox nor a NAT accepts an unsolicited connection, but both
let in packets that answer one a process sent out.  When both ends of a relay
connection are ready to try (``lithops.relay.direct``), each opens a second
socket *from the local port of its relay leg* to the address the relay saw that
leg come from, at the same time: each side's SYN opens its own firewall (or NAT
mapping) for the other's, and TCP's simultaneous open joins them (the accepting
side also listens on that port, which joins them where nothing drops the first
SYN, e.g. on one host).  Both sides
then prove they hold the cluster's relay token for this connection id
(:func:`direct_mac`), and the connecting side announces the outcome with one
byte on the relay leg, which the accepting side always reads first:

* ``b"D"``: the direct socket carries the comm; both relay legs are closed;
* ``b"R"``: the direct attempt failed (or was not made); the spliced relay leg
  carries the comm, as without this module.

TLS, when the cluster uses it, starts after that byte on whichever socket won,
so it is end to end either way.  A failed attempt costs at most ``timeout``,
once per worker: later connections to it skip the attempt for
:data:`FAILURE_MEMORY` seconds.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import socket
import time

import dask
from dask.utils import parse_timedelta

from dask_lithops.relay.protocol import recv_exactly, share_port

logger = logging.getLogger("dask_lithops.relay")

USE_DIRECT, USE_RELAY = b"D", b"R"
MAC_BYTES = 32
RETRY_INTERVAL = 0.005  # after a RST: the peer's own SYN is not out yet
FAILURE_MEMORY = 300.0

_failed: dict[str, float] = {}  # relay/worker -> when a direct attempt to it last failed


def enabled() -> bool:
    return bool(dask.config.get("lithops.relay.direct", True))


def attempt_timeout() -> float:
    return parse_timedelta(dask.config.get("lithops.relay.direct_timeout", "500ms"),
                           default="seconds")


def worth_trying(worker_id: str) -> bool:
    failed = _failed.get(worker_id)
    return failed is None or time.monotonic() - failed > FAILURE_MEMORY


def remember_failure(worker_id: str) -> None:
    _failed[worker_id] = time.monotonic()


def reusable_socket(family: int = socket.AF_INET) -> socket.socket:
    """A non-blocking TCP socket whose local port a second socket may share."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    share_port(sock)
    sock.setblocking(False)
    return sock


def direct_mac(token: str, conn: str, role: str) -> bytes:
    data = b"\0".join([b"direct", conn.encode(), role.encode()])
    return hmac.new(token.encode(), data, hashlib.sha256).digest()


def parse_endpoint(peer: object) -> tuple[str, int] | None:
    if not isinstance(peer, str) or ":" not in peer:
        return None
    host, _, port = peer.rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        return None


async def open_direct(leg: socket.socket, peer: tuple[str, int], *, token: str, conn: str,
                      role: str, timeout: float) -> socket.socket | None:
    """A socket from ``leg``'s local port to ``peer``, authenticated; None if none came up.

    ``role`` is ``"connect"`` or ``"accept"``. Both sides dial (retrying while the other
    side's host answers with a reset, i.e. no firewall stands in between); the accepting
    side also listens on its port, which is what joins them where nothing drops the first
    SYN (loopback, open hosts), while a sandbox's drop leaves each SYN_SENT socket waiting
    for the other's SYN (simultaneous open). Each side sends its MAC and checks the
    other's, so a stranger who reaches the port cannot take the connection.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    local = leg.getsockname()[:2]
    listener = None
    attempts = [asyncio.ensure_future(_dial(leg.family, local, peer, deadline))]
    if role == "accept":
        listener = reusable_socket(leg.family)
        try:
            listener.bind(local)
            listener.listen(4)
            attempts.append(asyncio.ensure_future(_accept(listener, peer)))
        except OSError as e:
            logger.debug("relay: cannot listen on %s for a direct path: %s", local, e)
            listener.close()
            listener = None
    sock = None
    try:
        pending = set(attempts)
        while pending and sock is None:
            left = deadline - loop.time()
            if left <= 0:
                break
            done, pending = await asyncio.wait(pending, timeout=left,
                                               return_when=asyncio.FIRST_COMPLETED)
            for f in done:
                if not f.cancelled() and f.exception() is None and f.result() is not None:
                    if sock is None:
                        sock = f.result()
                    else:
                        f.result().close()
    finally:
        for f in attempts:
            if not f.done():
                f.cancel()
                f.add_done_callback(close_result)
        if listener is not None:
            listener.close()
    if sock is None:
        return None
    other = "accept" if role == "connect" else "connect"
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await loop.sock_sendall(sock, direct_mac(token, conn, role))
        got = await asyncio.wait_for(recv_exactly(loop, sock, MAC_BYTES, "direct peer"),
                                     max(0.0, deadline - loop.time()) + 0.5)
    except (OSError, asyncio.TimeoutError) as e:
        logger.debug("relay: direct connection with %s:%s failed: %s", *peer, e)
        sock.close()
        return None
    except BaseException:
        sock.close()
        raise
    if not hmac.compare_digest(got, direct_mac(token, conn, other)):
        logger.warning("relay: direct connection with %s:%s failed authentication", *peer)
        sock.close()
        return None
    return sock


def close_result(f: asyncio.Future) -> None:
    """Done-callback for an abandoned attempt: close the socket it got anyway."""
    if not f.cancelled() and f.exception() is None and f.result() is not None:
        f.result().close()


async def _dial(family: int, local, peer, deadline: float) -> socket.socket | None:
    loop = asyncio.get_running_loop()
    while loop.time() < deadline:
        sock = reusable_socket(family)
        try:
            sock.bind(local)
            await asyncio.wait_for(loop.sock_connect(sock, peer), deadline - loop.time())
            return sock
        except (ConnectionRefusedError, ConnectionResetError):
            sock.close()  # nothing there yet (the other side's socket is not up): again
            await asyncio.sleep(RETRY_INTERVAL)
        except (OSError, asyncio.TimeoutError) as e:
            sock.close()
            logger.debug("relay: dialling %s:%s directly failed: %s", *peer, e)
            return None
        except BaseException:
            sock.close()
            raise
    return None


async def _accept(listener: socket.socket, peer) -> socket.socket | None:
    loop = asyncio.get_running_loop()
    listener.setblocking(False)
    while True:
        sock, addr = await loop.sock_accept(listener)
        if addr[0] == peer[0]:
            sock.setblocking(False)
            return sock
        sock.close()  # not the peer the relay named
