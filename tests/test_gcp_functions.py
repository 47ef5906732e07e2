"""ServerlessCluster(backend="gcp_functions") (Cloud Run functions, Cloud Functions v2 API).

The end-to-end tests run against the offline Cloud Run functions emulator
(``dask_lithops.testing.gcp_functions_emulator``): the v2 API, a build step
that pip-installs the uploaded ``requirements.txt``, and a front end that
routes each request to the real ``functions-framework`` in an outbound-only
sandbox.  The tests here without it check what fails before anything runs.
"""

from __future__ import annotations

import json
import zipfile

import pytest

pytest.importorskip("google.auth")
pytest.importorskip("httpx")

from dask_lithops import config  # noqa: E402
from dask_lithops.serverless import ServerlessCluster  # noqa: E402

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def credentials_file(tmp_path):
    """A service-account key as Google issues them (the key is a fresh RSA key)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    path = tmp_path / "key.json"
    path.write_text(json.dumps({
        "type": "service_account", "project_id": "from-the-key", "private_key_id": "k1",
        "private_key": pem, "client_email": "dask@from-the-key.iam.gserviceaccount.com",
        "client_id": "1", "token_uri": "http://127.0.0.1:9/token"}))
    return str(path)


# --------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, message", [
    ({"runtime_memory": 64}, r"gcp_functions.runtime_memory = 64 is invalid; allowed: .*128.*32768"),
    ({"runtime_memory": 40000}, r"runtime_memory = 40000 is invalid"),
    ({"runtime_timeout": 3601}, r"gcp_functions.runtime_timeout = 3601 is invalid; allowed: .*3600"),
    ({"runtime_cpu": 9}, r"runtime_cpu = 9 is invalid"),
    ({"runtime_memory": 8192, "runtime_cpu": 1}, r"runtime_cpu = 1 is invalid with "
                                                 r"runtime_memory = 8192: .* at least 2"),
    ({"ingress": "OPEN"}, r"gcp_functions.ingress = 'OPEN' is invalid; allowed: .*ALLOW_ALL"),
    ({"max_workers": 0}, r"max_workers = 0 is invalid"),
    ({"credentials_path": "/nonexistent/key.json"}, r"credentials_path = .* is not a file"),
    ({"architecture": "arm64"}, r"architecture: not an option of "
                                r"ServerlessCluster\(backend='gcp_functions'\)"),
])
def test_bad_input_fails_before_anything(kwargs, message, credentials_file):
    kwargs.setdefault("credentials_path", credentials_file)
    with pytest.raises(config.ConfigError, match=message):
        ServerlessCluster(backend="gcp_functions", endpoint_url="http://127.0.0.1:9",
                          contact_address="127.0.0.1", **kwargs)


def test_google_cloud_needs_project_region_and_contact_address(monkeypatch, tmp_path):
    for var in ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT",
                "CLOUDSDK_CORE_PROJECT", "LITHOPS_CONFIG_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(config.ConfigError, match=r"lithops.gcp.project_name is required"):
        ServerlessCluster(backend="gcp_functions", contact_address="127.0.0.1")
    with pytest.raises(config.ConfigError, match=r"gcp_functions.region .* is required"):
        ServerlessCluster(backend="gcp_functions", project_name="p", contact_address="127.0.0.1")
    with pytest.raises(config.ConfigError, match=r"contact_address is required with "
                       r"scheduler='local'"):
        ServerlessCluster(backend="gcp_functions", project_name="p", region="europe-west1",
                          scheduler="local")
    # auto on GCP with nothing reachable: no EC2 VM for Google's functions, the same error
    with pytest.raises(config.ConfigError, match=r"contact_address is required with "
                       r"scheduler='auto' on gcp_functions.*scheduler='ssh'"):
        ServerlessCluster(backend="gcp_functions", project_name="p", region="europe-west1")


def test_lithops_config_file_gcp_sections(monkeypatch, tmp_path, credentials_file):
    """Lithops' `gcp` and `gcp_functions` sections, with Lithops' key names."""
    from dask_lithops.serverless.backends import backend_class

    path = tmp_path / "lithops_config"
    path.write_text(
        "lithops:\n  backend: gcp_functions\n"
        "gcp:\n  project_name: my-project\n  region: europe-west4\n"
        f"  credentials_path: {credentials_file}\n  service_account: sa@my-project.iam\n"
        "gcp_functions:\n  runtime_memory: 2048\n  runtime_timeout: 600\n  max_workers: 50\n"
        "  invoke_pool_threads: 8\n  trigger: https\n")  # a Lithops key we have no use for
    monkeypatch.setenv("LITHOPS_CONFIG_FILE", str(path))
    assert config.resolve_mode() == ("serverless", "gcp_functions")
    cls = backend_class("gcp_functions")
    backend = cls(cls.resolve_config())
    assert (backend.project, backend.region) == ("my-project", "europe-west4")
    assert (backend.memory, backend.timeout, backend.config["max_workers"]) == (2048, 600, 50)
    assert backend.config["service_account"] == "sa@my-project.iam"
    assert backend.vcpus == 1.0 and backend.threads_for_memory(2048) == 1
    # the keyword wins over the file
    assert cls(cls.resolve_config(runtime_memory=4096)).vcpus == 2.0


# --------------------------------------------------------------------- the runtime


def test_source_package_pins_the_clients_versions(tmp_path):
    import importlib.metadata as md
    import sys

    from dask_lithops.serverless.backends.gcp_functions.packaging import (
        ENTRY_POINT,
        build_source_package,
    )

    pkg = build_source_package("default", extra_packages=["pandas"], cache_dir=tmp_path)
    z = zipfile.ZipFile(pkg.source_zip)
    names = z.namelist()
    requirements = z.read("requirements.txt").decode().split()
    assert requirements == pkg.requirements
    for dist in ("dask", "distributed", "cloudpickle", "msgpack", "tornado", "pandas", "numpy"):
        assert f"{dist}=={md.version(dist)}" in requirements, dist
    assert not [r for r in requirements if r.startswith(("dask-lithops", "pip=", "jsonschema"))]
    assert f"import handle_request as {ENTRY_POINT}" in z.read("main.py").decode()
    assert "dask_lithops/serverless/backends/gcp_functions/handler.py" in names
    assert any(n.startswith("dask_lithops-") and n.endswith("entry_points.txt") for n in names)
    assert pkg.gcp_runtime == "python%d%d" % sys.version_info[:2]
    again = build_source_package("default", extra_packages=["pandas"], cache_dir=tmp_path)
    assert again.version == pkg.version and again.source_zip == pkg.source_zip


def test_function_resource(credentials_file, tmp_path):
    """What deploy sends: buildConfig and serviceConfig as the v2 API defines them."""
    from dask_lithops.serverless.backends.gcp_functions.backend import GCPFunctionsBackend
    from dask_lithops.serverless.backends.gcp_functions.packaging import build_source_package

    cfg = GCPFunctionsBackend.resolve_config(
        credentials_path=credentials_file, region="us-east1", runtime_memory=1024,
        max_workers=7, vpc_connector="projects/p/locations/us-east1/connectors/c",
        vpc_egress="ALL_TRAFFIC", labels={"Team": "Data Science"}, service_account="sa@x")
    backend = GCPFunctionsBackend(cfg)
    assert backend.project == "from-the-key"  # the key's project_id
    pkg = build_source_package("default", cache_dir=tmp_path)
    body = backend.function_body(pkg, 1024, 600, {"bucket": "b", "object": "o"})
    name = f"dask-lithops-default-{pkg.version}-1024mb"
    assert body["name"] == f"projects/from-the-key/locations/us-east1/functions/{name}"
    assert backend.parse_runtime_key(name) == ("default", pkg.version, 1024)
    assert body["buildConfig"] == {"runtime": pkg.gcp_runtime, "entryPoint": "dask_lithops_handler",
                                   "source": {"storageSource": {"bucket": "b", "object": "o"}}}
    service = body["serviceConfig"]
    assert service["availableMemory"] == "1024Mi" and service["availableCpu"] == "0.583"
    assert service["timeoutSeconds"] == 600 and service["maxInstanceCount"] == 7
    assert service["maxInstanceRequestConcurrency"] == 1
    assert service["serviceAccountEmail"] == "sa@x"
    assert service["vpcConnectorEgressSettings"] == "ALL_TRAFFIC"
    assert service["environmentVariables"]["DASK_LITHOPS_TIMEOUT"] == "600"
    assert body["labels"]["team"] == "data-science" and body["labels"]["dask-lithops"] == "true"


# --------------------------------------------------------------------- against the emulator

EXTRA = ["pandas", "pyarrow", "numpy"]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    import os

    if os.geteuid() != 0:
        pytest.skip("the emulator's sandboxes need root (network namespaces)")
    emulator_module = pytest.importorskip("dask_lithops.testing.gcp_functions_emulator")
    with emulator_module.CloudFunctionsEmulator(
            project="test-project", region="us-central1", sandbox=True, idle_timeout=60,
            log_dir=tmp_path_factory.mktemp("gcf-logs")) as emu:
        if not emu.sandboxed:
            pytest.skip(f"sandboxes unavailable: {emu.sandbox_reason}")
        yield emu


def host_address(emu) -> str | None:
    """The host as the emulator's sandboxes reach it (None: the backend asks the emulator)."""
    return getattr(emu, "host_address", None)


