"""The ``relay://`` comm backend (registered via the ``distributed.comm.backends`` entry point).

Address: ``relay://<relay-host>:<relay-port>/<worker-id>``.

*Connecting* to such an address opens a TCP connection to the relay, proves
the token, and waits while the relay has the worker dial back; the returned
comm is distributed's own :class:`~distributed.comm.tcp.TCP` (or ``TLS``) on
that socket, so framing, sharding and serialization are exactly distributed's.

*Listening* on such an address keeps a control connection to the relay
(re-established with backoff when it drops) and answers each ``dial`` by
opening a fresh connection back, which becomes an incoming comm.

When the connection arguments carry an ``ssl_context`` (a TLS-enabled
``Security``), TLS is negotiated inside the spliced stream, end to end between
the two Dask processes: the relay only ever sees ciphertext.

The token is taken, in order, from the ``extra_conn_args={"relay_token": ...}``
of the ``Security`` in use (connection args for connectors; the owning
server's ``security`` for listeners, since distributed does not pass
``extra_conn_args`` to listeners), then from ``$DASK_LITHOPS_RELAY_TOKEN``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import ssl

import dask
from dask.utils import parse_timedelta
from distributed.comm.core import BaseListener, CommClosedError, Connector, FatalCommClosedError
from distributed.comm.registry import Backend
from distributed.comm.tcp import MAX_BUFFER_SIZE, TCP, TLS
from distributed.utils import ensure_ip, get_ip
from tornado.iostream import IOStream, StreamClosedError

from dask_lithops.relay import direct
from dask_lithops.relay.protocol import (
    HEADER,
    MAX_FRAME,
    PREFIX,
    TOKEN_ENV,
    RelayAddress,
    RelayProtocolError,
    RelayRefused,
    client_handshake,
    open_relay_socket,
    pack,
    parse_relay_address,
    unpack,
)

logger = logging.getLogger("dask_lithops.relay")


def _backoff_bounds() -> tuple[float, float]:
    """First and longest wait between control reconnects (``lithops.relay.*``)."""
    first = parse_timedelta(dask.config.get("lithops.relay.reconnect_interval", "50ms"),
                            default="seconds")
    most = parse_timedelta(dask.config.get("lithops.relay.max_reconnect_interval", "5s"),
                           default="seconds")
    return first, max(first, most)


class RelayTCP(TCP):
    """A plain comm spliced through the relay (distributed's TCP framing)."""


class RelayTLS(TLS):
    """A TLS comm whose handshake ran end to end through the relay."""


def _timeout(name: str = "connect") -> float:
    return parse_timedelta(dask.config.get(f"distributed.comm.timeouts.{name}"), default="seconds")


def _token_from_args(connection_args: dict) -> str | None:
    extra = connection_args.get("extra_conn_args") or {}
    return extra.get("relay_token") or connection_args.get("relay_token")


def _sockname(sock: socket.socket, scheme: str) -> str:
    try:
        host, port = sock.getsockname()[:2]
    except OSError:
        return scheme + "unknown:0"
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}{host}:{port}"


def _check_encryption(address: str, connection_args: dict) -> ssl.SSLContext | None:
    ctx = connection_args.get("ssl_context")
    if ctx is not None and not isinstance(ctx, ssl.SSLContext):
        raise TypeError(f"relay expects ssl_context to be an ssl.SSLContext, got {ctx!r}")
    if ctx is None and connection_args.get("require_encryption"):
        raise RuntimeError("encryption required by Dask configuration, refusing "
                           f"communication from/to {PREFIX + address!r} (no TLS configured)")
    return ctx


