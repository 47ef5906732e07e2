"""The SSH transport every standalone layer uses: connections, commands, files, tunnels.

:func:`connect` opens one authenticated, host-key-checked paramiko connection
to a :class:`HostSpec` (``user@host:port``, key or agent authentication); unknown
host keys are rejected unless the caller opts into trust-on-first-use.  Every
failure is an :class:`SSHError` naming the host.  An :class:`SSHConnection`
runs commands, writes and reads files over SFTP (0600 before the first byte)
and forwards local ports (:class:`Tunnel`, ``ssh -L``).

paramiko is blocking, so every call the async layers make goes through
:func:`run_in_ssh_thread` (a dedicated thread pool), never the event loop.
Nothing here knows where hosts come from (that is :mod:`.providers`) or what
runs on them (:mod:`.hosts`, :mod:`.launchers`).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import getpass
import logging
import os
import select
import shlex
import socket
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

logger = logging.getLogger(__name__)

_EXECUTOR = ThreadPoolExecutor(max_workers=64, thread_name_prefix="dask-lithops-ssh")


async def run_in_ssh_thread(fn, *args, **kwargs):
    """Run a blocking (paramiko) call in the SSH thread pool."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_EXECUTOR, functools.partial(fn, *args, **kwargs))


# -- addresses -------------------------------------------------------------------------------
@dataclass(frozen=True)
class HostSpec:
    """A host to SSH to, with what a provider knows about reaching it.

    ``key_filename``, ``known_hosts`` and ``trust_unknown_hosts`` override the
    connection defaults when set (EC2: the generated key, the
    pinned host keys).  ``id`` is the provider's name for the host (EC2: the
    instance id).
    """

    host: str
    user: str
    port: int = 22
    key_filename: str | None = None
    known_hosts: str | None = None
    trust_unknown_hosts: bool | None = None
    id: str | None = None

    @classmethod
    def parse(cls, entry: str | HostSpec | dict, user: str | None = None,
              port: int = 22) -> HostSpec:
        """``host``, ``user@host``, ``user@host:port``, ``[v6addr]:port`` or a dict."""
        if isinstance(entry, HostSpec):
            return entry
        if isinstance(entry, dict):
            return cls(entry["host"], entry.get("user") or user or getpass.getuser(),
                       int(entry.get("port", port)))
        if not isinstance(entry, str) or not entry.strip():
            raise ValueError(f"SSH host entry {entry!r}: expected 'user@host:port', 'host' or a dict")
        rest = entry.strip()
        if "@" in rest:
            user, rest = rest.rsplit("@", 1)
        if rest.startswith("["):
            host, _, tail = rest[1:].partition("]")
            if tail.startswith(":"):
                port = tail[1:]
        elif rest.count(":") == 1:
            host, port = rest.split(":")
        else:
            host = rest
        try:
            port = int(port)
        except ValueError:
            raise ValueError(f"SSH host entry {entry!r}: port {port!r} is not a number") from None
        return cls(host, user or getpass.getuser(), port)

    def connect_kwargs(self, defaults: dict) -> dict:
        """``defaults`` (keywords of :func:`connect`) with this host's overrides."""
        out = dict(defaults)
        for key in ("key_filename", "known_hosts", "trust_unknown_hosts"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}:{self.port}"



# -- errors ------------------------------------------------------------------------------------
class SSHError(RuntimeError):
    """Any SSH failure; ``host`` names the ``user@host:port`` entry."""

    def __init__(self, host: str, message: str):
        self.host = str(host)
        super().__init__(f"{host}: {message}")


class SSHUnreachableError(SSHError):
    """The host refused or could not be routed to."""


class SSHTimeoutError(SSHError):
    """Connecting, authenticating or a command took longer than allowed."""


class SSHAuthenticationError(SSHError):
    """No offered key (file or agent) was accepted."""


class SSHKeyFileError(SSHError):
    """A given private key file does not exist or cannot be read."""


class SSHHostKeyError(SSHError):
    """The host's key is unknown (and trust-on-first-use is off) or does not match."""