def make_cluster(emu, **kwargs):
    kwargs.setdefault("runtime_memory", 1024)
    kwargs.setdefault("runtime_timeout", 120)
    kwargs.setdefault("extra_packages", EXTRA)
    kwargs.setdefault("dashboard_address", None)
    return ServerlessCluster(backend="gcp_functions", endpoint_url=emu.endpoint_url,
                             credentials_path=str(emu.credentials_file),
                             project_name=emu.project, region=emu.region,
                             contact_address=host_address(emu), **kwargs)


def busy_instances(emu, function=None):
    return [i for i in emu.instances if i.state in ("busy", "starting") and i.in_flight
            and (function is None or i.function.rsplit("/", 1)[-1] == function)]


def wait_no_busy(emu, function, timeout=20.0):
    import time

    deadline = time.monotonic() + timeout
    while busy_instances(emu, function) and time.monotonic() < deadline:
        time.sleep(0.2)
    return busy_instances(emu, function)


def worker_requests(emu, function):
    return [r for r in emu.requests(function) if r.method == "POST"]


class RecomputeCounter:
    """Counts processing -> memory transitions per key (a recomputation counts twice)."""

    name = "recompute-counter"

    def __init__(self):
        import collections

        from distributed.diagnostics.plugin import SchedulerPlugin

        self.counts = collections.Counter()
        counts = self.counts

        class Plugin(SchedulerPlugin):
            name = "recompute-counter"

            def transition(self, key, start, finish, *args, **kwargs):
                if start == "processing" and finish == "memory":
                    counts[key] += 1

        self.plugin = Plugin()


