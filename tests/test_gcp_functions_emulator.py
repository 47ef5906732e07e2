"""The offline Cloud Run functions emulator, through Google's own client libraries.

One emulator for the module; each test deploys its own function (builds of the
same requirements are cached, so only the first one runs pip).
"""

from __future__ import annotations

import concurrent.futures
import io
import os
import socket
import time
import zipfile

import pytest

pytest.importorskip("functions_framework")
pytest.importorskip("google.auth")

import google.auth.transport.requests as gtr  # noqa: E402
import requests  # noqa: E402
from google.oauth2 import service_account  # noqa: E402

from dask_lithops.testing.fixtures import gcp_functions_emulator  # noqa: E402,F401

PARENT = "projects/test-project/locations/us-central1"
SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]

MAIN = '''
import os, socket, time

def handle(request):
    d = request.get_json(silent=True) or {}
    if d.get("sleep"):
        time.sleep(d["sleep"])
    if d.get("mb"):
        blocks = [bytearray(1024 * 1024) for _ in range(d["mb"])]
        for b in blocks:
            for i in range(0, len(b), 4096):
                b[i] = 1
    if d.get("dial"):
        out = {}
        for host, port in d["dial"]:
            try:
                socket.create_connection((host, port), timeout=d["timeout"]).close()
                out[f"{host}:{port}"] = None
            except OSError as e:
                out[f"{host}:{port}"] = type(e).__name__
        return {"dial": out}
    if d.get("read"):
        try:
            return {"read": open(d["read"]).read()}
        except OSError as e:
            return {"error": type(e).__name__}
    return {"name": d.get("name"), "pid": os.getpid(), "k_service": os.environ.get("K_SERVICE"),
            "greeting": os.environ.get("GREETING"), "path": request.path}
'''


def source_zip(main: str = MAIN, requirements: str = "") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("main.py", main)
        z.writestr("requirements.txt", requirements)
    return buf.getvalue()


@pytest.fixture(scope="module")
def api(gcp_functions_emulator):  # noqa: F811
    creds = service_account.Credentials.from_service_account_file(
        str(gcp_functions_emulator.credentials_file), scopes=SCOPES)
    return gtr.AuthorizedSession(creds)


