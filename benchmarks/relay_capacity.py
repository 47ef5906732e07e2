"""Relay capacity: many functions behind one relay process.

    .venv/bin/python benchmarks/relay_capacity.py [--peers 1000] [--idle 30] [--streams 1000]

One ``dask-lithops relay`` process (as it runs beside the scheduler) and N synthetic peers
in this process, each doing what a worker's ``relay://`` listener does: open a control
connection, prove the token (``register``), keep the connection and ping at the relay's
heartbeat, and answer ``dial`` by opening an ``accept`` connection that the relay splices
to the caller.  Peers use the wire protocol directly (no Dask worker per peer), so the
relay is the only thing measured.

Prints, against the targets:

* registration rate: N peers registering at once (64 in flight), wall clock, and the
  relay's CPU time per registration (the capacity of one core, independent of the load
  other processes put on this machine);
* memory per idle peer: the relay's RSS with N registered idle peers minus its RSS
  before, divided by N;
* relay CPU at idle: percent of one core the relay uses over ``--idle`` seconds with N
  registered peers pinging at the default heartbeat (5 s);
* streams: ``--streams`` connect/dial/accept/splice round trips with a 1 KiB echo each
  (open rate and the relay's RSS after they closed: nothing kept per stream).

Exit status 0 either way (a benchmark, not a test).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import socket
import subprocess
import sys
import time

from dask_lithops.relay import new_token
from dask_lithops.relay.protocol import (
    TOKEN_ENV,
    client_handshake,
    open_relay_socket,
    pack,
    recv_frame,
)

HOST = "127.0.0.1"
IN_FLIGHT = 64


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _start_relay(token: str) -> tuple[subprocess.Popen, str, int]:
    env = dict(os.environ, **{TOKEN_ENV: token})
    proc = subprocess.Popen([sys.executable, "-m", "dask_lithops.relay.cli", "--host", HOST,
                             "--port", "0", "--log-level", "WARNING"],
                            env=env, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    m = re.match(r"relay listening on (\S+):(\d+)", line)
    if not m:
        proc.kill()
        raise RuntimeError(f"relay did not start: {line!r}")
    return proc, m.group(1), int(m.group(2))


class Peer:
    """What a worker's relay listener does, minus the worker: register, ping, dial back."""

    def __init__(self, wid: str, host: str, port: int, token: str):
        self.wid, self.host, self.port, self.token = wid, host, port, token
        self.sock: socket.socket | None = None
        self.tasks: set[asyncio.Task] = set()

    async def register(self) -> None:
        self.sock = await open_relay_socket(self.host, self.port)
        reply = await client_handshake(self.sock, self.token, "register", self.wid)
        self.tasks.add(asyncio.create_task(self._control(float(reply["heartbeat"]))))

    async def _control(self, heartbeat: float) -> None:
        loop = asyncio.get_running_loop()
        pinger = asyncio.create_task(self._ping(heartbeat))
        try:
            while True:
                msg = await recv_frame(loop, self.sock)
                if msg.get("op") == "dial":
                    task = asyncio.create_task(self._accept(msg["conn"]))
                    self.tasks.add(task)
                    task.add_done_callback(self.tasks.discard)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            pinger.cancel()

    async def _ping(self, heartbeat: float) -> None:
        loop = asyncio.get_running_loop()
        frame = pack({"op": "ping"})
        while True:
            await asyncio.sleep(heartbeat)
            await loop.sock_sendall(self.sock, frame)

    async def _accept(self, cid: str) -> None:
        loop = asyncio.get_running_loop()
        sock = await open_relay_socket(self.host, self.port)
        try:
            await client_handshake(sock, self.token, "accept", self.wid, cid)
            assert await loop.sock_recv(sock, 1) == b"R"  # the caller's path choice: relay
            data = await _recv_n(loop, sock, 1024)
            await loop.sock_sendall(sock, data)  # echo
        finally:
            sock.close()

    def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        if self.sock is not None:
            self.sock.close()