def test_delayed_dataframe_array(emulator):
    import time

    import dask
    import dask.array as da
    import dask.dataframe as dd
    import numpy as np
    import pandas as pd
    from distributed import Client

    cluster = make_cluster(emulator)
    fn = cluster.function_name
    assert fn.startswith("dask-lithops-default-") and fn.endswith("-1024mb")
    with cluster, Client(cluster) as client:
        t0 = time.monotonic()
        cluster.scale(2)
        assert time.monotonic() - t0 < 1.0  # scale() returns at once
        client.wait_for_workers(2, timeout=90)
        info = client.scheduler_info()["workers"]
        assert all(a.startswith("relay://") for a in info)
        assert {w["name"] for w in info.values()} == set(cluster.worker_spec)
        assert all(n.startswith("gcf-") for n in cluster.worker_spec)
        assert all(w["memory_limit"] == 1024 * 2**20 for w in info.values())
        assert cluster.scheduler_address.startswith("tls://")
        assert len(busy_instances(emulator, fn)) == 2  # one instance per worker request

        parts = [dask.delayed(lambda i: i * i)(i) for i in range(20)]
        assert dask.delayed(sum)(parts).compute() == sum(i * i for i in range(20))

        pdf = pd.DataFrame({"k": np.arange(4000) % 37, "v": np.arange(4000.0)})
        ddf = dd.from_pandas(pdf, npartitions=8)
        with dask.config.set({"dataframe.shuffle.method": "p2p"}):
            got = ddf.groupby("k").v.sum(split_out=4).compute().sort_index()
            shuffled = ddf.shuffle("k").compute()
        pd.testing.assert_series_equal(got, pdf.groupby("k").v.sum().sort_index(),
                                       check_names=False)
        assert len(shuffled) == len(pdf)
        assert sorted(shuffled.v) == sorted(pdf.v)

        x = da.arange(1_000_000, chunks=100_000)
        assert int((x * 2).sum().compute()) == 2 * sum(range(1_000_000))
    # close(): every request has returned, no instance is busy, nothing is held
    assert wait_no_busy(emulator, fn) == []
    assert not cluster.backend._held
    done = worker_requests(emulator, fn)
    assert len([r for r in done if r.status == 200]) >= 2
    usage = cluster.usage()
    assert usage["invocations"] == 2 and usage["running"] == 0
    assert usage["vcpu_seconds"] > 0 and usage["gb_seconds"] > 0
    expected = (usage["gb_seconds"] * 0.0000025 + usage["vcpu_seconds"] * 0.000024
                + 2 * 0.4 / 1e6)
    assert usage["estimated_cost_usd"] == pytest.approx(expected)
    assert all(r["reason"] for r in usage["workers"])