class RelayConnector(Connector):
    prefix = PREFIX

    def __init__(self):
        self.encrypted = False

    async def connect(self, address, deserialize=True, **connection_args):
        ctx = _check_encryption(address, connection_args)
        self.encrypted = ctx is not None
        a = parse_relay_address(address)
        if not a.worker_id:
            raise ValueError(f"relay address {PREFIX + address!r} names no worker id")
        token = _token_from_args(connection_args) or os.environ.get(TOKEN_ENV)
        if not token:
            raise FatalCommClosedError(
                f"no relay token to connect to {PREFIX + address}: use Security("
                "extra_conn_args={'relay_token': ...}) or $" + TOKEN_ENV)

        key = f"{a.relay}/{a.worker_id}"
        want_direct = direct.enabled() and direct.worth_trying(key)
        sock = await open_relay_socket(a.host, a.port, reusable=want_direct)
        try:
            reply = await client_handshake(sock, token, "connect", a.worker_id,
                                           direct=want_direct)
            sock = await _connector_path(sock, reply, token, want_direct, key)
        except RelayRefused as e:
            sock.close()
            if e.fatal:
                raise FatalCommClosedError(f"{PREFIX + address}: {e}") from None
            raise CommClosedError(f"{PREFIX + address}: {e}") from None
        except BaseException:
            sock.close()
            raise

        local = _sockname(sock, "tls://" if ctx else "tcp://")
        stream = IOStream(sock, max_buffer_size=MAX_BUFFER_SIZE)
        if ctx is None:
            return RelayTCP(stream, local, PREFIX + address, deserialize)
        try:
            stream = await stream.start_tls(
                False, ssl_options=ctx, server_hostname=connection_args.get("server_hostname"))
        except ssl.SSLCertVerificationError as e:
            stream.close()
            raise FatalCommClosedError(
                f"TLS certificate of {PREFIX + address} does not verify: {e}") from e
        except ssl.SSLError as e:
            stream.close()
            raise FatalCommClosedError(f"TLS through relay to {PREFIX + address}: {e}") from e
        except StreamClosedError as e:
            stream.close()
            raise CommClosedError(f"TLS through relay to {PREFIX + address}: "
                                  f"{e.real_error or e}") from e
        except BaseException:
            stream.close()
            raise
        return RelayTLS(stream, local, PREFIX + address, deserialize)


