"""relay:// comm: workers that accept no inbound connection, reached through the relay.

Two layers:

* in-process (loopback, no root): the comm, Worker and Nanny behind a relay,
  token refusal, TLS ciphertext-only splicing, backpressure, 1,000 streams;
* network namespaces (root): real ``dask worker`` processes in outbound-only
  sandboxes, a real ``dask-lithops relay`` process and the scheduler on the
  host's bridge address.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import dask
import dask.array as da
import dask.bag as db
import dask.dataframe
import numpy as np
import pandas as pd
import pytest
from distributed import Client, LocalCluster, Nanny, Scheduler, Security, Worker
from distributed.comm import connect, listen
from distributed.comm.core import CommClosedError, FatalCommClosedError

from dask_lithops.relay import (
    RelayServer,
    parse_relay_address,
    relay_security,
    worker_addresses,
)
from dask_lithops.relay.comm import RelayBackend, RelayTLS
from dask_lithops.relay.protocol import (
    TOKEN_ENV,
    client_handshake,
    open_relay_socket,
    recv_frame,
)
from dask_lithops.relay.server import ZERO_COPY_AVAILABLE
from dask_lithops.testing.netns import Bridge, NetnsHost, netns_available, nft_available

TOKEN = "t0ken-" + uuid.uuid4().hex
WRONG = "wr0ng-" + uuid.uuid4().hex
DASK = os.path.join(os.path.dirname(sys.executable), "dask")

pytestmark = pytest.mark.timeout(120)

# Both ways the relay forwards bytes: os.splice (Linux) and the buffered copy.
@pytest.fixture(autouse=True)
def splice_unless_direct():
    """Most tests here are about the relay's splice: direct paths are off unless a test
    turns them on (``lithops.relay.direct``, on by default for users)."""
    with dask.config.set({"lithops.relay.direct": False}):
        yield


copy_modes = pytest.mark.parametrize("zero_copy", [
    pytest.param(True, id="zero-copy", marks=pytest.mark.skipif(
        not ZERO_COPY_AVAILABLE, reason="os.splice not available")),
    pytest.param(False, id="buffered")])


@pytest.fixture(autouse=True)
def _no_token_in_env(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)


# --------------------------------------------------------------------------
# addresses and registration


def test_addresses_and_worker_kwargs():
    a = parse_relay_address("relay://10.0.0.1:8788/w-1")
    assert (a.host, a.port, a.worker_id, a.relay) == ("10.0.0.1", 8788, "w-1", "10.0.0.1:8788")
    assert parse_relay_address("h:1").worker_id == ""
    with pytest.raises(ValueError):
        parse_relay_address("relay://h/w")  # no port
    assert worker_addresses("10.0.0.1:8788", "w-1") == {
        "protocol": "relay", "host": "10.0.0.1", "port": 8788,
        "contact_address": "relay://10.0.0.1:8788/w-1"}
    with pytest.raises(ValueError, match="wildcard"):
        worker_addresses("0.0.0.0:8788", "w")
    b = RelayBackend()
    assert b.get_address_host("10.0.0.1:8788/w") == "10.0.0.1"
    assert b.resolve_address("localhost:8788/w") == "127.0.0.1:8788/w"


def test_backend_registered_through_entry_point():
    # A fresh interpreter: nothing imported dask_lithops before distributed looks it up.
    code = ("from distributed.comm.registry import get_backend;"
            "from distributed.comm.addressing import get_address_host;"
            "print(type(get_backend('relay')).__module__,"
            " get_address_host('relay://10.1.2.3:9/w'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["dask_lithops.relay.comm", "10.1.2.3"]


# --------------------------------------------------------------------------
# in-process: Worker and Nanny behind the relay on loopback


@pytest.mark.parametrize("direct", [False, True], ids=["spliced", "direct"])
def test_workers_and_nanny_behind_relay_in_process(direct):
    async def main():
        sec = relay_security(TOKEN)
        async with RelayServer("127.0.0.1", 0, token=TOKEN) as relay, \
                Scheduler(host="127.0.0.1", port=0, dashboard_address=":0", security=sec) as s, \
                Worker(s.address, nthreads=1, security=sec,
                       **worker_addresses(relay.address, "w-a")) as wa, \
                Nanny(s.address, nthreads=1, security=sec,
                      **worker_addresses(relay.address, "w-b")) as nb, \
                Client(s.address, asynchronous=True, security=sec) as c:
            assert wa.address == f"relay://{relay.address}/w-a"
            assert nb.address == f"relay://{relay.address}/w-b-nanny"
            assert nb.worker_address == f"relay://{relay.address}/w-b"
            assert relay.workers == ["w-a", "w-b", "w-b-nanny"]
            x = c.submit(np.arange, 1_000_000, workers=[wa.address])
            y = c.submit(np.sum, x, workers=[nb.worker_address])
            assert await y == np.arange(1_000_000).sum()
            if direct:  # only the one-byte path choices crossed the relay
                assert relay.bytes_relayed < 1000, relay.bytes_relayed
            else:
                assert relay.bytes_relayed > 8_000_000  # the array crossed the relay
            # the scheduler reaches the nanny through the relay as well
            assert len(await c.run(os.getpid, nanny=True)) == 1
    with dask.config.set({"lithops.relay.direct": direct}):
        asyncio.run(main())


def test_wrong_or_missing_token_refused_and_logged(caplog):
    caplog.set_level(logging.INFO, logger="dask_lithops.relay")

    async def main():
        async with RelayServer("127.0.0.1", 0, token=TOKEN) as relay, \
                Scheduler(host="127.0.0.1", port=0, dashboard_address=":0") as s:
            # a worker holding the wrong token cannot register
            t0 = time.monotonic()
            with pytest.raises(Exception) as ei:
                await Worker(s.address, nthreads=1, security=relay_security(WRONG),
                             **worker_addresses(relay.address, "bad"))
            assert "invalid or missing relay token" in repr(ei.value.__cause__ or ei.value)
            assert time.monotonic() - t0 < 10
            assert relay.workers == []

            async with Worker(s.address, nthreads=1, security=relay_security(TOKEN),
                              **worker_addresses(relay.address, "good")) as w:
                # wrong token: refused at once, not retried
                with pytest.raises(FatalCommClosedError, match="invalid or missing relay token"):
                    await connect(w.address, timeout=5, extra_conn_args={"relay_token": WRONG})
                # no token at all
                with pytest.raises(FatalCommClosedError, match="no relay token"):
                    await connect(w.address, timeout=5)
                # something that is not a relay client
                r, wr = await asyncio.open_connection(*relay.address.split(":"))
                wr.write(b"GET / HTTP/1.0\r\n\r\n")
                await wr.drain()
                await r.read()  # relay closes it
                wr.close()
                # the right token works
                comm = await connect(w.address, timeout=5, extra_conn_args={"relay_token": TOKEN})
                await comm.write({"op": "identity"})
                assert (await comm.read())["type"] == "Worker"
                await comm.close()
            assert relay.refused >= 3  # register, connect, garbage (no token: never sent)
    asyncio.run(main())
    log = caplog.text
    assert re.search(r"refused register for worker 'bad' from .*invalid or missing relay token",
                     log)
    assert re.search(r"refused connect for worker 'good' from .*invalid or missing relay token",
                     log)
    assert "bad magic" in log
    assert TOKEN not in log and WRONG not in log


def test_tls_end_to_end_relay_sees_only_ciphertext():
    marker = b"PLAINTEXT-MARKER-" + uuid.uuid4().hex.encode()
    seen: list[bytes] = []

    async def main():
        sec = relay_security(TOKEN, Security.temporary())
        async with RelayServer("127.0.0.1", 0, token=TOKEN) as relay:
            relay._tap = seen.append
            async with Scheduler(host="127.0.0.1", port=0, protocol="tls", security=sec,
                                 dashboard_address=":0") as s, \
                    Worker(s.address, nthreads=1, security=sec,
                           **worker_addresses(relay.address, "ta")) as wa, \
                    Worker(s.address, nthreads=1, security=sec,
                           **worker_addresses(relay.address, "tb")) as wb, \
                    Client(s.address, asynchronous=True, security=sec) as c:
                x = c.submit(operator.mul, marker, 20_000, workers=[wa.address])
                y = c.submit(lambda b: b.count(marker), x, workers=[wb.address])
                assert await y == 20_000
                # the tap sees every byte because it keeps streams on the buffered copy
                assert relay.stats()["streams"] > 0
                assert relay.stats()["zero_copy_streams"] == 0
                comm = await connect(wa.address, **sec.get_connection_args("client"))
                assert isinstance(comm, RelayTLS) and comm.extra_info["cipher"]
                await comm.close()
                # require_encryption without TLS material is refused, as for tls://
                with pytest.raises(RuntimeError, match="encryption required"):
                    await connect(wa.address, require_encryption=True,
                                  extra_conn_args={"relay_token": TOKEN})
    asyncio.run(main())
    carried = b"".join(seen)
    assert len(carried) > 20_000 * len(marker)  # the payload did cross the relay ...
    assert marker not in carried  # ... but never in the clear


# --------------------------------------------------------------------------
# in-process: flow control


async def _echo_listener(relay: RelayServer, wid: str, handler):
    listener = listen(f"relay://{relay.address}/{wid}", handler,
                      extra_conn_args={"relay_token": TOKEN})
    await listener.start()
    return listener


@copy_modes
def test_backpressure_bounds_relay_memory(zero_copy):
    high = chunk = 64 * 1024
    bound = 2 * (high + chunk)  # per direction worst case, see RelayServer docstring
    payload = np.random.default_rng(0).integers(0, 255, 64 * 2**20, dtype=np.uint8)

    async def main():
        stalled = asyncio.get_running_loop().create_future()

        async def handler(comm):
            stalled.set_result(comm)  # ... and do not read for now

        async with RelayServer("127.0.0.1", 0, token=TOKEN, high_water=high,
                               chunk_size=chunk, zero_copy=zero_copy) as relay:
            listener = await _echo_listener(relay, "sink", handler)
            try:
                comm = await connect(listener.contact_address,
                                     extra_conn_args={"relay_token": TOKEN})
                server_comm = await stalled
                assert relay.stats()["zero_copy_streams"] == int(zero_copy)
                writer = asyncio.create_task(comm.write(payload))
                peak = 0
                for _ in range(20):
                    await asyncio.sleep(0.05)
                    peak = max(peak, relay.buffered_bytes())
                assert peak <= bound, peak
                # only socket buffers and the bounded relay buffers hold data: the
                # sender is stuck with (almost) all of it
                assert relay.bytes_relayed < 16 * 2**20
                got = await server_comm.read()  # the receiver drains; everything arrives
                await writer
                assert np.array_equal(np.frombuffer(got, np.uint8), payload)
                await comm.close()
                await server_comm.close()
            finally:
                listener.stop()
    asyncio.run(main())


def test_thousand_simultaneous_streams():
    n = 1000

    async def main():
        async def echo(comm):
            try:
                while True:
                    await comm.write(await comm.read())
            except Exception:
                pass

        async with RelayServer("127.0.0.1", 0, token=TOKEN, dial_timeout=30) as relay:
            listener = await _echo_listener(relay, "echo", echo)
            try:
                comms = await asyncio.gather(*(
                    connect(listener.contact_address, timeout=60,
                            extra_conn_args={"relay_token": TOKEN}) for _ in range(n)))
                assert relay.stats()["streams"] == n
                assert relay.stats()["zero_copy_streams"] == (n if ZERO_COPY_AVAILABLE else 0)
                peak = 0

                async def roundtrip(i, comm):
                    msg = np.full(32 * 1024, i % 251, dtype=np.uint8)
                    await comm.write(msg)
                    back = await comm.read()
                    return np.array_equal(back, msg)

                task = asyncio.gather(*(roundtrip(i, c) for i, c in enumerate(comms)))
                while not task.done():
                    peak = max(peak, relay.buffered_bytes())
                    await asyncio.sleep(0.01)
                assert all(task.result())
                assert peak < 64 * 2**20
                await asyncio.gather(*(c.close() for c in comms))
                for _ in range(100):
                    if relay.stats()["streams"] == 0:
                        break
                    await asyncio.sleep(0.05)
                assert relay.stats()["streams"] == 0
            finally:
                listener.stop()
    asyncio.run(main())


async def _raw_stream(relay: RelayServer, wid: str):
    """(control, caller, worker side) raw sockets of one stream spliced by *relay*."""
    host, port = relay.address.rsplit(":", 1)
    ctrl = await open_relay_socket(host, int(port))
    await client_handshake(ctrl, TOKEN, "register", wid)
    caller = await open_relay_socket(host, int(port))
    connecting = asyncio.create_task(client_handshake(caller, TOKEN, "connect", wid))
    dial = await recv_frame(asyncio.get_running_loop(), ctrl)
    assert dial["op"] == "dial"
    worker = await open_relay_socket(host, int(port))
    await client_handshake(worker, TOKEN, "accept", wid, dial["conn"])
    await connecting
    return ctrl, caller, worker


async def _recv_to_eof(sock) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    while chunk := await loop.sock_recv(sock, 1 << 20):
        out += chunk
    return bytes(out)


async def _until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@copy_modes
def test_half_close_and_teardown(zero_copy):
    rng = np.random.default_rng(1)
    request = rng.integers(0, 255, 5 * 2**20, dtype=np.uint8).tobytes()
    reply = rng.integers(0, 255, 3 * 2**20, dtype=np.uint8).tobytes()

    async def main():
        loop = asyncio.get_running_loop()
        async with RelayServer("127.0.0.1", 0, token=TOKEN, zero_copy=zero_copy) as relay:
            ctrl, caller, worker = await _raw_stream(relay, "hc")
            assert relay.stats()["zero_copy_streams"] == int(zero_copy)
            # caller -> worker, then the caller's FIN is passed on ...
            reading = asyncio.create_task(_recv_to_eof(worker))
            await loop.sock_sendall(caller, request)
            caller.shutdown(socket.SHUT_WR)
            assert await asyncio.wait_for(reading, 30) == request
            # ... while the other direction keeps working
            assert relay.stats()["streams"] == 1
            reading = asyncio.create_task(_recv_to_eof(caller))
            await loop.sock_sendall(worker, reply)
            worker.shutdown(socket.SHUT_WR)
            assert await asyncio.wait_for(reading, 30) == reply
            # both directions shut: the relay lets go of the stream
            await _until(lambda: relay.stats()["streams"] == 0)
            assert relay.stats()["connections"] == 1  # the control connection
            caller.close()
            worker.close()

            # an abortive close (RST) on one end closes the other end at once
            _, caller, worker = await _raw_stream(relay, "hc")
            await loop.sock_sendall(caller, b"x" * 1000)
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            worker.close()
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(_recv_to_eof(caller), 10) == b""
            await _until(lambda: relay.stats()["streams"] == 0)
            caller.close()

            # closing the relay closes its live streams
            _, caller, worker = await _raw_stream(relay, "hc")
            await loop.sock_sendall(caller, b"ping")
            assert await loop.sock_recv(worker, 10) == b"ping"
        for sock in (caller, worker):
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(_recv_to_eof(sock), 10) == b""
            sock.close()
        ctrl.close()
    asyncio.run(main())


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
@copy_modes
def test_no_fd_leak_after_200_streams(zero_copy):
    n = 200

    async def main():
        async def echo(comm):
            try:
                while True:
                    msg = await comm.read()
                    if isinstance(msg, str) and msg == "bye":
                        break  # this end closes first
                    await comm.write(msg)
            except CommClosedError:
                pass  # the caller went away
            comm.abort()

        before = _open_fds()
        relay = await RelayServer("127.0.0.1", 0, token=TOKEN, zero_copy=zero_copy)
        listener = await _echo_listener(relay, "fds", echo)
        try:
            comms = await asyncio.gather(*(
                connect(listener.contact_address, timeout=30,
                        extra_conn_args={"relay_token": TOKEN}) for _ in range(n)))
            assert relay.stats()["streams"] == n
            assert relay.stats()["zero_copy_streams"] == (n if zero_copy else 0)
            for i, comm in enumerate(comms):
                payload = np.full(100_000, i % 251, dtype=np.uint8)
                await comm.write(payload)
                assert np.array_equal(await comm.read(), payload)
            # every way a stream ends: caller closes, caller aborts, worker side closes
            for i, comm in enumerate(comms):
                if i % 3 == 0:
                    await comm.close()
                elif i % 3 == 1:
                    comm.abort()
                else:
                    await comm.write("bye")
                    with pytest.raises(CommClosedError):
                        await comm.read()
                    comm.abort()
            await _until(lambda: relay.stats()["streams"] == 0)
            # and streams still open when the relay itself goes away
            comms = await asyncio.gather(*(
                connect(listener.contact_address, timeout=30,
                        extra_conn_args={"relay_token": TOKEN}) for _ in range(10)))
        finally:
            listener.stop()
            await relay.close()
        for comm in comms:
            with pytest.raises(CommClosedError):
                await comm.read()
            comm.abort()
        await _until(lambda: _open_fds() <= before)
        assert _open_fds() == before

    asyncio.run(main())


# --------------------------------------------------------------------------
# network namespaces: outbound-only worker sandboxes

_skip_netns = netns_available()
netns = pytest.mark.skipif(_skip_netns is not None or not nft_available(),
                           reason=f"netns tests need root, ip and nft ({_skip_netns or 'no nft'})")


@pytest.fixture(scope="module")
def world():
    bridge = Bridge().create()
    hosts = []
    try:
        for _ in range(2):
            hosts.append(NetnsHost(bridge, inbound=False).create())
        yield bridge, hosts
    finally:
        for h in hosts:
            h.delete()
        bridge.delete()


class RelayProcess:
    """``dask-lithops relay`` as a real process (so it can be killed -9)."""

    def __init__(self, host: str, port: int, token: str, logdir: str):
        self.host, self.port, self.token, self.logdir = host, port, token, logdir
        self.proc: subprocess.Popen | None = None
        self.logs: list[str] = []

    def start(self) -> RelayProcess:
        log = os.path.join(self.logdir, f"relay-{len(self.logs)}.log")
        self.logs.append(log)
        env = dict(os.environ, **{TOKEN_ENV: self.token})
        with open(log, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dask_lithops.relay.cli", "--host", self.host,
                 "--port", str(self.port), "--heartbeat", "1"],
                env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        line = self.proc.stdout.readline()
        m = re.match(r"relay listening on (\S+):(\d+)", line)
        assert m, f"relay did not start: {line!r} {open(log).read()}"
        self.port = int(m.group(2))
        return self

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def kill(self, sig=signal.SIGKILL):
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(10)
        self.proc = None

    def log_text(self) -> str:
        return "".join(open(p).read() for p in self.logs)


def _wait_port_free(host, port, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
                return
            except OSError:
                time.sleep(0.1)


@contextlib.contextmanager
def sandbox_cluster(world, *, relay: bool = True, tls: bool = False, nanny=(1,),
                    worker_token: str = TOKEN, direct: bool = False):
    """Scheduler (+ relay process) on the bridge, one ``dask worker`` per sandbox."""
    bridge, hosts = world
    gw = bridge.gateway
    tmp = tempfile.mkdtemp(prefix="dlrelay")
    base = Security.temporary() if tls else None
    sec = relay_security(TOKEN, base)
    tls_args = []
    if tls:
        files = {}
        for name, pem in (("ca", base.tls_ca_file), ("cert", base.tls_worker_cert),
                          ("key", base.tls_worker_key)):
            files[name] = os.path.join(tmp, f"{name}.pem")
            with open(files[name], "w") as f:
                f.write(pem)
            os.chmod(files[name], 0o600)
        tls_args = ["--tls-ca-file", files["ca"], "--tls-cert", files["cert"],
                    "--tls-key", files["key"]]
    relay_proc = RelayProcess(gw, 0, TOKEN, tmp) if relay else None
    procs: list[subprocess.Popen] = []
    try:
        if relay_proc is not None:
            relay_proc.start()
        with dask.config.set({"lithops.relay.direct": direct}), \
                LocalCluster(n_workers=0, host=gw, scheduler_port=0, dashboard_address=":0",
                             security=sec, protocol="tls://" if tls else "tcp://") as cluster, \
                Client(cluster, security=sec) as client:
            env = dict(os.environ, **{TOKEN_ENV: worker_token},
                       DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT="10s",
                       DASK_LITHOPS__RELAY__DIRECT=str(direct))
            for i, host in enumerate(hosts):
                args = [DASK, "worker", cluster.scheduler_address, "--nthreads", "1",
                        "--name", f"sbx-{i}", "--no-dashboard", "--memory-limit", "0",
                        *tls_args]
                if relay:
                    args += ["--protocol", "relay",
                             "--listen-address", f"relay://{relay_proc.address}/sbx-{i}"]
                else:
                    args += ["--host", host.address]
                if i not in nanny:
                    args.append("--no-nanny")
                with open(os.path.join(tmp, f"worker-{i}.log"), "w") as log:
                    procs.append(host.popen(args, env=env, stdout=log, stderr=log))
            client.relay = relay_proc
            client.worker_procs = procs
            client.tmp = tmp
            yield client
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
        for h in hosts:
            h.kill_all()
        if relay_proc is not None:
            relay_proc.kill()
        subprocess.run(["rm", "-rf", tmp], check=False)


def _worker_log(client, i):
    return open(os.path.join(client.tmp, f"worker-{i}.log")).read()


def _by_worker(client):
    ws = client.scheduler_info()["workers"]
    return sorted(ws, key=lambda a: ws[a]["name"])


@netns
def test_sandbox_without_relay_cannot_be_reached(world):
    bridge, hosts = world
    with sandbox_cluster(world, relay=False) as client:
        client.wait_for_workers(2, timeout=30)
        a, b = _by_worker(client)
        # the workers registered (outbound works) but nobody can dial them
        host, port = a.split("://")[1].rsplit(":", 1)
        assert host == hosts[0].address
        with pytest.raises(OSError):
            socket.create_connection((host, int(port)), timeout=2).close()
        x = client.submit(np.arange, 1000, workers=[a], pure=False)
        y = client.submit(np.sum, x, workers=[b])
        with pytest.raises(TimeoutError):
            y.result(timeout=8)


def _graphs(client):
    """Three graphs that need worker-to-worker transfers, checked against local results."""
    rng = np.random.default_rng(42)
    pdf = pd.DataFrame({"k": rng.integers(0, 97, 40_000), "v": rng.random(40_000)})
    ddf = dask.dataframe.from_pandas(pdf, npartitions=8)
    from distributed import get_task_stream

    with get_task_stream(client) as ts:
        got = ddf.groupby("k").v.sum(split_out=4, shuffle_method="p2p").compute()
    assert any("shuffle-transfer" in str(t["key"]) for t in ts.data)
    pd.testing.assert_series_equal(got.sort_index(), pdf.groupby("k").v.sum(),
                                   check_names=False)

    x = da.random.default_rng(7).random((1200, 1200), chunks=(1200, 100))
    arr = x.compute(scheduler="sync")  # the same random numbers, computed locally
    got = (x.rechunk((100, 1200)).T + x).sum(axis=0).compute()
    np.testing.assert_allclose(got, (arr.T + arr).sum(axis=0))

    b = db.from_sequence(range(20_000), npartitions=32).map(lambda v: v * v)
    assert b.reduction(sum, sum, split_every=2).compute() == sum(v * v for v in range(20_000))

    moved = client.run(lambda dask_worker: dask_worker.state.transfer_incoming_count_total)
    assert len(moved) == 2 and all(v > 0 for v in moved.values()), moved


@netns
def test_sandbox_workers_through_relay(world):
    with sandbox_cluster(world) as client:
        client.wait_for_workers(2, timeout=30)
        addrs = _by_worker(client)
        assert addrs == [f"relay://{client.relay.address}/sbx-{i}" for i in range(2)]
        _graphs(client)
        # the nanny in sandbox 1 is reached through the relay too
        assert len(client.run(os.getpid, nanny=True)) == 1
        log = client.relay.log_text()
        assert "worker 'sbx-1-nanny' registered" in log
        assert TOKEN not in log


@netns
def test_sandbox_wrong_token_refused(world):
    with sandbox_cluster(world, worker_token=WRONG, nanny=()) as client:
        for p in client.worker_procs:
            assert p.wait(30) != 0  # the worker gives up: registration refused
        assert not client.scheduler_info()["workers"]
        log = client.relay.log_text()
        for i in range(2):
            assert re.search(rf"refused register for worker 'sbx-{i}' from "
                             r"10\.213\.\d+\.\d+:\d+: invalid or missing relay token", log), log
            assert "invalid or missing relay token" in _worker_log(client, i)
        assert TOKEN not in log and WRONG not in log
        for i in range(2):
            assert WRONG not in _worker_log(client, i)


@netns
def test_sandbox_relay_restart_mid_computation(world):
    with sandbox_cluster(world) as client:
        client.wait_for_workers(2, timeout=30)
        relay = client.relay

        def leaf(i):
            time.sleep(0.15)
            return np.full(200_000, i, dtype=np.int64)

        leaves = [dask.delayed(leaf)(i) for i in range(48)]
        while len(leaves) > 1:  # pairwise tree: every level moves arrays between workers
            leaves = [dask.delayed(np.add)(a, b) for a, b in zip(leaves[::2], leaves[1::2])] \
                + ([leaves[-1]] if len(leaves) % 2 else [])
        fut = client.compute(leaves[0])
        time.sleep(1.5)
        assert not fut.done()
        port = relay.port
        relay.kill()  # SIGKILL: every control connection and spliced stream dies
        _wait_port_free(relay.host, port)
        time.sleep(1.0)
        relay.start()
        assert relay.port == port
        result = fut.result(timeout=90)
        np.testing.assert_array_equal(result, np.full(200_000, sum(range(48)), dtype=np.int64))
        restarted = open(relay.logs[-1]).read()
        for i in range(2):
            assert f"worker 'sbx-{i}' registered" in restarted
        # and the cluster keeps working after the restart
        assert client.submit(lambda: 1 + 1).result(timeout=30) == 2
        _graphs(client)


@netns
def test_sandbox_tls_through_relay(world):
    with sandbox_cluster(world, tls=True) as client:
        client.wait_for_workers(2, timeout=30)
        addrs = _by_worker(client)
        assert all(a.startswith("relay://") for a in addrs)
        _graphs(client)
        sec = client.security

        async def probe():
            comm = await connect(addrs[0], **sec.get_connection_args("client"))
            try:
                assert isinstance(comm, RelayTLS)
                assert comm.extra_info["peercert"] and comm.extra_info["cipher"]
                await comm.write({"op": "identity"})
                return (await comm.read())["type"]
            finally:
                await comm.close()

        assert asyncio.run(probe()) == "Worker"
        listeners = client.run(lambda dask_worker: (type(dask_worker.listener).__name__,
                                                    dask_worker.listener.encrypted))
        assert set(listeners.values()) == {("RelayListener", True)}


@contextlib.contextmanager
def _blocked_between(hosts):
    """nft in each sandbox: drop everything to the other sandboxes (the relay stays reachable)."""
    for h in hosts:
        others = ", ".join(o.address for o in hosts if o is not h)
        rules = ("table inet dltest {\n chain out {\n  type filter hook output priority 0;\n"
                 f"  ip daddr {{ {others} }} drop\n }}\n}}\n")
        h.run(["nft", "-f", "-"], input=rules, check=True)
    try:
        yield
    finally:
        for h in hosts:
            h.run(["nft", "delete", "table", "inet", "dltest"])


@netns
@pytest.mark.parametrize("blocked", [False, True], ids=["direct", "fallback"])
def test_sandbox_direct_path_or_relay_fallback(world, blocked):
    """Sandboxes accept no inbound connection, yet two of them can talk directly: both
    dial at once from their relay legs' ports (TCP simultaneous open). Where that is
    impossible, the relay carries the stream."""
    bridge, hosts = world

    def peer_hosts(dask_worker):  # where the worker's pooled comms to peers really lead
        out = {}
        for addr, comms in dask_worker.rpc.available.items():
            if addr.startswith("relay://") and addr != dask_worker.address:
                for comm in comms:
                    out.setdefault(addr, set()).add(comm.stream.socket.getpeername()[0])
        return {a: sorted(h) for a, h in out.items()}

    guard = _blocked_between(hosts) if blocked else contextlib.nullcontext()
    with guard, sandbox_cluster(world, direct=True) as client:
        client.wait_for_workers(2, timeout=30)
        a, b = _by_worker(client)
        _graphs(client)
        peers = client.run(peer_hosts)
        assert peers[a].get(b) and peers[b].get(a), peers
        for w, other, ns in ((a, b, hosts[1]), (b, a, hosts[0])):
            if blocked:
                assert peers[w][other] == [bridge.gateway], peers  # through the relay
            else:
                assert ns.address in peers[w][other], peers  # straight to the other sandbox