def test_adapt_from_zero_and_back(emulator):
    import time

    from distributed import Client

    cluster = make_cluster(emulator)
    fn = cluster.function_name
    with cluster, Client(cluster) as client:
        cluster.adapt(minimum=0, maximum=2, interval="300ms", wait_count=3,
                      target_duration="1s")
        assert len(client.scheduler_info()["workers"]) == 0
        futures = client.map(lambda i: (time.sleep(0.5), i)[1], range(12))
        assert client.gather(futures) == list(range(12))
        assert len(cluster.usage_tracker.records) >= 1
        del futures
        deadline = time.monotonic() + 60
        while (cluster.worker_spec or client.scheduler_info()["workers"]) and \
                time.monotonic() < deadline:
            time.sleep(0.3)
        assert not cluster.worker_spec and not client.scheduler_info()["workers"]
        assert wait_no_busy(emulator, fn) == []
    assert wait_no_busy(emulator, fn) == []
    assert not cluster.backend._held


def test_rotation_outlives_the_function_timeout(emulator):
    """runtime_timeout=16s, computation > 45s: workers rotate, no key is lost or recomputed."""
    import time

    import numpy as np
    from distributed import Client

    cluster = make_cluster(emulator, runtime_memory=1152, runtime_timeout=16)
    fn = cluster.function_name
    counter = RecomputeCounter()
    cluster.scheduler.add_plugin(counter.plugin, name=counter.name)

    def step(prev, i):
        time.sleep(1.0)
        return prev + np.full(10_000, i, dtype="int64")  # data held across rotations

    with cluster, Client(cluster) as client:
        cluster.scale(2)
        client.wait_for_workers(2, timeout=90)
        t0 = time.monotonic()
        futures = [client.submit(np.zeros, 10_000, dtype="int64", pure=False)]
        for i in range(1, 46):
            futures.append(client.submit(step, futures[-1], i, pure=False))
        results = client.gather(futures)
        assert time.monotonic() - t0 >= 45
        for i, r in enumerate(results):
            assert int(r[0]) == i * (i + 1) // 2
        assert max(counter.counts.values()) == 1, {
            k: v for k, v in counter.counts.items() if v > 1}
        assert len(cluster.worker_spec) == 2
        assert len(cluster.usage_tracker.records) >= 2 + 2 * 3  # each slot rotated 3+ times
    # no request hit the function's timeout: each worker retired itself in time
    assert wait_no_busy(emulator, fn) == []
    statuses = [r.status for r in worker_requests(emulator, fn)]
    assert statuses and all(s == 200 for s in statuses), statuses