async def _recv_n(loop, sock, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = await loop.sock_recv(sock, n - len(buf))
        if not chunk:
            raise ConnectionError("closed early")
        buf += chunk
    return buf


async def _stream(host: str, port: int, token: str, wid: str) -> None:
    loop = asyncio.get_running_loop()
    sock = await open_relay_socket(host, port)
    try:
        await client_handshake(sock, token, "connect", wid)
        payload = os.urandom(1024)
        await loop.sock_sendall(sock, b"R" + payload)
        assert await _recv_n(loop, sock, 1024) == payload
    finally:
        sock.close()


async def _bounded(coros, limit: int) -> None:
    sem = asyncio.Semaphore(limit)

    async def one(c):
        async with sem:
            await c

    await asyncio.gather(*(one(c) for c in coros))


async def run(args) -> None:
    token = new_token()
    proc, host, port = _start_relay(token)
    peers: list[Peer] = []
    try:
        await asyncio.sleep(1.0)
        rss0, cpu0 = _rss_bytes(proc.pid), _cpu_seconds(proc.pid)
        peers = [Peer(f"peer-{i}", host, port, token) for i in range(args.peers)]
        t0 = time.perf_counter()
        await _bounded([p.register() for p in peers], IN_FLIGHT)
        reg_wall = time.perf_counter() - t0
        reg_cpu = _cpu_seconds(proc.pid) - cpu0

        await asyncio.sleep(2.0)  # let the relay settle (first pings, freed hello buffers)
        rss1 = _rss_bytes(proc.pid)
        cpu1, t1 = _cpu_seconds(proc.pid), time.monotonic()
        await asyncio.sleep(args.idle)
        idle_cpu = (_cpu_seconds(proc.pid) - cpu1) / (time.monotonic() - t1)

        n = min(args.streams, args.peers)
        cpu2 = _cpu_seconds(proc.pid)
        t2 = time.perf_counter()
        await _bounded([_stream(host, port, token, peers[i].wid) for i in range(n)], IN_FLIGHT)
        stream_wall = time.perf_counter() - t2
        stream_cpu = _cpu_seconds(proc.pid) - cpu2
        await asyncio.sleep(1.0)
        rss2 = _rss_bytes(proc.pid)
    finally:
        for p in peers:
            p.close()
        proc.terminate()
        proc.wait(10)

    per_peer = (rss1 - rss0) / args.peers
    rows = [
        ("registrations/s (wall, 64 in flight)", f"{args.peers / reg_wall:,.0f}", ">= 500",
         args.peers / reg_wall >= 500),
        ("registrations/s per relay CPU-second", f"{args.peers / max(reg_cpu, 1e-3):,.0f}", "-",
         None),
        (f"relay RSS per idle peer ({args.peers} peers)", f"{per_peer / 1024:.1f} KiB",
         "<= 64 KiB", per_peer <= 64 * 1024),
        (f"relay CPU at idle ({args.peers} peers, {args.idle:.0f} s)",
         f"{100 * idle_cpu:.2f} % of a core", "<= 5 %", idle_cpu <= 0.05),
        (f"streams opened/s ({n} spliced 1 KiB echoes)", f"{n / stream_wall:,.0f}", "-", None),
        ("relay CPU per stream", f"{1e3 * stream_cpu / n:.2f} ms", "-", None),
        ("relay RSS after the streams closed vs idle", f"{(rss2 - rss1) / 1024:+.0f} KiB", "-",
         None),
    ]
    print(f"relay capacity: {args.peers} synthetic peers, relay pid {proc.pid}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"  relay RSS: {rss0 / 2**20:.1f} MiB empty, {rss1 / 2**20:.1f} MiB with the peers")
    for name, value, target, ok in rows:
        verdict = "" if ok is None else ("met" if ok else "MISSED")
        print(f"  {name:<48} {value:>18}  target {target:<10} {verdict}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", type=int, default=1000)
    p.add_argument("--idle", type=float, default=30.0, help="seconds of idle measurement")
    p.add_argument("--streams", type=int, default=1000)
    args = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 4 * args.peers + 256
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
