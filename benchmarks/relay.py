"""relay:// vs direct TCP, side by side: worker-to-worker throughput and small-message latency.

    .venv/bin/python benchmarks/relay.py [--tls] [--buffered] [--reps 5] [--sizes 1,10,100]

One scheduler (in this process) and four ``dask worker`` processes on
loopback: two listening directly on tcp://127.0.0.1 and two behind a
``dask-lithops relay`` process (its own process, as in a deployment where the
relay runs beside the scheduler).  Each measurement runs *on the receiving
worker*, using distributed's own transfer path (``get_data_from_worker`` over
the worker's connection pool, i.e. what ``gather_dep`` does), so it includes
serialization and framing exactly as a real dependency fetch does.

Prints medians and the relay/direct ratios; targets: throughput >= 0.7x direct
for 10-100 MB objects, latency <= 2x direct.  A third column, *hop*, fetches
from the same direct worker through the cheapest forwarding hop there is (a
separate process with one thread per direction blocked in ``os.splice``: no
event loop, no protocol, no Python per byte): what any relay that forwards
bytes over one more TCP connection can reach on this machine, so
relay/hop shows the relay's own overhead and hop/direct the cost of the hop.  Also the relay
process's CPU time per GB it forwarded (Linux).  ``--buffered`` runs the relay with its zero-copy
``os.splice`` path turned off, for comparison.  Exit status 0 either way (a
benchmark, not a test).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

import numpy as np
from distributed import Client, Scheduler, Security

from dask_lithops.relay import relay_security
from dask_lithops.relay.protocol import TOKEN_ENV
from dask_lithops.relay.server import ZERO_COPY_AVAILABLE, ZERO_COPY_ENV

DASK = os.path.join(os.path.dirname(sys.executable), "dask")
HOST = "127.0.0.1"


def _make(nbytes: int):
    return np.ones(nbytes, dtype=np.uint8)


async def _fetch(dask_worker, peer: str, key, reps: int) -> list[float]:
    from distributed.worker import get_data_from_worker

    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        resp = await get_data_from_worker(dask_worker.rpc, [key], peer, who=dask_worker.address)
        times.append(time.perf_counter() - t0)
        assert resp["status"] == "OK", resp
        del resp
    return times


async def _ping(dask_worker, peer: str, reps: int) -> list[float]:
    times = []
    r = dask_worker.rpc(peer)
    for _ in range(reps + 10):
        t0 = time.perf_counter()
        await r.identity()
        times.append(time.perf_counter() - t0)
    return times[10:]


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux /proc), None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _start_relay(token: str, logdir: str, buffered: bool) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, **{TOKEN_ENV: token})
    if buffered:
        env[ZERO_COPY_ENV] = "0"
    err = open(os.path.join(logdir, "relay.log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "dask_lithops.relay.cli", "--host", HOST,
                             "--port", "0", "--log-level", "WARNING"],
                            env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    line = proc.stdout.readline()
    m = re.match(r"relay listening on (\S+)", line)
    if not m:
        proc.kill()
        raise RuntimeError(f"relay did not start: {line!r}")
    return proc, m.group(1)


def _forward_forever(target_port: int) -> None:
    """The floor of a forwarding hop: accept on an ephemeral port, splice to target."""
    import fcntl
    import threading

    def pump(src: socket.socket, dst: socket.socket) -> None:
        r, w = os.pipe()
        fcntl.fcntl(r, fcntl.F_SETPIPE_SZ, 1 << 20)
        try:
            while n := os.splice(src.fileno(), w, 1 << 20, flags=os.SPLICE_F_MOVE):
                while n:
                    n -= os.splice(r, dst.fileno(), n, flags=os.SPLICE_F_MOVE)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    server = socket.create_server((HOST, 0))
    print(f"forwarding on {server.getsockname()[1]}", flush=True)
    while True:
        a, _ = server.accept()
        b = socket.create_connection((HOST, target_port))
        for sock in (a, b):  # as distributed (and the relay) set on theirs
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for src, dst in ((a, b), (b, a)):
            threading.Thread(target=pump, args=(src, dst), daemon=True).start()


def _start_hop(target: str) -> tuple[subprocess.Popen, str]:
    port = target.rsplit(":", 1)[1]
    proc = subprocess.Popen([sys.executable, __file__, "--forward", port],
                            stdout=subprocess.PIPE, text=True)
    m = re.match(r"forwarding on (\d+)", proc.stdout.readline())
    if not m:
        proc.kill()
        raise RuntimeError("the forwarding hop did not start")
    return proc, f"{target.split('://')[0]}://{HOST}:{m.group(1)}"


def _tls_files(sec: Security, d: str) -> list[str]:
    paths = {}
    for name, pem in (("ca", sec.tls_ca_file), ("cert", sec.tls_worker_cert),
                      ("key", sec.tls_worker_key)):
        paths[name] = os.path.join(d, f"{name}.pem")
        with open(paths[name], "w") as f:
            f.write(pem)
    return ["--tls-ca-file", paths["ca"], "--tls-cert", paths["cert"],
            "--tls-key", paths["key"]]


async def main(args) -> None:
    token = uuid.uuid4().hex
    tmp = tempfile.mkdtemp(prefix="dlrelaybench")
    base = Security.temporary() if args.tls else None
    sec = relay_security(token, base)
    tls_args = _tls_files(base, tmp) if args.tls else []
    relay_proc, relay_addr = _start_relay(token, tmp, args.buffered)
    procs = []
    try:
        async with Scheduler(host=HOST, port=0, dashboard_address=":0", security=sec,
                             protocol="tls" if args.tls else "tcp") as s, \
                Client(s.address, asynchronous=True, security=sec) as client:
            env = dict(os.environ, **{TOKEN_ENV: token})
            relay_args = {
                w: ["--protocol", "relay", "--listen-address", f"relay://{relay_addr}/{w}"]
                for w in ("spliced-a", "spliced-b", "relay-a", "relay-b")}
            names = {"direct-a": ["--host", HOST], "direct-b": ["--host", HOST], **relay_args}
            for name, extra in names.items():
                log = open(os.path.join(tmp, f"{name}.log"), "w")
                # spliced-*: the relay carries every stream (lithops.relay.direct off)
                direct = "False" if name.startswith("spliced") else "True"
                procs.append(subprocess.Popen(
                    [DASK, "worker", s.address, "--name", name, "--nthreads", "1",
                     "--no-nanny", "--no-dashboard", "--memory-limit", "0", *tls_args, *extra],
                    env={**env, "DASK_LITHOPS__RELAY__DIRECT": direct}, stdout=log, stderr=log))
            await client.wait_for_workers(len(names), timeout=60)
            info = client.scheduler_info()["workers"]
            addr = {w["name"]: a for a, w in info.items()}
            hop_proc, addr["hop-a"] = _start_hop(addr["direct-a"])
            procs.append(hop_proc)
            addr["hop-b"] = addr["direct-b"]

            mode = "TLS" if args.tls else "plain"
            forwarding = ("zero-copy splice" if ZERO_COPY_AVAILABLE and not args.buffered
                          else "buffered copy")
            print(f"relay:// vs direct ({mode}, relay: {forwarding}), loopback, "
                  f"{os.cpu_count()} CPUs, distributed {__import__('distributed').__version__}")
            print("columns: direct tcp://; hop = the cheapest forwarding process; spliced = "
                  "relay:// with the relay carrying the stream; relay = relay:// as configured "
                  "by default (direct path, relay as rendezvous)")
            print(f"{'measure':<26}{'direct':>8}{'hop':>8}{'spliced':>9}{'relay':>8}"
                  f"{'spliced/hop':>12}{'spliced/direct':>15}{'relay/direct':>13}  target")
            relay_cpu = relayed = 0
            kinds = ("direct", "hop", "spliced", "relay")

            async def fetch(kind, key, reps):
                src, dst = addr[f"{kind}-a"], addr[f"{kind}-b"]
                return (await client.run(_fetch, peer=src, key=key, reps=reps,
                                         workers=[dst]))[dst]

            def line(label, row, fmt, target, ok):
                print(f"{label:<26}{row['direct']:>8{fmt}}{row['hop']:>8{fmt}}"
                      f"{row['spliced']:>9{fmt}}{row['relay']:>8{fmt}}"
                      f"{ratio(row, 'spliced', 'hop'):>12.2f}"
                      f"{ratio(row, 'spliced', 'direct'):>15.2f}"
                      f"{ratio(row, 'relay', 'direct'):>13.2f}  {target} {ok}", flush=True)

            def ratio(row, a, b):
                return row[a] / row[b]

            for mb in args.sizes:
                nbytes = mb * 2**20
                futs = {}
                for kind in ("direct", "spliced", "relay"):
                    futs[kind] = client.submit(_make, nbytes, workers=[addr[f"{kind}-a"]],
                                               pure=False)
                    await futs[kind]
                futs["hop"] = futs["direct"]
                for kind in kinds:
                    await fetch(kind, futs[kind].key, 1)  # warm up the pooled connection
                reps = max(3, args.reps if mb >= 10 else args.reps * 4)
                times = {k: [] for k in kinds}
                for _ in range(reps):  # interleaved, so load changes hit all alike
                    for kind in kinds:
                        cpu0 = _cpu_seconds(relay_proc.pid) if kind == "spliced" else None
                        times[kind] += await fetch(kind, futs[kind].key, 1)
                        if cpu0 is not None:
                            relay_cpu += _cpu_seconds(relay_proc.pid) - cpu0
                            relayed += nbytes
                await client.cancel([futs[k] for k in ("direct", "spliced", "relay")])
                row = {k: nbytes / statistics.median(v) / 1e6 for k, v in times.items()}
                target, ok = "-", ""
                if mb >= 10:
                    target = ">= 0.70"
                    ok = "ok" if ratio(row, "relay", "direct") >= 0.7 else "MISSED"
                line(f"throughput {mb} MB (MB/s)", row, ".0f", target, ok)

            if relayed:
                print(f"{'relay CPU (s per GB)':<26}{'':>16}{relay_cpu / (relayed / 2**30):>9.2f}"
                      "  (spliced throughput runs)", flush=True)
            lat = {k: [] for k in kinds}
            for _ in range(5):
                for kind in kinds:
                    src, dst = addr[f"{kind}-a"], addr[f"{kind}-b"]
                    lat[kind] += (await client.run(_ping, peer=src, reps=args.pings // 5,
                                                   workers=[dst]))[dst]
            lat = {k: statistics.median(v) * 1e6 for k, v in lat.items()}
            worst = max(ratio(lat, "relay", "direct"), ratio(lat, "spliced", "direct"))
            line("round trip small msg (us)", lat, ".0f", "<= 2.00",
                 "ok" if worst <= 2 else "MISSED")
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        relay_proc.terminate()
        relay_proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tls", action="store_true", help="TLS for everything (end to end "
                    "through the relay)")
    ap.add_argument("--buffered", action="store_true", help="relay without its zero-copy "
                    "splice path (the fallback used where os.splice is missing)")
    ap.add_argument("--sizes", default="1,10,100", help="object sizes in MB")
    ap.add_argument("--reps", type=int, default=5, help="repetitions per size (x4 for < 10 MB)")
    ap.add_argument("--pings", type=int, default=500, help="round trips for latency")
    ap.add_argument("--forward", type=int, help=argparse.SUPPRESS)  # the hop's own process
    a = ap.parse_args()
    if a.forward:
        sys.exit(_forward_forever(a.forward))
    a.sizes = [int(x) for x in a.sizes.split(",")]
    asyncio.run(main(a))