def test_runtime_version_mismatch_is_a_clear_error(emulator, tmp_path):
    """A function deployed under the expected name with other versions: error, never a hang."""
    import shutil
    import time

    from dask_lithops.payload import RuntimeMismatch
    from dask_lithops.serverless.backends.gcp_functions.backend import GCPFunctionsBackend

    memory = 896
    cfg = GCPFunctionsBackend.resolve_config(
        endpoint_url=emulator.endpoint_url, credentials_path=str(emulator.credentials_file),
        project_name=emulator.project, region=emulator.region, runtime_memory=memory,
        runtime_timeout=120, extra_packages=[])
    backend = GCPFunctionsBackend(cfg)
    pkg = backend.build_runtime()
    # a stale runtime under the name the cluster expects: its requirements pin another msgpack
    stale = type(pkg)(**{**pkg.__dict__})
    stale.source_zip = str(tmp_path / "stale.zip")
    with zipfile.ZipFile(pkg.source_zip) as src, zipfile.ZipFile(stale.source_zip, "w") as out:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "requirements.txt":
                data = b"\n".join(b"msgpack==1.0.8" if line.startswith(b"msgpack==") else line
                                  for line in data.splitlines())
            out.writestr(item, data)
    backend.deploy_runtime(stale, memory, 120)
    fn = backend.get_runtime_key(pkg.name, memory, pkg.version)
    before = len(worker_requests(emulator, fn))
    t0 = time.monotonic()
    with pytest.raises(RuntimeMismatch, match=r"msgpack: client \S+, function \S+ 1\.0\.8"):
        make_cluster(emulator, runtime_memory=memory, extra_packages=[], n_workers=2)
    assert time.monotonic() - t0 < 60
    assert len(worker_requests(emulator, fn)) == before + 1  # the metadata request only
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_cli_build_deploy_list_delete(emulator):

    import dask
    from click.testing import CliRunner

    from dask_lithops.runtime.cli import runtime

    with dask.config.set({"lithops.gcp.credentials_path": str(emulator.credentials_file),
                          "lithops.gcp.project_name": emulator.project}):
        _cli_build_deploy_list_delete(emulator, CliRunner(), runtime)


def _cli_build_deploy_list_delete(emulator, cli, runtime):
    import re

    r = cli.invoke(runtime, ["build", "--backend", "gcp_functions"])
    assert r.exit_code == 0, r.output
    version = re.search(r"runtime default version ([0-9a-f]{10}) \(python3\d+\)", r.output).group(1)
    url = ["--backend", "gcp_functions", "--endpoint-url", emulator.endpoint_url]
    r = cli.invoke(runtime, ["deploy", "--memory", "512", "--timeout", "60", *url])
    assert r.exit_code == 0, r.output
    fn = f"dask-lithops-default-{version}-512mb"
    assert f"deployed {fn} (512 MB, timeout 60s)" in r.output
    r = cli.invoke(runtime, ["list", *url])
    assert fn in r.output
    r = cli.invoke(runtime, ["delete", "default", "--memory", "512", *url])
    assert f"deleted {fn}" in r.output
    r = cli.invoke(runtime, ["list", *url])
    assert fn not in r.output


def test_no_instance_available_is_retried_then_reported(emulator, caplog):
    """maxInstanceCount below the requested workers: 429s are retried with backoff, then
    the refused worker waits for capacity (invoked again every THROTTLED_RETRY s) and does
    not count as a crash: with no task finishing for longer than crash_loop_limit refusals
    take, the computation completes on the worker there is, with one warning."""
    import logging
    import time

    from distributed import Client

    from dask_lithops.serverless.cluster import THROTTLED_RETRY

    def nap(seconds, value):
        import time

        time.sleep(seconds)
        return value

    memory = 1088
    with make_cluster(emulator, runtime_memory=memory, max_workers=1):
        pass  # deploys the function with maxInstanceCount 1
    cluster = make_cluster(emulator, runtime_memory=memory, invoke_retries=2)
    fn = cluster.function_name
    with caplog.at_level(logging.WARNING, logger="dask_lithops"), cluster, \
            Client(cluster) as client:
        cluster.scale(2)
        client.wait_for_workers(1, timeout=90)
        # one task, longer than a refusal, the pause and a second refusal: nothing finishes
        assert client.submit(nap, THROTTLED_RETRY + 5, 7, pure=False).result(timeout=60) == 7
        assert sum(client.gather(client.map(lambda i: i + 1, range(50)))) == sum(range(1, 51))
        assert len(client.scheduler_info()["workers"]) == 1
        assert cluster.throttled >= 2, cluster.throttled  # refused, invoked again, refused
        assert cluster.worker_failures == []
        assert len(cluster.worker_spec) == 2  # the refused worker still waits for capacity
        close_start = time.monotonic()
    assert time.monotonic() - close_start < 10  # the pending re-invocation does not hold it
    warned = [r for r in caplog.records if "until there is capacity" in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in warned]
    message = warned[0].getMessage()
    assert "still refused the request (HTTP 429: no instance available) after 2 retries" \
        in message
    assert "lithops.gcp_functions.max_workers" in message and "max instances" in message
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR
                and r.name.startswith("dask_lithops")]  # no crash loop
    refused = [r for r in worker_requests(emulator, fn) if r.status == 429]
    assert len(refused) >= 6  # the first try and two retries, twice
    assert wait_no_busy(emulator, fn) == []
    assert not cluster.backend._held


