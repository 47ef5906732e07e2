"""ServerlessCluster(backend="aws_lambda") against the offline Lambda emulator.

Functions run as real awslambdaric processes in outbound-only namespaces (they
accept no inbound connection): workers reach the scheduler and each other only
through the relay.
"""

from __future__ import annotations

import collections
import io
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import zipfile

import pytest

pytest.importorskip("boto3")
pytest.importorskip("awslambdaric")

from distributed import Client  # noqa: E402
from distributed.diagnostics.plugin import SchedulerPlugin  # noqa: E402
from lambda_world import (  # noqa: E402,F401  (fixtures: emulator, runtime_package)
    EXTRA,
    busy_environments,
    emulator,
    make_cluster,
    runtime_package,
    wait_no_busy,
)

from dask_lithops import config  # noqa: E402
from dask_lithops.payload import RuntimeMismatch  # noqa: E402
from dask_lithops.serverless import ServerlessCluster  # noqa: E402

pytestmark = pytest.mark.timeout(300)


class RecomputeCounter(SchedulerPlugin):
    name = "recompute-counter"

    def __init__(self):
        self.counts = collections.Counter()

    def transition(self, key, start, finish, *args, **kwargs):
        if start == "processing" and finish == "memory":
            self.counts[key] += 1


# --------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, message", [
    ({"runtime_memory": 64}, r"runtime_memory = 64 is invalid; allowed: .*128.*10240"),
    ({"runtime_memory": 20000}, r"runtime_memory = 20000 is invalid"),
    ({"runtime_timeout": 901}, r"runtime_timeout = 901 is invalid; allowed: .*900"),
    ({"ephemeral_storage": 100}, r"ephemeral_storage = 100 is invalid"),
    ({"architecture": "sparc"}, r"architecture = 'sparc' is invalid"),
    ({"backend": "nope"}, r"backend = 'nope' is invalid"),
])
def test_bad_input_fails_before_anything(kwargs, message):
    with pytest.raises(config.ConfigError, match=message):
        ServerlessCluster(endpoint_url="http://127.0.0.1:9", contact_address="127.0.0.1",
                          **kwargs)


def test_lean_event_invoke_is_signed_as_aws_verifies_it():
    """The Event fast path's requests pass SigV4 verification and match boto3's."""
    import http.server
    import threading

    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    from dask_lithops.serverless.backends.aws_lambda import AWSLambdaBackend, resolve_config

    received = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, dict(self.headers), body))
            self.send_response(202)
            self.send_header("x-amzn-RequestId", f"req-{len(received)}")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        backend = AWSLambdaBackend(resolve_config(
            endpoint_url=f"http://127.0.0.1:{server.server_address[1]}", region="eu-west-1",
            access_key_id="AKIDEXAMPLE", secret_access_key="secret", session_token="token"))
        body = b'{"dask_lithops":"worker","payload":"x"}'
        assert backend.event_invoker is not None
        assert backend.invoke("dask-lithops-f", body) == "req-1"  # the fast path
        backend.client.invoke(FunctionName="dask-lithops-f", InvocationType="Event",
                              Payload=body)  # boto3's, for comparison
    finally:
        server.shutdown()
        server.server_close()
    (path, headers, got), (boto_path, boto_headers, _) = received
    assert got == body and path == boto_path == "/2015-03-31/functions/dask-lithops-f/invocations"

    def parts(h):
        auth = h["Authorization"]
        scope = auth.split("Credential=")[1].split(",")[0]
        signed = auth.split("SignedHeaders=")[1].split(",")[0]
        return scope, signed, auth.split("Signature=")[1]

    scope, signed, signature = parts(headers)
    assert (scope, signed) == parts(boto_headers)[:2]
    assert scope.endswith("/eu-west-1/lambda/aws4_request")
    # verify as the service does: re-sign the request as received
    lower = {k.lower(): v for k, v in headers.items()}
    req = AWSRequest(method="POST", url=f"http://{lower['host']}{path}", data=got,
                     headers={k: lower[k] for k in signed.split(";") if k != "host"})
    req.context["timestamp"] = lower["x-amz-date"]
    auth = SigV4Auth(Credentials("AKIDEXAMPLE", "secret", "token"), "lambda", "eu-west-1")
    string_to_sign = auth.string_to_sign(req, auth.canonical_request(req))
    assert auth.signature(string_to_sign, req) == signature