class SSHCommandError(SSHError):
    """A remote command exited non-zero."""

    def __init__(self, host: str, command: str, returncode: int, stdout: str, stderr: str):
        self.command, self.returncode, self.stdout, self.stderr = command, returncode, stdout, stderr
        tail = (stderr.strip() or stdout.strip())[-3000:]
        super().__init__(host, f"remote command failed with exit code {returncode}: {tail}")


class SSHConnectErrors(SSHError):
    """Several hosts failed to connect; ``errors`` maps each host to its error."""

    def __init__(self, errors: dict[str, SSHError]):
        self.errors = errors
        lines = "\n  ".join(str(e) for e in errors.values())
        super().__init__(", ".join(errors), f"{len(errors)} hosts failed:\n  {lines}")


def combine_errors(errors: dict[str, BaseException]) -> BaseException:
    """One exception for failures on several hosts; of their class when they share one."""
    if len(errors) == 1:
        return next(iter(errors.values()))
    kinds = {type(e) for e in errors.values()}
    if len(kinds) == 1:
        kind = kinds.pop()
        if issubclass(kind, SSHError) and kind is not SSHCommandError:
            err = kind.__new__(kind)
            lines = "\n  ".join(str(e) for e in errors.values())
            SSHError.__init__(err, ", ".join(errors), f"{len(errors)} hosts failed:\n  {lines}")
            err.errors = errors
            return err
    return SSHConnectErrors(errors)


# -- host key policies -------------------------------------------------------------------------
def _paramiko():
    try:
        import paramiko
    except ImportError as e:  # pragma: no cover
        raise ImportError("the SSH backend needs paramiko: pip install 'dask-lithops[ssh]'") from e
    return paramiko


class _UnknownHostKey(Exception):
    pass


def _make_policy(trust_unknown_hosts: bool, known_hosts: str | None):
    paramiko = _paramiko()

    class Policy(paramiko.MissingHostKeyPolicy):
        def missing_host_key(self, client, hostname, key):
            if not trust_unknown_hosts:
                raise _UnknownHostKey(
                    f"host key ({key.get_name()} {key.get_fingerprint().hex()}) is not in "
                    f"{known_hosts or '~/.ssh/known_hosts'}; add it (ssh-keyscan) or pass "
                    "trust_unknown_hosts=True (config lithops.ssh.trust_unknown_hosts) to trust "
                    "it on first use")
            warnings.warn(
                f"{hostname}: trusting unknown SSH host key {key.get_name()} "
                f"{key.get_fingerprint().hex()} on first use (trust_unknown_hosts=True)",
                UserWarning, stacklevel=2)
            client.get_host_keys().add(hostname, key.get_name(), key)

    return Policy()


# -- connection --------------------------------------------------------------------------------
@dataclass
class CommandResult:
    returncode: int
    stdout: str
    stderr: str