def test_no_instance_at_all_fails_the_waiting_computation_then_recovers(emulator, caplog):
    """Another cluster holds the function's only instance: no worker of this one can start.
    After worker_start_timeout the waiting computation fails with the limit and the fix
    (never an endless wait); once the instance is free the refused worker starts and the
    cluster computes again."""
    import logging
    import time

    from distributed import Client

    from dask_lithops.failures import WorkerFailureError
    from dask_lithops.serverless.cluster import THROTTLED_RETRY

    memory = 1088
    with make_cluster(emulator, runtime_memory=memory, max_workers=1):
        pass  # deploys the function with maxInstanceCount 1
    # this cluster starts first: its start checks (the runtime's versions, reachability)
    # run on the function while the instance is free
    cluster = make_cluster(emulator, runtime_memory=memory, invoke_retries=1,
                           worker_start_timeout=15)
    holder = None
    try:
        with caplog.at_level(logging.WARNING, logger="dask_lithops"), cluster, \
                Client(cluster) as client:
            holder = make_cluster(emulator, runtime_memory=memory, n_workers=1)
            with Client(holder) as holder_client:
                holder_client.wait_for_workers(1, timeout=90)
            cluster.scale(1)
            start = time.monotonic()
            with pytest.raises(WorkerFailureError) as info:
                client.submit(lambda x: x + 1, 1).result(timeout=120)
            elapsed = time.monotonic() - start
            # the timeout, then the next refusal (every THROTTLED_RETRY s)
            assert 15 <= elapsed < 15 + THROTTLED_RETRY + 15, elapsed
            message = str(info.value)
            assert "no worker could start within worker_start_timeout (15s)" in message
            assert "maxInstanceCount 1 reached" in message and "max instances" in message
            assert cluster.worker_failures == []
            holder.close()  # the instance is free: the refused worker starts
            client.wait_for_workers(1, timeout=THROTTLED_RETRY + 60)
            assert client.submit(lambda x: x * 2, 21).result(timeout=30) == 42
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR
                  and r.name.startswith("dask_lithops")]
        assert len(errors) == 1 and "no worker could start" in errors[0], errors
    finally:
        if holder is not None:
            holder.close()
    assert wait_no_busy(emulator, cluster.function_name) == []