def test_real_aws_needs_region_role_and_contact_address(monkeypatch):
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    with pytest.raises(config.ConfigError, match=r"region .* is required"):
        ServerlessCluster(contact_address="127.0.0.1")
    with pytest.raises(config.ConfigError, match=r"execution_role is required"):
        ServerlessCluster(region="eu-west-1", contact_address="127.0.0.1")
    with pytest.raises(config.ConfigError, match=r"contact_address is required with "
                       r"scheduler='local'.*or scheduler='aws_ec2'"):
        ServerlessCluster(region="eu-west-1", execution_role="arn:aws:iam::1:role/x",
                          scheduler="local")


def test_payload_too_big_fails_before_invoking(emulator, runtime_package):
    import dask

    before = len([i for i in emulator.invocations() if i.kind == "Event"])
    with dask.config.set({"huge-user-setting": "x" * 2_000_000}):
        with pytest.raises(Exception, match=r"launch payload is \d+ bytes, over .* limit"):
            make_cluster(emulator, n_workers=1)
    assert len([i for i in emulator.invocations() if i.kind == "Event"]) == before


# --------------------------------------------------------------------- work


def test_delayed_dataframe_array(emulator, runtime_package):
    import dask
    import dask.array as da
    import dask.dataframe as dd
    import numpy as np
    import pandas as pd

    cluster = make_cluster(emulator)
    fn = cluster.function_name
    assert fn.startswith("dask-lithops-default-") and fn.endswith("-1024MB")
    with cluster, Client(cluster) as client:
        t0 = time.monotonic()
        cluster.scale(2)
        assert time.monotonic() - t0 < 1.0  # scale() returns at once
        client.wait_for_workers(2, timeout=60)
        info = client.scheduler_info()["workers"]
        assert all(a.startswith("relay://") for a in info)
        assert {w["name"] for w in info.values()} == set(cluster.worker_spec)
        assert all(w["memory_limit"] == 1024 * 2**20 for w in info.values())
        assert cluster.scheduler_address.startswith("tls://")

        # dask.delayed
        parts = [dask.delayed(lambda i: i * i)(i) for i in range(20)]
        assert dask.delayed(sum)(parts).compute() == sum(i * i for i in range(20))

        # dataframe groupby with a p2p shuffle (workers exchange data through the relay)
        pdf = pd.DataFrame({"k": np.arange(4000) % 37, "v": np.arange(4000.0)})
        ddf = dd.from_pandas(pdf, npartitions=8)
        with dask.config.set({"dataframe.shuffle.method": "p2p"}):
            got = ddf.groupby("k").v.sum(split_out=4).compute().sort_index()
            shuffled = ddf.shuffle("k").compute()
        pd.testing.assert_series_equal(got, pdf.groupby("k").v.sum().sort_index(),
                                       check_names=False)
        assert len(shuffled) == len(pdf)

        # array reduction
        x = da.arange(1_000_000, chunks=100_000)
        assert int((x * 2).sum().compute()) == 2 * sum(range(1_000_000))
    # close(): every invocation has returned, nothing runs or bills
    assert wait_no_busy(emulator, fn) == []
    usage = cluster.usage()
    assert usage["invocations"] == 2 and usage["running"] == 0
    assert usage["gb_seconds"] > 0 and usage["estimated_cost_usd"] > 0
    assert all(r["reason"] for r in usage["workers"])


def test_adapt_from_zero_and_back(emulator, runtime_package):
    cluster = make_cluster(emulator)
    fn = cluster.function_name
    with cluster, Client(cluster) as client:
        cluster.adapt(minimum=0, maximum=2, interval="300ms", wait_count=3,
                      target_duration="1s")
        assert len(client.scheduler_info()["workers"]) == 0
        futures = client.map(lambda i: (time.sleep(0.5), i)[1], range(12))
        assert client.gather(futures) == list(range(12))
        grown = len(cluster.usage_tracker.records)
        assert grown >= 1
        del futures
        deadline = time.monotonic() + 60
        while (cluster.worker_spec or client.scheduler_info()["workers"]) and \
                time.monotonic() < deadline:
            time.sleep(0.3)
        assert not cluster.worker_spec and not client.scheduler_info()["workers"]
        assert wait_no_busy(emulator, fn) == []
    assert wait_no_busy(emulator, fn) == []