class RelayListener(BaseListener):
    """Listen on ``relay://host:port/id`` by keeping a control connection to the relay.

    Which id gets registered (the id peers dial):

    * a Worker whose ``contact_address`` is a relay URL registers that URL
      (relay host, port and id all from it);
    * a Nanny registers the id in its listen address if there is one, else
      ``<its worker's contact id>-nanny`` (``Nanny.contact_address`` is the
      worker's address);
    * anything else registers the id in the listen address, which must then
      be a full ``relay://host:port/id``.
    """

    prefix = PREFIX

    def __init__(self, loc, handle_comm, deserialize=True, allow_offload=True,
                 default_host=None, default_port=0, **connection_args):
        super().__init__()
        self._loc = loc
        self.comm_handler = handle_comm
        self.deserialize = deserialize
        self.allow_offload = allow_offload
        self.connection_args = connection_args
        self.ssl_context = _check_encryption(loc, connection_args)
        self.encrypted = self.ssl_context is not None
        self.address: RelayAddress | None = None
        self._token: str | None = None
        self._control: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._writer: asyncio.StreamWriter | None = None
        self._stopped = False
        self.registrations = 0

    # -- address / token resolution ------------------------------------------

    def _server(self):
        return getattr(self.comm_handler, "__self__", None)

    def _resolve_address(self) -> RelayAddress:
        loc = parse_relay_address(self._loc, default_port=0) if self._loc else None
        server = self._server()
        contact = getattr(server, "contact_address", None)
        contact_a = (parse_relay_address(contact)
                     if isinstance(contact, str) and contact.startswith(PREFIX) else None)
        is_nanny = any(c.__name__ == "Nanny" and c.__module__.startswith("distributed.")
                       for c in type(server).__mro__)
        if is_nanny:
            if loc is not None and loc.worker_id and loc.port:
                return loc
            if contact_a is None:
                raise ValueError("a Nanny behind the relay needs contact_address="
                                 "'relay://host:port/<worker-id>' (see dask_lithops.relay."
                                 "worker_addresses) or a full relay listen address")
            wid = loc.worker_id if loc is not None and loc.worker_id else \
                f"{contact_a.worker_id}-nanny"
            if loc is not None and loc.port:
                return RelayAddress(loc.host, loc.port, wid)
            return RelayAddress(contact_a.host, contact_a.port, wid)
        if contact_a is not None and contact_a.worker_id:
            return contact_a
        if loc is None or not loc.worker_id or not loc.port:
            raise ValueError(f"cannot listen on {PREFIX + (self._loc or '')!r}: a relay listen "
                             "address is relay://<relay-host>:<port>/<worker-id> (or pass "
                             "the worker contact_address=relay://...; see "
                             "dask_lithops.relay.worker_addresses)")
        return loc

    def _resolve_token(self) -> str:
        token = _token_from_args(self.connection_args)
        server = self._server()
        if not token and server is not None:
            sec = getattr(server, "security", None)
            token = (getattr(sec, "extra_conn_args", None) or {}).get("relay_token")
        token = token or os.environ.get(TOKEN_ENV)
        if not token:
            raise ValueError("no relay token for the relay listener: use Security("
                             "extra_conn_args={'relay_token': ...}) or $" + TOKEN_ENV)
        return token

    # -- Listener API ------------------------------------------------------

    async def start(self):
        self.address = self._resolve_address()
        if self.address.host in ("", "0.0.0.0", "::", "[::]"):
            raise ValueError(f"relay address {self.address.url!r} needs a concrete relay host")
        self._token = self._resolve_token()
        first = asyncio.get_running_loop().create_future()
        self._control = asyncio.create_task(self._control_loop(first))
        timeout = _timeout("connect")
        try:
            await asyncio.wait_for(asyncio.shield(first), timeout)
        except asyncio.TimeoutError:
            self.stop()
            raise OSError(f"could not register {self.address.url} with the relay within "
                          f"{timeout}s") from None
        except BaseException:
            self.stop()
            raise

    def stop(self):
        self._stopped = True
        if self._control is not None:
            self._control.cancel()
            self._control = None
        for t in list(self._tasks):
            t.cancel()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    @property
    def listen_address(self):
        if self.address is None:
            raise ValueError("relay listener not started")
        return self.address.url

    @property
    def contact_address(self):
        return self.listen_address

    # -- control connection ------------------------------------------------

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _control_loop(self, first: asyncio.Future) -> None:
        a = self.address
        first_backoff, max_backoff = _backoff_bounds()
        backoff = first_backoff
        while not self._stopped:
            writer = None
            try:
                sock = await asyncio.wait_for(open_relay_socket(a.host, a.port), _timeout())
                try:
                    reply = await asyncio.wait_for(
                        client_handshake(sock, self._token, "register", a.worker_id),
                        _timeout())
                except BaseException:
                    sock.close()
                    raise
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                reader, writer = await asyncio.open_connection(sock=sock)
                self._writer = writer
                self.registrations += 1
                heartbeat = float(reply.get("heartbeat", 5.0))
                silence = max(float(reply.get("timeout", 60.0)), 3 * heartbeat)
                if first.done():
                    logger.info("re-registered %s with the relay", a.url)
                else:
                    first.set_result(None)
                    logger.debug("registered %s with the relay", a.url)
                backoff = first_backoff
                pinger = asyncio.create_task(self._ping(writer, heartbeat))
                try:
                    while True:
                        msg = await asyncio.wait_for(_read_frame(reader), silence)
                        if msg.get("op") == "dial" and isinstance(msg.get("conn"), str):
                            self._spawn(self._dial_back(msg["conn"], msg.get("peer"),
                                                        msg.get("direct") is True))
                finally:
                    pinger.cancel()
            except asyncio.CancelledError:
                if writer is not None:
                    writer.close()
                raise
            except RelayRefused as e:
                if e.fatal:
                    logger.error("relay at %s refused to register %r: %s", a.relay,
                                 a.worker_id, e.reason)
                    if not first.done():
                        first.set_exception(e)
                        return
                else:
                    logger.info("relay at %s refused to register %r: %s", a.relay,
                                a.worker_id, e.reason)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError,
                    RelayProtocolError) as e:
                if not self._stopped:
                    log = logger.warning if first.done() else logger.info
                    log("relay control connection for %s to %s %s (%s: %s); retrying",
                        a.worker_id, a.relay, "lost" if first.done() else "failed",
                        type(e).__name__, e)
            finally:
                if writer is not None:
                    writer.close()
                    if self._writer is writer:
                        self._writer = None
            if self._stopped:
                return
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, max_backoff)

    async def _ping(self, writer: asyncio.StreamWriter, heartbeat: float) -> None:
        frame = pack({"op": "ping"})
        try:
            while True:
                await asyncio.sleep(heartbeat)
                writer.write(frame)
                await writer.drain()
        except (OSError, RuntimeError):
            writer.close()

    async def _dial_back(self, cid: str, peer: str | None, peer_direct: bool = False) -> None:
        a = self.address
        peer_addr = ("tls://" if self.ssl_context else "tcp://") + (peer or "unknown:0")
        stream = None
        want_direct = peer_direct and direct.enabled()
        try:
            sock = await asyncio.wait_for(
                open_relay_socket(a.host, a.port, reusable=want_direct), _timeout())
            try:
                reply = await asyncio.wait_for(
                    client_handshake(sock, self._token, "accept", a.worker_id, cid,
                                     direct=want_direct), _timeout())
                sock = await _acceptor_path(sock, reply, self._token, cid, want_direct)
            except BaseException:
                sock.close()
                raise
            stream = IOStream(sock, max_buffer_size=MAX_BUFFER_SIZE)
            if self.ssl_context is not None:
                try:
                    stream = await asyncio.wait_for(
                        stream.start_tls(True, ssl_options=self.ssl_context), _timeout())
                except (OSError, ssl.SSLError, StreamClosedError, asyncio.TimeoutError) as e:
                    logger.warning("relay listener %s: TLS handshake with %s failed: %s",
                                   a.url, peer_addr, getattr(e, "real_error", None) or e)
                    stream.close()
                    return
                comm = RelayTLS(stream, a.url, peer_addr, self.deserialize)
            else:
                comm = RelayTCP(stream, a.url, peer_addr, self.deserialize)
        except (OSError, asyncio.TimeoutError, RelayProtocolError) as e:
            logger.info("relay listener %s: dial-back for %s failed: %s", a.url, peer_addr, e)
            if stream is not None:
                stream.close()
            return
        comm.allow_offload = self.allow_offload
        if self._stopped:
            comm.abort()
            return
        try:
            await self.on_connection(comm)
        except CommClosedError:
            logger.info("connection from %s through relay closed before handshake completed",
                        peer_addr)
            return
        await self.comm_handler(comm)