def wait(emu, api, op: dict, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while not op["done"]:
        assert time.monotonic() < deadline, op
        time.sleep(0.2)
        r = api.get(f"{emu.endpoint_url}/v2/{op['name']}")
        assert r.status_code == 200, r.text
        op = r.json()
    return op


def deploy(emu, api, function_id: str, code: bytes | None = None, **service) -> dict:
    """generateUploadUrl, the upload, create, wait for the operation; the operation."""
    r = api.post(f"{emu.endpoint_url}/v2/{PARENT}/functions:generateUploadUrl", json={})
    assert r.status_code == 200, r.text
    up = r.json()
    put = requests.put(up["uploadUrl"], data=code or source_zip(),
                       headers={"content-type": "application/zip"})
    assert put.status_code == 200, put.text
    service.setdefault("availableMemory", "256Mi")
    service.setdefault("timeoutSeconds", 30)
    body = {"buildConfig": {"runtime": "python311", "entryPoint": "handle",
                            "source": {"storageSource": up["storageSource"]}},
            "serviceConfig": service}
    r = api.post(f"{emu.endpoint_url}/v2/{PARENT}/functions", params={"functionId": function_id},
                 json=body)
    assert r.status_code == 200, r.text
    return wait(emu, api, r.json())


def caller(emu, uri: str) -> gtr.AuthorizedSession:
    """A session sending ID tokens for ``uri``, fetched by google-auth's service-account flow."""
    idc = service_account.IDTokenCredentials.from_service_account_file(
        str(emu.credentials_file), target_audience=uri)
    return gtr.AuthorizedSession(idc)


def test_deploy_invoke_through_the_front_end(gcp_functions_emulator, api):  # noqa: F811
    emu = gcp_functions_emulator
    op = deploy(emu, api, "hello", environmentVariables={"GREETING": "hi"})
    assert "error" not in op, op
    fn = op["response"]
    assert fn["state"] == "ACTIVE" and fn["name"] == f"{PARENT}/functions/hello"
    uri = fn["serviceConfig"]["uri"]
    got = api.get(f"{emu.endpoint_url}/v2/{PARENT}/functions/hello").json()
    assert got["serviceConfig"]["uri"] == uri and got["state"] == "ACTIVE"
    listed = api.get(f"{emu.endpoint_url}/v2/{PARENT}/functions").json()["functions"]
    assert [f["name"] for f in listed] == [fn["name"]]

    session = caller(emu, uri)
    r = session.post(uri + "/some/path?x=1", json={"name": "dask"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["name"] == "dask" and body["k_service"] == "hello"
    assert body["greeting"] == "hi" and body["path"] == "/some/path"
    r2 = session.post(uri, json={"name": "again"})
    assert r2.json()["pid"] == body["pid"]  # the warm instance served it
    if emu.filesystem_isolated:  # the client's files are not there; the source is
        secret = f"/tmp/client-secret-{os.getpid()}"
        with open(secret, "w") as f:
            f.write("the client's")
        try:
            assert session.post(uri, json={"read": secret}).json() == \
                {"error": "FileNotFoundError"}
        finally:
            os.unlink(secret)
        assert "def handle" in session.post(uri, json={"read": "/workspace/main.py"}).json()[
            "read"]
    recs = emu.requests("hello")
    assert [(rec.status, rec.cold) for rec in recs][:2] == [(200, True), (200, False)]
    inst = [i for i in emu.instances if i.function == "hello"]
    assert len(inst) == 1 and inst[0].requests_served == len(recs)
    if emu.sandboxed:
        assert inst[0].netns and inst[0].memory_mb == 256

    # no token, a token for another audience, an access token: all refused
    assert requests.post(uri, json={}).status_code == 401
    other = caller(emu, "http://127.0.0.1:1")
    assert other.post(uri, json={}).status_code == 401
    assert api.post(uri, json={}).status_code == 401
    # the API needs its bearer token too, and answers in Google's error shape
    r = requests.get(f"{emu.endpoint_url}/v2/{PARENT}/functions/hello")
    assert r.status_code == 401 and r.json()["error"]["status"] == "UNAUTHENTICATED"


def test_google_client_library_and_error_shapes(gcp_functions_emulator):  # noqa: F811
    functions_v2 = pytest.importorskip("google.cloud.functions_v2")
    from google.api_core import exceptions
    from google.api_core.client_options import ClientOptions
    from google.protobuf import field_mask_pb2

    emu = gcp_functions_emulator
    creds = service_account.Credentials.from_service_account_file(
        str(emu.credentials_file), scopes=SCOPES)
    c = functions_v2.FunctionServiceClient(
        credentials=creds, transport="rest",
        client_options=ClientOptions(api_endpoint=emu.endpoint_url))
    up = c.generate_upload_url(request={"parent": PARENT})
    assert requests.put(up.upload_url, data=source_zip(),
                        headers={"content-type": "application/zip"}).status_code == 200
    fn = functions_v2.Function(
        build_config=functions_v2.BuildConfig(
            runtime="python311", entry_point="handle",
            source=functions_v2.Source(storage_source=up.storage_source)),
        service_config=functions_v2.ServiceConfig(available_memory="256Mi", timeout_seconds=30))
    created = c.create_function(parent=PARENT, function=fn, function_id="lib").result(timeout=300)
    assert created.state == functions_v2.Function.State.ACTIVE
    with pytest.raises(exceptions.Conflict, match="already exists"):
        c.create_function(parent=PARENT, function=fn, function_id="lib")
    with pytest.raises(exceptions.NotFound):
        c.get_function(name=f"{PARENT}/functions/missing")
    bad = functions_v2.Function(
        build_config=fn.build_config,
        service_config=functions_v2.ServiceConfig(available_memory="64Mi"))
    with pytest.raises(exceptions.BadRequest, match="availableMemory"):
        c.create_function(parent=PARENT, function=bad, function_id="bad")

    patched = c.update_function(
        function=functions_v2.Function(
            name=created.name,
            service_config=functions_v2.ServiceConfig(available_memory="512Mi",
                                                      environment_variables={"GREETING": "v2"})),
        update_mask=field_mask_pb2.FieldMask(paths=["service_config.available_memory",
                                                   "service_config.environment_variables"]),
    ).result(timeout=120)
    assert patched.service_config.available_memory == "512Mi"
    assert patched.service_config.timeout_seconds == 30  # not in the mask: kept
    r = caller(emu, patched.service_config.uri).post(patched.service_config.uri, json={})
    assert r.status_code == 200 and r.json()["greeting"] == "v2", r.text

    c.delete_function(name=created.name).result(timeout=60)
    with pytest.raises(exceptions.NotFound):
        c.get_function(name=created.name)
    assert not [i for i in emu.instances if i.function == "lib"]


def test_failed_build_fails_the_operation_with_pips_error(gcp_functions_emulator, api):  # noqa: F811
    emu = gcp_functions_emulator
    code = source_zip(requirements="dask-lithops-no-such-package-zz==0.0.1\n")
    op = deploy(emu, api, "broken", code)
    assert op["error"]["code"] == 3, op
    assert "pip install" in op["error"]["message"]
    assert "dask-lithops-no-such-package-zz" in op["error"]["message"]
    fn = api.get(f"{emu.endpoint_url}/v2/{PARENT}/functions/broken").json()
    assert fn["state"] == "FAILED" and "dask-lithops-no-such-package-zz" in \
        fn["stateMessages"][0]["message"]


def test_max_instances_and_request_timeout(gcp_functions_emulator, api):  # noqa: F811
    emu = gcp_functions_emulator
    op = deploy(emu, api, "limits", maxInstanceCount=1, timeoutSeconds=3)
    uri = op["response"]["serviceConfig"]["uri"]
    session = caller(emu, uri)
    session.post(uri, json={}).raise_for_status()  # warm, so the slow call starts at once
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        slow = pool.submit(session.post, uri, json={"sleep": 2})
        time.sleep(0.5)
        # one request per instance and at most one instance: no room for a second
        busy = session.post(uri, json={})
        assert busy.status_code == 429, busy.text
        assert slow.result().status_code == 200

    before = [i for i in emu.instances if i.function == "limits"]
    t0 = time.monotonic()
    r = session.post(uri, json={"sleep": 30})
    assert r.status_code == 504 and time.monotonic() - t0 < 10
    # the instance that ran over its timeout is stopped by PID
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{i.pid}") for i in before) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(os.path.exists(f"/proc/{i.pid}") for i in before)



def test_request_concurrency_above_one_shares_an_instance(gcp_functions_emulator, api):  # noqa: F811
    emu = gcp_functions_emulator
    op = deploy(emu, api, "shared", maxInstanceCount=1, maxInstanceRequestConcurrency=2,
                availableCpu="1")
    uri = op["response"]["serviceConfig"]["uri"]
    session = caller(emu, uri)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        two = [pool.submit(session.post, uri, json={"sleep": 2}) for _ in range(2)]
        time.sleep(1)
        third = session.post(uri, json={})  # two slots on the one instance are taken
        assert third.status_code == 429, third.text
        pids = {f.result().json()["pid"] for f in two}
    assert len(pids) == 1  # both ran side by side in one instance


def test_instance_that_cannot_start_fails_the_request_with_its_error(gcp_functions_emulator,
                                                                      api):  # noqa: F811
    emu = gcp_functions_emulator
    code = source_zip(main="import no_such_module_zz\n\ndef handle(request):\n    return 'x'\n")
    op = deploy(emu, api, "broken-main")
    assert "error" not in op  # the build installs requirements; importing main.py is at start
    patch = api.post(f"{emu.endpoint_url}/v2/{PARENT}/functions:generateUploadUrl", json={})
    up = patch.json()
    requests.put(up["uploadUrl"], data=code, headers={"content-type": "application/zip"})
    r = api.patch(f"{emu.endpoint_url}/v2/{PARENT}/functions/broken-main",
                  params={"updateMask": "buildConfig.source"},
                  json={"buildConfig": {"source": {"storageSource": up["storageSource"]}}})
    assert r.status_code == 200, r.text
    assert "error" not in wait(emu, api, r.json())
    uri = op["response"]["serviceConfig"]["uri"]
    r = caller(emu, uri).post(uri, json={})
    assert r.status_code == 500 and "failed to start" in r.text, r.text
    assert "No module named 'no_such_module_zz'" in r.text


def test_memory_limit(gcp_functions_emulator, api):  # noqa: F811
    emu = gcp_functions_emulator
    op = deploy(emu, api, "hog", timeoutSeconds=30)
    uri = op["response"]["serviceConfig"]["uri"]
    session = caller(emu, uri)
    r = session.post(uri, json={"mb": 400})  # a 504 would mean it ran into the timeout
    if emu.memory_limit_mode == "cgroup-v1":
        assert r.status_code == 503 and "Memory limit of 256 MiB exceeded" in r.text, r.text
    else:
        assert r.status_code >= 500, r.text
    after = session.post(uri, json={"name": "after"})
    assert after.status_code == 200 and after.json()["name"] == "after", after.text
    assert [rec.cold for rec in emu.requests("hog")] == [True, True]  # a new instance


def test_idle_instances_are_reaped(gcp_functions_emulator, api):  # noqa: F811
    emu = gcp_functions_emulator
    op = deploy(emu, api, "idle")
    uri = op["response"]["serviceConfig"]["uri"]
    caller(emu, uri).post(uri, json={}).raise_for_status()
    (inst,) = [i for i in emu.instances if i.function == "idle"]
    saved = emu.idle_timeout
    emu.idle_timeout = 0.5
    try:
        deadline = time.monotonic() + 10
        while any(i.function == "idle" for i in emu.instances) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        emu.idle_timeout = saved
    assert not any(i.function == "idle" for i in emu.instances)
    assert not os.path.exists(f"/proc/{inst.pid}")


def test_cli_starts_and_stops_the_emulator(tmp_path):
    import json
    import signal
    import subprocess
    import sys

    from dask_lithops.testing.sandbox import sandbox_unavailable

    unreachable = sandbox_unavailable() is None  # --no-host-reachable needs the sandbox
    proc = subprocess.Popen(
        [sys.executable, "-m", "dask_lithops.testing.lambda_emulator.cli", "start", "--cloud",
         "gcp", "--project", "cli-project", "--log-dir", str(tmp_path)]
        + (["--no-host-reachable"] if unreachable else []),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "GOOGLE_APPLICATION_CREDENTIALS" in line:
                break
        out = "".join(lines)
        assert "Cloud Run functions emulator listening at" in out, out
        if unreachable:
            assert "(unreachable: --no-host-reachable)" in out, out
            status = requests.get(out.split("listening at ")[1].split()[0]
                                  + "/_emulator/status").json()
            assert status["host_reachable"] is False and status["sandboxed"] is True
        key = line.strip().split("=", 1)[1]
        info = json.load(open(key))
        assert info["type"] == "service_account" and info["project_id"] == "cli-project"
        assert oct(os.stat(key).st_mode & 0o777) == "0o600"
    finally:
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0 and "emulator stopped" in rest
    assert not os.path.exists(key)


def test_stop_leaves_no_instance_namespace_or_directory(tmp_path):
    import subprocess

    from dask_lithops.testing.gcp_functions_emulator import CloudFunctionsEmulator

    emu = CloudFunctionsEmulator(log_dir=tmp_path).start()
    try:
        creds = service_account.Credentials.from_service_account_file(
            str(emu.credentials_file), scopes=SCOPES)
        op = deploy(emu, gtr.AuthorizedSession(creds), "leak")
        uri = op["response"]["serviceConfig"]["uri"]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            busy = pool.submit(caller(emu, uri).post, uri, json={"sleep": 20})
            deadline = time.monotonic() + 30
            while not [i for i in emu.instances if i.in_flight and i.pid]:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            made = emu.resources()
            pids = [i.pid for i in emu.instances]
            emu.stop()  # with a request in flight
            assert busy.result().status_code >= 500
    finally:
        emu.stop()
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}")
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(ns in netns for ns in made["namespaces"])
    if made["bridge"]:
        assert subprocess.run(["ip", "link", "show", made["bridge"]],
                              capture_output=True).returncode != 0
    assert not os.path.exists(made["workdir"])
    if made["cgroup"]:
        assert not os.path.exists(made["cgroup"])


# ------------------------------------------------------------ host_reachable=False


@pytest.fixture(scope="module")
def unreachable_emulator(tmp_path_factory):
    """An emulator whose instances cannot dial this host (a client behind NAT)."""
    from dask_lithops.testing.gcp_functions_emulator import CloudFunctionsEmulator
    from dask_lithops.testing.sandbox import sandbox_unavailable

    reason = sandbox_unavailable()
    if reason:
        pytest.skip(f"host_reachable=False needs the network sandbox: {reason}")
    with CloudFunctionsEmulator(host_reachable=False, idle_timeout=120,
                                log_dir=tmp_path_factory.mktemp("gcf-unreachable")) as emu:
        yield emu


def host_listeners(emu) -> list[socket.socket]:
    """Listening sockets on this host's addresses an instance would dial: the address the
    sandboxes reach it at, and another of its addresses (not a bridge of the emulators)."""
    import subprocess

    addresses = [emu.host_address]
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"],
                         capture_output=True, text=True).stdout
    for line in out.splitlines():
        dev, addr = line.split()[1], line.split()[3].split("/")[0]
        if not dev.startswith("dl") and addr not in addresses:
            addresses.append(addr)
            break
    return [socket.create_server((a, 0)) for a in addresses]


def dial_from_a_function(emu, listeners) -> dict:
    """What a function's own ``socket.create_connection`` to each listener gave."""
    creds = service_account.Credentials.from_service_account_file(
        str(emu.credentials_file), scopes=SCOPES)
    op = deploy(emu, gtr.AuthorizedSession(creds), "dialer")
    assert "error" not in op, op
    uri = op["response"]["serviceConfig"]["uri"]
    targets = [s.getsockname()[:2] for s in listeners]
    r = caller(emu, uri).post(uri, json={"dial": targets, "timeout": 3})
    assert r.status_code == 200, r.text
    return r.json()["dial"]


def test_instances_dial_the_host_by_default(gcp_functions_emulator):  # noqa: F811
    listeners = host_listeners(gcp_functions_emulator)
    try:
        got = dial_from_a_function(gcp_functions_emulator, listeners)
    finally:
        for s in listeners:
            s.close()
    assert got and all(v is None for v in got.values()), got


def test_host_reachable_false_instances_cannot_dial_the_host(unreachable_emulator):
    """Requests still reach the instance (inbound); its connections to the host do not."""
    emu = unreachable_emulator
    assert emu.sandboxed and not emu.host_reachable
    listeners = host_listeners(emu)
    try:
        got = dial_from_a_function(emu, listeners)
    finally:
        for s in listeners:
            s.close()
    assert len(got) == len(listeners) >= 1
    assert all(v == "TimeoutError" for v in got.values()), got  # dropped, not refused
    status = requests.get(f"{emu.endpoint_url}/_emulator/status").json()
    assert status["host_reachable"] is False and status["sandboxed"] is True


def test_host_reachable_false_without_the_sandbox_is_a_clear_error(tmp_path):
    from dask_lithops.testing.gcp_functions_emulator import CloudFunctionsEmulator

    emu = CloudFunctionsEmulator(sandbox=False, host_reachable=False, log_dir=tmp_path)
    with pytest.raises(RuntimeError, match=r"host_reachable=False needs the network sandbox"):
        emu.start()
    assert not emu.started and not emu.workdir.exists()