def test_rotation_outlives_the_function_timeout(emulator, runtime_package):
    """runtime_timeout=20s, computation > 50s: workers rotate (each slot 3 times: the
    15 s lifetime), no key is lost or recomputed."""
    import numpy as np

    cluster = make_cluster(emulator, runtime_memory=1152, runtime_timeout=20)
    fn = cluster.function_name
    counter = RecomputeCounter()
    cluster.scheduler.add_plugin(counter, name=counter.name)

    def step(prev, i):
        time.sleep(1.0)
        return prev + np.full(10_000, i, dtype="int64")  # data held across rotations

    with cluster, Client(cluster) as client:
        cluster.scale(2)
        client.wait_for_workers(2, timeout=60)
        t0 = time.monotonic()
        futures = [client.submit(np.zeros, 10_000, dtype="int64", pure=False)]
        for i in range(1, 52):
            futures.append(client.submit(step, futures[-1], i, pure=False))
        results = client.gather(futures)
        elapsed = time.monotonic() - t0
        assert elapsed >= 50
        for i, r in enumerate(results):
            assert int(r[0]) == i * (i + 1) // 2
        assert max(counter.counts.values()) == 1, {
            k: v for k, v in counter.counts.items() if v > 1}
        assert len(cluster.worker_spec) == 2
        invocations = len(cluster.usage_tracker.records)
        assert invocations >= 2 + 2 * 3  # each slot rotated at least 3 times
        # no invocation hit the platform's timeout: each retired itself in time
        timedout = [i for i in emulator.invocations(fn) if i.status == "timedout"]
        assert not timedout
    assert wait_no_busy(emulator, fn) == []


def test_throttling_below_requested_count_still_completes(emulator, runtime_package):
    cluster = make_cluster(emulator, runtime_memory=1088)
    fn = cluster.function_name
    lam = emulator.client()
    lam.put_function_concurrency(FunctionName=fn, ReservedConcurrentExecutions=1)
    try:
        with cluster, Client(cluster) as client:
            cluster.scale(3)
            client.wait_for_workers(1, timeout=60)
            futures = client.map(lambda i: i + 1, range(50))
            assert sum(client.gather(futures)) == sum(range(1, 51))
            assert len(client.scheduler_info()["workers"]) == 1
    finally:
        lam.delete_function_concurrency(FunctionName=fn)
    # the queued invocations start after close, find no scheduler and end at once
    assert wait_no_busy(emulator, fn, timeout=40) == []
    assert not [i for i in emulator.invocations(fn) if i.status == "timedout"]


def test_invoke_rate_throttling_is_retried(emulator, runtime_package):
    """Lambda answers 429 when Invoke's request rate is exceeded: retried with backoff."""
    cluster = make_cluster(emulator)
    before = emulator.stats["rate_throttles"]
    emulator.invoke_rate_limit = 1.0  # one Event invoke per second, burst of one
    try:
        with cluster, Client(cluster) as client:
            cluster.scale(4)
            client.wait_for_workers(4, timeout=120)
            assert sum(client.gather(client.map(lambda i: i + 1, range(20)))) == \
                sum(range(1, 21))
            records = list(cluster.usage_tracker.records.values())
            assert len(records) == 4 and all(r.request_id and r.accepted for r in records)
    finally:
        emulator.invoke_rate_limit = None
    assert emulator.stats["rate_throttles"] - before >= 3
    assert wait_no_busy(emulator, cluster.function_name) == []


def test_runtime_version_mismatch_is_a_clear_error(emulator, runtime_package):
    """A function deployed under the expected name with other versions: error, never a hang."""
    from dask_lithops.serverless.backends.aws_lambda import AWSLambdaBackend, resolve_config

    memory = 896
    backend = AWSLambdaBackend(resolve_config(endpoint_url=emulator.endpoint_url,
                                              runtime_memory=memory, runtime_timeout=120))
    # a stale runtime: msgpack's metadata says another version
    src = zipfile.ZipFile(runtime_package.function_zip)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as out:
        for item in src.infolist():
            data = src.read(item)
            name = item.filename
            if re.match(r"msgpack-[^/]+\.dist-info/METADATA$", name):
                data = re.sub(rb"(?m)^Version: .*$", b"Version: 0.0.1", data)
            out.writestr(item, data)
    stale = runtime_package.__class__(**{**runtime_package.__dict__})
    path = os.path.join(os.path.dirname(runtime_package.function_zip), "stale-test.zip")
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    stale.function_zip = path
    try:
        backend.deploy_runtime(stale, memory, 120)
    finally:
        os.unlink(path)
    events_before = len([i for i in emulator.invocations() if i.kind == "Event"])
    t0 = time.monotonic()
    with pytest.raises(RuntimeMismatch, match=r"msgpack: client \S+, function \S+ 0\.0\.1"):
        make_cluster(emulator, runtime_memory=memory, n_workers=2)
    assert time.monotonic() - t0 < 60
    assert len([i for i in emulator.invocations() if i.kind == "Event"]) == events_before