async def _connector_path(leg: socket.socket, reply: dict, token: str, want_direct: bool,
                          key: str) -> socket.socket:
    """Try the direct path if both ends want it; announce the outcome on the relay leg."""
    loop = asyncio.get_running_loop()
    chosen = None
    if want_direct and reply.get("direct") is True:
        peer, cid = direct.parse_endpoint(reply.get("peer")), reply.get("conn")
        if peer is not None and isinstance(cid, str):
            chosen = await direct.open_direct(leg, peer, token=token, conn=cid, role="connect",
                                              timeout=direct.attempt_timeout())
            if chosen is None:
                direct.remember_failure(key)
    if chosen is None:
        await loop.sock_sendall(leg, direct.USE_RELAY)
        return leg
    try:
        await loop.sock_sendall(leg, direct.USE_DIRECT)
    except BaseException:
        chosen.close()
        raise
    leg.close()
    return chosen


async def _acceptor_path(leg: socket.socket, reply: dict, token: str, cid: str,
                         want_direct: bool) -> socket.socket:
    """Try the direct path alongside the connector; take the one its first byte names."""
    loop = asyncio.get_running_loop()
    attempt = None
    peer = direct.parse_endpoint(reply.get("peer"))
    if want_direct and reply.get("direct") is True and peer is not None:
        attempt = asyncio.ensure_future(direct.open_direct(
            leg, peer, token=token, conn=cid, role="accept", timeout=direct.attempt_timeout()))
    try:
        choice = await asyncio.wait_for(loop.sock_recv(leg, 1), _timeout())
    except BaseException:
        _drop(attempt)
        raise
    if choice == direct.USE_DIRECT and attempt is not None:
        chosen = await asyncio.wait_for(attempt, direct.attempt_timeout() + _timeout())
        if chosen is None:
            raise ConnectionError("the connecting side chose a direct path that failed here")
        leg.close()
        return chosen
    _drop(attempt)
    if choice != direct.USE_RELAY:
        raise RelayProtocolError(f"unexpected path choice {choice!r} from the connecting side")
    return leg


def _drop(attempt: asyncio.Future | None) -> None:
    """Abandon a direct attempt, closing its socket if it got one anyway."""
    if attempt is not None:
        attempt.cancel()
        attempt.add_done_callback(direct.close_result)


async def _read_frame(reader: asyncio.StreamReader) -> dict:
    (n,) = HEADER.unpack(await reader.readexactly(HEADER.size))
    if n > MAX_FRAME:
        raise RelayProtocolError("oversized control frame")
    return unpack(await reader.readexactly(n))


class RelayBackend(Backend):
    def get_connector(self):
        return RelayConnector()

    def get_listener(self, loc, handle_comm, deserialize, **connection_args):
        return RelayListener(loc, handle_comm, deserialize, **connection_args)

    def get_address_host(self, loc):
        return parse_relay_address(loc, default_port=0).host

    def get_address_host_port(self, loc):
        a = parse_relay_address(loc)
        return a.host, a.port

    def resolve_address(self, loc):
        a = parse_relay_address(loc, default_port=0)
        return RelayAddress(ensure_ip(a.host), a.port, a.worker_id).loc

    def get_local_address_for(self, loc):
        a = parse_relay_address(loc, default_port=0)
        local = get_ip(ensure_ip(a.host))
        return f"[{local}]" if ":" in local else local
