"""The relay server: rendezvous and byte splicing for workers that cannot be dialled.

A worker behind the relay keeps one outbound *control* connection
(``register``).  Whoever wants to reach that worker opens a connection to the
relay (``connect``); the relay sends ``dial`` over the worker's control
connection, the worker opens a fresh connection back (``accept``) and from
then on the relay copies bytes between the two sockets and nothing else.

Two ways to copy, both with memory bounded per stream direction:

* *zero-copy* (Linux, the default there): once spliced, both sockets leave
  asyncio's transports and each direction moves data socket -> pipe -> socket
  with ``os.splice``, so payload bytes never enter user space.  The pipe is
  the only buffer: at most ``high_water + chunk_size`` bytes are read into it,
  and the source is not read again until the pipe has been written out
  (``add_reader`` while the pipe is empty, ``add_writer`` while it is not).
* *buffered* (elsewhere, when a ``_tap`` is set, or when the pipes cannot be
  made): reads go through one shared buffer and are copied straight into the
  other socket's transport; when that transport's write buffer passes
  ``high_water`` the source socket stops being read until it drains below
  ``low_water`` (asyncio's pause/resume_writing -> pause/resume_reading).

Either way a stalled receiver costs at most ``high_water + chunk_size`` bytes
per direction, however fast the sender is.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import secrets
import socket
import sys
import time

try:
    import fcntl
except ImportError:  # not on Windows
    fcntl = None

from dask_lithops.relay.protocol import (
    HEADER,
    MAGIC,
    MAX_FRAME,
    VERSION,
    RelayProtocolError,
    check_mac,
    new_nonce,
    pack,
    unpack,
)

logger = logging.getLogger("dask_lithops.relay")

_WRITE_COPIES = sys.version_info < (3, 12)

_HELLO, _CONTROL, _WAITING, _SPLICE, _CLOSED = "hello", "control", "waiting", "splice", "closed"
_DETACHED = "detached"  # socket handed over to a _ZeroCopyStream

ZERO_COPY_AVAILABLE = (sys.platform.startswith("linux") and hasattr(os, "splice")
                       and fcntl is not None and hasattr(fcntl, "F_SETPIPE_SZ"))
ZERO_COPY_ENV = "DASK_LITHOPS_RELAY_ZERO_COPY"  # "0" turns the zero-copy path off
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_PUMP_ROUNDS = 8  # splice round trips per wake-up before yielding to other streams


class _Conn(asyncio.BufferedProtocol):
    """One TCP connection to the relay, in one of the states above."""

    def __init__(self, server: RelayServer):
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.state = _HELLO
        self.inbuf = bytearray()
        self.peer: _Conn | None = None
        self.nonce = new_nonce()
        self.peername = "?"
        self.worker_id: str | None = None
        self.cid: str | None = None
        self.direct = False  # this end will try a direct path (relay.direct)
        self.eof = False
        self.last_seen = time.monotonic()
        self._hello_timer: asyncio.TimerHandle | None = None

    # -- asyncio callbacks -------------------------------------------------

    def connection_made(self, transport):
        self.transport = transport
        transport.set_write_buffer_limits(high=self.server.high_water,
                                          low=self.server.low_water)
        peer = transport.get_extra_info("peername")
        if peer:
            self.peername = f"{peer[0]}:{peer[1]}"
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            except OSError:
                pass
        self.server._conns.add(self)
        self._hello_timer = asyncio.get_running_loop().call_later(
            self.server.hello_timeout, self._hello_timeout)
        transport.write(pack({"nonce": self.nonce, "v": VERSION}))

    def get_buffer(self, sizehint):
        # One buffer shared by every connection: asyncio calls get_buffer,
        # recv_into and buffer_updated back to back, and buffer_updated copies
        # the bytes out before returning.
        return self.server._rbuf

    def buffer_updated(self, nbytes):
        data = self.server._rbuf[:nbytes]
        if self.state == _SPLICE:
            self.server.bytes_relayed += nbytes
            if self.server._tap is not None:
                self.server._tap(bytes(data))
            # Up to 3.11 a selector transport copies whatever it cannot send at
            # once, so the shared buffer can be handed over as is; later versions
            # keep a reference to it, so give them a private copy.
            self.peer.transport.write(data if _WRITE_COPIES else bytes(data))
            return
        self.inbuf += data
        if len(self.inbuf) > MAX_FRAME + len(MAGIC) + HEADER.size:
            self._drop("oversized frame")
            return
        try:
            self._process_frames()
        except RelayProtocolError as e:
            self._drop(str(e))

    def eof_received(self):
        if self.state == _SPLICE and self.peer is not None:
            self.eof = True
            if self.peer.transport.can_write_eof() and not self.peer.transport.is_closing():
                self.peer.transport.write_eof()
            if self.peer.eof:
                self.transport.close()
                self.peer.transport.close()
            return True  # keep our write side open for the peer's remaining bytes
        return False

    def pause_writing(self):
        # Our outgoing buffer is full: stop reading from the socket feeding it.
        if self.peer is not None and self.state == _SPLICE:
            self.peer.transport.pause_reading()

    def resume_writing(self):
        if self.peer is not None and self.state == _SPLICE:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc):
        state, self.state = self.state, _CLOSED
        self._cancel_hello_timer()
        self.server._conns.discard(self)
        if state == _CONTROL:
            self.server._control_lost(self)
        elif state == _WAITING:
            self.server._waiting_lost(self)
        elif state == _SPLICE:
            self.server.streams -= 1
            if self.peer is not None and not self.peer.transport.is_closing():
                # close() flushes what is already buffered towards the peer
                self.peer.transport.close()
        self.peer = None

    # -- helpers -----------------------------------------------------------

    def send(self, msg: dict) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(pack(msg))

    def _cancel_hello_timer(self):
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None

    def _hello_timeout(self):
        self._hello_timer = None
        if self.state == _HELLO:
            self._drop("no hello within timeout")

    def _drop(self, reason: str):
        logger.warning("relay: dropping connection from %s: %s", self.peername, reason)
        self.server.refused += 1
        self.transport.abort()

    def _process_frames(self):
        while True:
            buf = self.inbuf
            if self.state == _HELLO:
                if len(buf) < len(MAGIC):
                    return
                if bytes(buf[:len(MAGIC)]) != MAGIC:
                    raise RelayProtocolError("not a relay hello (bad magic)")
                start = len(MAGIC)
            elif self.state == _CONTROL:
                start = 0
            else:
                return
            if len(buf) < start + HEADER.size:
                return
            (n,) = HEADER.unpack_from(buf, start)
            if n > MAX_FRAME:
                raise RelayProtocolError("oversized frame")
            end = start + HEADER.size + n
            if len(buf) < end:
                return
            msg = unpack(bytes(buf[start + HEADER.size:end]))
            del buf[:end]
            self.last_seen = time.monotonic()
            if self.state == _HELLO:
                self._cancel_hello_timer()
                # Nothing else may be read until the hello is dealt with.
                self.transport.pause_reading()
                self.server._on_hello(self, msg)
                return
            self.server._on_control(self, msg)


class _Half:
    """One direction of a zero-copy stream: src socket -> pipe -> dst socket."""

    __slots__ = ("cap", "dst", "dst_sock", "eof", "mode", "queued", "rfd", "shut", "src", "wfd")

    def __init__(self, src: socket.socket, dst: socket.socket, rfd: int, wfd: int, cap: int):
        self.src, self.dst, self.dst_sock = src.fileno(), dst.fileno(), dst
        self.rfd, self.wfd, self.cap = rfd, wfd, cap
        self.queued = 0  # bytes in the pipe, not yet written to dst
        self.eof = False  # src sent FIN
        self.shut = False  # ... and we passed it on (shutdown(dst, SHUT_WR))
        self.mode = None  # _READ (waiting for src), _WRITE (waiting for dst) or None


_READ, _WRITE = "read", "write"


class _ZeroCopyStream:
    """Two sockets joined by ``os.splice`` through one pipe per direction.

    Each direction alternates between reading src into its (empty) pipe and
    writing the pipe out to dst, so the pipe is the only buffer and never holds
    more than ``cap`` bytes.  Half-close is passed on (FIN -> ``SHUT_WR``);
    the stream is torn down once both directions are shut, or at the first
    error on either socket (closing the other one too, as the buffered path
    does).
    """

    def __init__(self, server: RelayServer, a: socket.socket, b: socket.socket,
                 pipes: list[tuple[int, int]], cap: int):
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.socks = (a, b)
        self.pipes = pipes
        (r1, w1), (r2, w2) = pipes
        self.halves = (_Half(a, b, r1, w1, cap), _Half(b, a, r2, w2, cap))
        self.closed = False

    def start(self) -> None:
        for h in self.halves:
            self._set_mode(h, _READ)

    @property
    def buffered(self) -> int:
        return self.halves[0].queued + self.halves[1].queued

    def _set_mode(self, h: _Half, mode) -> None:
        if h.mode == mode:
            return
        if h.mode == _READ:
            self.loop.remove_reader(h.src)
        elif h.mode == _WRITE:
            self.loop.remove_writer(h.dst)
        h.mode = mode
        if mode == _READ:
            self.loop.add_reader(h.src, self._pump, h)
        elif mode == _WRITE:
            self.loop.add_writer(h.dst, self._pump, h)

    def _pump(self, h: _Half) -> None:
        if self.closed:
            return
        splice = os.splice
        try:
            for _ in range(_PUMP_ROUNDS):
                while h.queued:
                    n = splice(h.rfd, h.dst, h.queued, flags=_SPLICE_FLAGS)
                    if n <= 0:
                        raise ConnectionError("splice to socket moved nothing")
                    h.queued -= n
                if h.eof:
                    break
                n = splice(h.src, h.wfd, h.cap, flags=_SPLICE_FLAGS)
                if n == 0:
                    h.eof = True
                    break
                h.queued = n
                self.server.bytes_relayed += n
        except BlockingIOError:
            pass  # src drained (queued == 0) or dst full (queued > 0)
        except OSError as e:
            logger.debug("relay: zero-copy stream closed: %s", e)
            self.close()
            return
        if h.eof and not h.queued:
            self._set_mode(h, None)
            if not h.shut:
                h.shut = True
                try:
                    h.dst_sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
            if all(x.shut for x in self.halves):
                self.close()
            return
        self._set_mode(h, _WRITE if h.queued else _READ)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for h in self.halves:
            try:
                self._set_mode(h, None)
            except (OSError, ValueError, RuntimeError):  # loop already closed
                h.mode = None
        for sock in self.socks:
            sock.close()
        for r, w in self.pipes:
            os.close(r)
            os.close(w)
        self.server._zero_copy.discard(self)
        self.server.streams -= 2


class RelayServer:
    """Relay for ``relay://`` addresses (see :mod:`dask_lithops.relay`).

    Parameters
    ----------
    host, port
        Where to listen (``port=0`` picks a free port; see :attr:`address`).
    token
        The cluster's relay token.  Only peers that prove they hold it are
        admitted (workers registering, anyone connecting, workers dialling
        back).  It is never logged.
    heartbeat
        Seconds between a worker's control-connection pings.
    control_timeout
        A control connection silent this long (at least three heartbeats) is
        dropped.  Generous on purpose: a busy worker's event loop can stall for
        seconds, and TCP keepalive already catches vanished hosts.
    dial_timeout
        Seconds to wait for a worker to dial back before refusing the caller.
    high_water, low_water, chunk_size
        Per-direction flow-control limits (bytes) of a spliced stream.
    zero_copy
        Forward spliced streams with ``os.splice`` (payload never copied into
        the relay process).  ``None`` (default): wherever available (Linux),
        unless ``$DASK_LITHOPS_RELAY_ZERO_COPY`` is ``0``; ``False``: always
        the buffered copy.
    """

    def __init__(self, host: str = "0.0.0.0", port: int = 0, token: str | None = None, *,
                 heartbeat: float = 5.0, control_timeout: float = 60.0,
                 dial_timeout: float = 10.0,
                 hello_timeout: float = 10.0, high_water: int = 256 * 1024,
                 low_water: int = 64 * 1024, chunk_size: int = 256 * 1024,
                 backlog: int = 4096, zero_copy: bool | None = None):
        if not token or not isinstance(token, str):
            raise ValueError("RelayServer needs a non-empty token (str)")
        self.host = host
        self.port = port
        self._token = token
        self.heartbeat = heartbeat
        self.control_timeout = max(control_timeout, 3 * heartbeat)
        self.dial_timeout = dial_timeout
        self.hello_timeout = hello_timeout
        self.high_water = high_water
        self.low_water = low_water
        self.backlog = backlog
        if zero_copy and not ZERO_COPY_AVAILABLE:
            raise ValueError("zero_copy=True needs os.splice (Linux, Python >= 3.10)")
        if zero_copy is None:
            zero_copy = ZERO_COPY_AVAILABLE and os.environ.get(ZERO_COPY_ENV, "1").strip().lower() \
                not in ("0", "false", "no", "off")
        self.zero_copy = bool(zero_copy)
        # bytes a zero-copy direction may hold in its pipe: the buffered path's bound
        self.pipe_bytes = high_water + chunk_size
        self._zero_copy: set[_ZeroCopyStream] = set()
        self._rbuf = memoryview(bytearray(chunk_size))
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[_Conn] = set()
        self._workers: dict[str, _Conn] = {}
        self._pending: dict[str, tuple[str, _Conn, asyncio.TimerHandle]] = {}
        self._reaper: asyncio.Task | None = None
        self.streams = 0  # live spliced stream *ends* (2 per stream)
        self.bytes_relayed = 0
        self.refused = 0
        self.refusals: collections.deque = collections.deque(maxlen=100)
        # Test hook: a callable receiving every spliced chunk (how the tests show
        # that with TLS the relay only ever carries ciphertext).
        self._tap = None

    def __repr__(self):
        addr = self.address if self._server else "not started"
        return f"<RelayServer {addr} workers={len(self._workers)} streams={self.streams // 2}>"

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> RelayServer:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Conn(self), self.host, self.port, reuse_address=True,
            backlog=self.backlog)
        self._reaper = asyncio.create_task(self._reap_silent_controls())
        logger.info("relay listening on %s", self.address)
        return self

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        if self._server is not None:
            self._server.close()
        for _, _, timer in self._pending.values():
            timer.cancel()
        self._pending.clear()
        for conn in list(self._conns):
            if conn.transport is not None:
                conn.transport.abort()
        self._conns.clear()
        for stream in list(self._zero_copy):
            stream.close()
        self._workers.clear()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self):
        return await self.start()

    async def __aexit__(self, *exc):
        await self.close()

    def __await__(self):
        return self.start().__await__()

    async def serve_forever(self) -> None:
        if self._server is None:
            await self.start()
        await self._server.serve_forever()

    @property
    def address(self) -> str:
        """``host:port`` the relay listens on (the real port when started with 0)."""
        if self._server is None or not self._server.sockets:
            raise ValueError("RelayServer is not started")
        host, port = self._server.sockets[0].getsockname()[:2]
        if ":" in host:
            host = f"[{host}]"
        return f"{host}:{port}"

    def worker_url(self, worker_id: str, host: str | None = None) -> str:
        """``relay://<host>:<port>/<worker_id>``; *host* defaults to the listen host."""
        from dask_lithops.relay.protocol import parse_relay_address, unparse_relay_address

        a = parse_relay_address(self.address)
        return unparse_relay_address(host or a.host, a.port, worker_id)

    # -- introspection (tests, benchmarks, dashboards) ---------------------

    @property
    def workers(self) -> list[str]:
        return sorted(self._workers)

    def buffered_bytes(self) -> int:
        """Bytes currently held by the relay for all streams (write buffers, pipes)."""
        return sum(c.transport.get_write_buffer_size() for c in self._conns
                   if c.transport is not None) + sum(z.buffered for z in self._zero_copy)

    def stats(self) -> dict:
        return {"workers": len(self._workers), "streams": self.streams // 2,
                "zero_copy_streams": len(self._zero_copy),
                "pending": len(self._pending),
                "connections": len(self._conns) + 2 * len(self._zero_copy),
                "bytes_relayed": self.bytes_relayed, "refused": self.refused,
                "buffered_bytes": self.buffered_bytes()}

    # -- protocol ----------------------------------------------------------

    def _refuse(self, conn: _Conn, op, wid, reason: str, *, fatal: bool, warn: bool) -> None:
        self.refused += 1
        self.refusals.append((time.time(), conn.peername, op, wid, reason))
        log = logger.warning if warn else logger.info
        log("relay: refused %s for worker %r from %s: %s", op, wid, conn.peername, reason)
        conn.send({"ok": False, "error": reason, "fatal": fatal})
        conn.state = _CLOSED
        conn.transport.close()

    def _on_hello(self, conn: _Conn, msg: dict) -> None:
        op, wid = msg.get("op"), msg.get("id")
        if op not in ("register", "connect", "accept"):
            self._refuse(conn, op, wid, "unknown operation", fatal=True, warn=True)
            return
        if not isinstance(wid, str) or not wid or "/" in wid or len(wid) > 512:
            self._refuse(conn, op, wid, "invalid worker id", fatal=True, warn=True)
            return
        if not check_mac(self._token, conn.nonce, msg):
            self._refuse(conn, op, wid, "invalid or missing relay token", fatal=True, warn=True)
            return
        getattr(self, "_on_" + op)(conn, wid, msg)

    def _on_register(self, conn: _Conn, wid: str, msg: dict) -> None:
        old = self._workers.get(wid)
        if old is not None and old is not conn:
            logger.info("relay: worker %r re-registered from %s; closing its old control "
                        "connection from %s", wid, conn.peername, old.peername)
            old.state = _CLOSED
            old.transport.close()
        self._workers[wid] = conn
        conn.state = _CONTROL
        conn.worker_id = wid
        conn.send({"ok": True, "heartbeat": self.heartbeat, "timeout": self.control_timeout})
        logger.info("relay: worker %r registered from %s", wid, conn.peername)
        conn.transport.resume_reading()
        if conn.inbuf:
            conn._process_frames()

    def _on_control(self, conn: _Conn, msg: dict) -> None:
        op = msg.get("op")
        if op == "ping":
            conn.send({"op": "pong"})
        elif op == "reject":
            pending = self._pending.get(str(msg.get("conn")))
            if pending is not None and pending[0] == conn.worker_id:
                self._fail_pending(str(msg.get("conn")),
                                   f"worker refused: {msg.get('error', 'unknown')}")

    def _control_lost(self, conn: _Conn) -> None:
        if self._workers.get(conn.worker_id) is conn:
            del self._workers[conn.worker_id]
            logger.info("relay: worker %r control connection closed", conn.worker_id)

    def _on_connect(self, conn: _Conn, wid: str, msg: dict) -> None:
        ctrl = self._workers.get(wid)
        if ctrl is None:
            # Not fatal: the worker may be (re-)registering right now.
            self._refuse(conn, "connect", wid, "worker not registered", fatal=False, warn=False)
            return
        cid = secrets.token_hex(16)
        conn.state = _WAITING
        conn.cid = cid
        conn.direct = msg.get("direct") is True
        timer = asyncio.get_running_loop().call_later(
            self.dial_timeout, self._fail_pending, cid, "worker did not dial back in time")
        self._pending[cid] = (wid, conn, timer)
        ctrl.send({"op": "dial", "conn": cid, "peer": conn.peername, "direct": conn.direct})

    def _fail_pending(self, cid: str, reason: str) -> None:
        entry = self._pending.pop(cid, None)
        if entry is None:
            return
        wid, conn, timer = entry
        timer.cancel()
        if conn.state == _WAITING:
            self._refuse(conn, "connect", wid, reason, fatal=False, warn=True)

    def _waiting_lost(self, conn: _Conn) -> None:
        entry = self._pending.pop(conn.cid, None)
        if entry is not None:
            entry[2].cancel()

    def _on_accept(self, conn: _Conn, wid: str, msg: dict) -> None:
        cid = msg.get("conn")
        entry = self._pending.get(cid) if isinstance(cid, str) else None
        if entry is None or entry[0] != wid:
            self._refuse(conn, "accept", wid, "no such pending connection", fatal=False,
                         warn=False)
            return
        del self._pending[cid]
        conn.direct = msg.get("direct") is True
        _, client, timer = entry
        timer.cancel()
        if client.state != _WAITING:
            self._refuse(conn, "accept", wid, "caller went away", fatal=False, warn=False)
            return
        self._splice(client, conn)

    def _splice(self, a: _Conn, b: _Conn) -> None:
        a.peer, b.peer = b, a
        a.state = b.state = _SPLICE
        self.streams += 2
        # each end learns where the relay saw the other come from: a direct path's target
        a.send({"ok": True, "peer": b.peername, "conn": a.cid, "direct": b.direct})
        b.send({"ok": True, "peer": a.peername, "direct": a.direct})
        if self._start_zero_copy(a, b):
            return
        for src, dst in ((a, b), (b, a)):
            if src.inbuf:  # bytes a peer sent early, after its hello
                dst.transport.write(bytes(src.inbuf))
                src.inbuf.clear()
        a.transport.resume_reading()
        b.transport.resume_reading()

    def _start_zero_copy(self, a: _Conn, b: _Conn) -> bool:
        """Hand both sockets over to a :class:`_ZeroCopyStream` if possible."""
        if not self.zero_copy or self._tap is not None or a.inbuf or b.inbuf:
            return False
        if a.transport.get_write_buffer_size() or b.transport.get_write_buffer_size():
            return False  # the "ok" replies are not out yet: stay with the transports
        socks: list[socket.socket] = []
        fds: list[int] = []
        try:
            for c in (a, b):
                socks.append(c.transport.get_extra_info("socket").dup())
            cap = self.pipe_bytes
            pipes = []
            for _ in range(2):
                r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
                fds += (r, w)
                pipes.append((r, w))
                try:
                    size = fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, cap)
                except OSError:  # over /proc/sys/fs/pipe-max-size or the user's pipe quota
                    size = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
                cap = min(cap, size)
        except OSError as e:  # out of file descriptors, most likely
            logger.info("relay: zero-copy splice unavailable (%s); using the buffered copy", e)
            for sock in socks:
                sock.close()
            for fd in fds:
                os.close(fd)
            return False
        for c in (a, b):
            # The transports let go of their sockets (our dups keep the connections
            # open); reading is paused on both since the hello, so nothing is in flight.
            c.state = _DETACHED
            c.peer = None
            c.transport.abort()
        stream = _ZeroCopyStream(self, socks[0], socks[1], pipes, cap)
        self._zero_copy.add(stream)
        stream.start()
        return True

    async def _reap_silent_controls(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat)
            if not any(c.last_seen < time.monotonic() - self.control_timeout
                       for c in self._workers.values()):
                continue
            # Our own loop may have been the one stalled: let pending reads run first.
            await asyncio.sleep(0)
            limit = time.monotonic() - self.control_timeout
            for wid, conn in list(self._workers.items()):
                if conn.last_seen < limit:
                    logger.warning("relay: worker %r silent for %.0fs; dropping its control "
                                   "connection", wid, time.monotonic() - conn.last_seen)
                    conn.transport.abort()