class SSHConnection:
    """One authenticated connection (blocking API; call it from the SSH thread pool)."""

    def __init__(self, spec: HostSpec, client):
        self.spec = spec
        self.client = client
        self._sftp = None
        self._sftp_lock = threading.Lock()
        self._tunnels: list[Tunnel] = []

    @property
    def host(self) -> str:
        return self.spec.host

    def __str__(self) -> str:
        return str(self.spec)

    @property
    def transport(self):
        t = self.client.get_transport()
        if t is None or not t.is_active():
            raise SSHUnreachableError(str(self.spec), "SSH connection is closed")
        return t

    def is_active(self) -> bool:
        t = self.client.get_transport()
        return t is not None and t.is_active()

    def run(self, command: str, input: bytes | str | None = None, timeout: float | None = 60,
            check: bool = True) -> CommandResult:
        """Run ``command`` through the login shell; return its exit code and output."""
        try:
            chan = self.transport.open_session(timeout=timeout)
        except Exception as e:
            if isinstance(e, SSHError):
                raise
            raise SSHUnreachableError(str(self.spec), f"cannot open a session: {e}") from e
        deadline = None if timeout is None else time.monotonic() + timeout
        out, err = [], []
        with chan:
            chan.exec_command(command)
            if input is not None:
                chan.sendall(input.encode() if isinstance(input, str) else input)
            chan.shutdown_write()
            while True:
                while chan.recv_ready():
                    out.append(chan.recv(1 << 16))
                while chan.recv_stderr_ready():
                    err.append(chan.recv_stderr(1 << 16))
                if chan.exit_status_ready() and not chan.recv_ready() \
                        and not chan.recv_stderr_ready():
                    if chan.eof_received or chan.closed:
                        break
                if deadline is not None and time.monotonic() > deadline:
                    raise SSHTimeoutError(str(self.spec),
                                          f"command timed out after {timeout}s: {command[:200]}")
                select.select([chan], [], [], 0.5)
            rc = chan.recv_exit_status()
        stdout = b"".join(out).decode(errors="replace")
        stderr = b"".join(err).decode(errors="replace")
        if check and rc != 0:
            raise SSHCommandError(str(self.spec), command[:200], rc, stdout, stderr)
        return CommandResult(rc, stdout, stderr)

    def exec_channel(self, command: str):
        """Start ``command`` and return its open channel (stdin stays open: a tether)."""
        chan = self.transport.open_session(timeout=30)
        chan.exec_command(command)
        return chan

    # -- files -----------------------------------------------------------------------------
    @property
    def sftp(self):
        with self._sftp_lock:
            if self._sftp is None:
                self._sftp = self.client.open_sftp()
            return self._sftp

    def put(self, data: bytes | str, path: str, mode: int = 0o600) -> None:
        """Write ``data`` to ``path`` with ``mode`` set before any byte is written."""
        data = data.encode() if isinstance(data, str) else data
        with self.sftp.open(path, "wb") as f:
            f.chmod(mode)
            f.set_pipelined(True)
            f.write(data)

    def get(self, path: str, max_bytes: int | None = None) -> bytes:
        """Read ``path`` (only its last ``max_bytes`` when given)."""
        sftp = self.sftp
        with sftp.open(path, "rb") as f:
            if max_bytes is not None:
                size = f.stat().st_size
                if size > max_bytes:
                    f.seek(size - max_bytes)
            f.prefetch()
            return f.read()

    # -- tunnels ---------------------------------------------------------------------------
    def forward_local(self, remote_host: str, remote_port: int, local_host: str = "127.0.0.1",
                      local_port: int = 0) -> Tunnel:
        """Listen on ``local_host:local_port`` and tunnel each connection to the remote end."""
        t = Tunnel(self, remote_host, remote_port, local_host, local_port).start()
        self._tunnels.append(t)
        return t

    def close(self) -> None:
        for t in self._tunnels:
            t.close()
        self._tunnels.clear()
        if self._sftp is not None:
            try:
                self._sftp.close()
            except Exception:
                pass
            self._sftp = None
        self.client.close()