def test_unreachable_scheduler_is_a_clear_error_before_any_invocation(emulator, runtime_package):
    """Functions cannot dial the contact address (here: an address that is their own loopback,
    where nothing listens): the cluster says so, naming the addresses and the fixes, before any
    worker is invoked, well within worker_start_timeout, and leaves nothing running."""
    from dask_lithops.serverless.reachability import SchedulerUnreachable

    events_before = len([i for i in emulator.invocations() if i.kind == "Event"])
    t0 = time.monotonic()
    with pytest.raises(SchedulerUnreachable) as info:
        ServerlessCluster(endpoint_url=emulator.endpoint_url, contact_address="127.0.0.1",
                          extra_packages=EXTRA, runtime_memory=1024, runtime_timeout=120,
                          dashboard_address=None, n_workers=2, worker_start_timeout="30s")
    assert time.monotonic() - t0 < 30
    msg = str(info.value)
    assert re.search(r"cannot dial the scheduler at 127\.0\.0\.1:\d+ \(connection refused\)", msg), msg
    assert re.search(r"the relay at 127\.0\.0\.1:\d+", msg), msg
    for fix in ('scheduler="aws_ec2"', 'scheduler="ssh"', "contact_address",
                "lithops.aws_lambda.vpc"):
        assert fix in msg, (fix, msg)
    assert len([i for i in emulator.invocations() if i.kind == "Event"]) == events_before
    assert [e for e in emulator.environments if e.state == "busy"] == []


def test_workers_that_never_register_get_the_explanation_once(emulator, runtime_package, caplog):
    """The check at start passed, then the relay became unreachable (here: it closed): the
    invocations never turn into workers, and the cluster says why and what fixes it, once."""
    import logging

    cluster = make_cluster(emulator, worker_start_timeout="5s")
    with cluster, caplog.at_level(logging.WARNING, logger="dask_lithops.serverless.cluster"):
        cluster.sync(cluster._relay_server.close)
        cluster.scale(2)

        def explained():
            return [r.getMessage() for r in caplog.records
                    if "no worker registered within worker_start_timeout" in r.getMessage()]

        deadline = time.monotonic() + 40
        while not explained() and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(3)  # more invocations time out meanwhile: still one explanation
        msgs = explained()
        assert len(msgs) == 1, msgs
        assert f"the relay at {cluster.relay_address}" in msgs[0], msgs[0]
        assert 'scheduler="aws_ec2"' in msgs[0] and "contact_address" in msgs[0], msgs[0]


def test_sigkilled_client_leaves_no_invocation_running(emulator, runtime_package, tmp_path):
    """The client dies with SIGKILL: its functions notice the lost scheduler and return
    within death_timeout, long before their own timeout (nothing keeps billing).

    Every function of the module's tests is the same (same runtime and memory), so what is
    counted is this client's invocations (the ones new since it started), not the function's
    environments: an earlier test's workers may still be running out their own death_timeout."""
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent(f"""
        import time
        from distributed import Client
        from dask_lithops.serverless import ServerlessCluster
        cluster = ServerlessCluster(
            endpoint_url={emulator.endpoint_url!r}, contact_address={emulator.host_address!r},
            extra_packages={EXTRA!r}, runtime_memory=1024, runtime_timeout=120,
            death_timeout="5s", n_workers=2, dashboard_address=None)
        client = Client(cluster)
        client.wait_for_workers(2, timeout=120)
        assert client.submit(lambda x: x + 1, 41).result() == 42
        print(cluster.function_name, flush=True)
        time.sleep(600)
    """))
    earlier = {i.request_id for i in emulator.invocations()}

    def own(fn):
        return [i for i in emulator.invocations(fn) if i.request_id not in earlier]

    def running(invocations):
        return [i for i in invocations if i.status in ("queued", "running")]

    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        fn = proc.stdout.readline().strip()
        assert fn, "the client did not come up"
        live = running(own(fn))
        assert len(live) == 2 and all(i.kind == "Event" for i in live), live
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = time.monotonic()
    while running(own(fn)) and time.monotonic() - killed_at < 5 + 25:
        time.sleep(0.2)
    assert running(own(fn)) == []
    assert time.monotonic() - killed_at < 5 + 25
    invocations = own(fn)
    assert len([i for i in invocations if i.kind == "Event"]) >= 2, invocations
    assert all(i.status == "succeeded" and i.duration_ms < 60_000 for i in invocations), invocations