def test_workers_that_cannot_reach_a_running_scheduler_are_failures(emulator):
    """The path from the functions to a running scheduler refuses them (its start check
    went through): each worker ends as scheduler-unreachable after the grace, which for a
    running cluster is a failure, so the crash-loop limit ends the wait with the reason."""
    import socket
    import threading
    import time

    from distributed import Client
    from distributed.comm.addressing import parse_address, parse_host_port

    from dask_lithops.failures import WorkerFailureError
    from dask_lithops.serverless import ServerlessCluster

    class AcceptOnce:  # the start check's dial goes through; every later one is refused
        def __init__(self, host):
            self.listener = socket.create_server((host, 0))
            self.port = self.listener.getsockname()[1]
            threading.Thread(target=self._serve, daemon=True).start()

        def _serve(self):
            conn, _ = self.listener.accept()
            self.listener.close()
            conn.close()

    class PathGoneCluster(ServerlessCluster):
        path = None

        @property
        def worker_scheduler_address(self):
            scheme, location = parse_address(super().worker_scheduler_address)
            host, _ = parse_host_port(location)
            if self.path is None:
                self.path = AcceptOnce(host)
            return f"{scheme}://{host}:{self.path.port}"

    cluster = PathGoneCluster(
        backend="gcp_functions", endpoint_url=emulator.endpoint_url,
        credentials_path=str(emulator.credentials_file), project_name=emulator.project,
        region=emulator.region, contact_address=host_address(emulator), runtime_memory=1024,
        runtime_timeout=120, extra_packages=EXTRA, dashboard_address=None)
    with cluster, Client(cluster) as client:
        cluster.scale(1)
        start = time.monotonic()
        with pytest.raises(WorkerFailureError) as info:
            client.submit(lambda x: x + 1, 1).result(timeout=120)
        assert time.monotonic() - start < 60
        assert "could not reach the scheduler" in str(info.value)
        assert {f.kind for f in cluster.worker_failures} == {"error"}
        assert len(cluster.worker_failures) == cluster.crash_loop_limit
    assert wait_no_busy(emulator, cluster.function_name) == []


# ------------------------------------------------------ a client Cloud Run cannot dial


@pytest.fixture(scope="module")
def unreachable_emulator(tmp_path_factory):
    """An emulator with host_reachable=False (a laptop behind NAT, as Cloud Run sees it) and
    the runtime's function deployed in it: (emulator, function name)."""
    from dask_lithops.serverless.backends.gcp_functions.backend import GCPFunctionsBackend
    from dask_lithops.testing.sandbox import sandbox_unavailable

    reason = sandbox_unavailable()
    if reason:
        pytest.skip(f"host_reachable=False needs the network sandbox: {reason}")
    emulator_module = pytest.importorskip("dask_lithops.testing.gcp_functions_emulator")
    with emulator_module.CloudFunctionsEmulator(
            project="test-project", region="us-central1", host_reachable=False,
            idle_timeout=60, log_dir=tmp_path_factory.mktemp("gcf-unreachable")) as emu:
        backend = GCPFunctionsBackend(GCPFunctionsBackend.resolve_config(
            endpoint_url=emu.endpoint_url, credentials_path=str(emu.credentials_file),
            project_name=emu.project, region=emu.region, runtime_memory=1024,
            runtime_timeout=120, extra_packages=EXTRA))
        pkg = backend.build_runtime()
        backend.deploy_runtime(pkg, 1024, 120)
        yield emu, backend.get_runtime_key(pkg.name, 1024, pkg.version)


def test_local_scheduler_unreachable_fails_fast_with_the_fix(unreachable_emulator):
    """scheduler="local" on a host Cloud Run cannot dial: a clear error within
    worker_start_timeout, before any worker request, and nothing left running."""
    import re
    import threading
    import time

    from dask_lithops.serverless.reachability import SchedulerUnreachable

    emu, fn = unreachable_emulator
    threads = {t.name for t in threading.enumerate()}
    t0 = time.monotonic()
    with pytest.raises(SchedulerUnreachable) as info:
        make_cluster(emu, scheduler="local", n_workers=2, worker_start_timeout="15s")
    assert time.monotonic() - t0 < 15
    msg = str(info.value)
    host = re.escape(emu.host_address)
    assert re.search(rf"the scheduler at {host}:\d+ \(no answer within 5s\)", msg), msg
    assert re.search(rf"the relay at {host}:\d+ \(no answer within 5s\)", msg), msg
    assert 'scheduler="aws_ec2"' in msg and "contact_address" in msg, msg
    assert "vpc_connector" in msg, msg
    # the function answered two requests (its versions, the dial check): no worker's
    assert [r.status for r in worker_requests(emu, fn)] == [200, 200]
    assert wait_no_busy(emu, fn) == []
    # the scheduler and the relay were closed, no invoke thread is left
    deadline = time.monotonic() + 10
    while [t for t in threading.enumerate()
           if t.name not in threads and t.is_alive() and "invoke" in t.name]:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(1)
    assert len(worker_requests(emu, fn)) == 2  # and none came later