def connect(host: str | HostSpec, *, user: str | None = None, port: int = 22,
            key_filename: str | list[str] | None = None, known_hosts: str | None = None,
            trust_unknown_hosts: bool = False, allow_agent: bool = True,
            connect_timeout: float = 10.0, keepalive: float = 10.0) -> SSHConnection:
    """Open an authenticated, host-key-checked connection (blocking)."""
    paramiko = _paramiko()
    spec = HostSpec.parse(host, user=user, port=port)
    name = str(spec)
    client = paramiko.SSHClient()
    if known_hosts:
        known_hosts = os.path.expanduser(known_hosts)
        if os.path.exists(known_hosts):
            client.load_host_keys(known_hosts)
        elif not trust_unknown_hosts:
            raise SSHHostKeyError(name, f"known_hosts file {known_hosts} does not exist")
    else:
        client.load_system_host_keys()
    client.set_missing_host_key_policy(_make_policy(trust_unknown_hosts, known_hosts))
    keys = [key_filename] if isinstance(key_filename, str) else key_filename
    keys = [os.path.expanduser(k) for k in keys] if keys else None
    for k in keys or ():
        if not os.access(k, os.R_OK):
            client.close()
            why = "does not exist" if not os.path.exists(k) else "is not readable"
            raise SSHKeyFileError(name, f"SSH key file {k} {why} (lithops.ssh.ssh_key_filename)")
    try:
        client.connect(spec.host, port=spec.port, username=spec.user, key_filename=keys,
                       allow_agent=allow_agent, look_for_keys=keys is None,
                       timeout=connect_timeout, banner_timeout=connect_timeout,
                       auth_timeout=connect_timeout, channel_timeout=connect_timeout,
                       compress=False)
    except _UnknownHostKey as e:
        client.close()
        raise SSHHostKeyError(name, str(e)) from None
    except paramiko.BadHostKeyException as e:
        client.close()
        raise SSHHostKeyError(
            name, f"host key mismatch: got {e.key.get_name()} {e.key.get_fingerprint().hex()}, "
                  f"known_hosts has {e.expected_key.get_fingerprint().hex()} (possible "
                  "man-in-the-middle, or the host was reinstalled)") from None
    except paramiko.AuthenticationException as e:
        client.close()
        offered = f"key {', '.join(keys)}" if keys else "default keys"
        raise SSHAuthenticationError(
            name, f"authentication as {spec.user!r} failed ({offered}"
                  f"{' and agent' if allow_agent else ''}): {e}") from None
    except TimeoutError as e:
        client.close()
        raise SSHTimeoutError(name, f"connection timed out after {connect_timeout}s") from e
    except paramiko.ssh_exception.NoValidConnectionsError as e:
        client.close()
        reasons = "; ".join(f"{a[0]}: {err.strerror or err}" for a, err in e.errors.items())
        raise SSHUnreachableError(name, f"unreachable ({reasons})") from None
    except paramiko.SSHException as e:
        client.close()
        if "banner" in str(e).lower():
            raise SSHTimeoutError(name, f"no SSH banner within {connect_timeout}s ({e})") from None
        raise SSHError(name, f"SSH negotiation failed: {e}") from None
    except OSError as e:
        client.close()
        if e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ECONNREFUSED,
                       errno.ECONNRESET) or isinstance(e, socket.gaierror):
            raise SSHUnreachableError(name, f"unreachable ({e.strerror or e})") from None
        raise SSHUnreachableError(name, f"connection failed ({e})") from None
    transport = client.get_transport()
    if keepalive:
        transport.set_keepalive(int(keepalive))
    return SSHConnection(spec, client)


def connect_defaults(ssh: dict) -> dict:
    """:func:`connect` keywords from resolved ``lithops.ssh`` options."""
    return dict(key_filename=ssh.get("ssh_key_filename"), known_hosts=ssh.get("known_hosts"),
                trust_unknown_hosts=bool(ssh.get("trust_unknown_hosts")),
                connect_timeout=float(ssh.get("connect_timeout") or 10.0))


# -- local port forwarding ---------------------------------------------------------------------
class Tunnel:
    """A local listener whose connections are forwarded over SSH (``ssh -L``)."""

    def __init__(self, conn: SSHConnection, remote_host: str, remote_port: int,
                 local_host: str = "127.0.0.1", local_port: int = 0):
        self.conn = conn
        self.remote = (remote_host, int(remote_port))
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((local_host, local_port))
        self.local_address = self._sock.getsockname()[:2]
        self._closed = False
        self._pairs: set = set()
        self._lock = threading.Lock()

    @property
    def local_port(self) -> int:
        return self.local_address[1]

    def start(self) -> Tunnel:
        self._sock.listen(128)
        threading.Thread(target=self._accept_loop, daemon=True,
                         name=f"ssh-tunnel-{self.local_port}").start()
        return self

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                sock, peer = self._sock.accept()
            except OSError:
                return
            try:
                chan = self.conn.transport.open_channel("direct-tcpip", self.remote, peer,
                                                        timeout=10)
            except Exception as e:
                logger.warning("%s: tunnel to %s:%s failed: %s", self.conn, *self.remote, e)
                sock.close()
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._pairs.add((sock, chan))
            threading.Thread(target=self._pump, args=(sock, chan), daemon=True).start()

    def _pump(self, sock, chan) -> None:
        try:
            while True:
                r, _, _ = select.select([sock, chan], [], [])
                if sock in r:
                    data = sock.recv(1 << 16)
                    if not data:
                        break
                    chan.sendall(data)
                if chan in r:
                    data = chan.recv(1 << 16)
                    if not data:
                        break
                    sock.sendall(data)
        except (OSError, EOFError):
            pass
        finally:
            with self._lock:
                self._pairs.discard((sock, chan))
            chan.close()
            sock.close()

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        with self._lock:
            pairs = list(self._pairs)
        for sock, chan in pairs:
            chan.close()
            sock.close()


def quote(s: str) -> str:
    return shlex.quote(s)
