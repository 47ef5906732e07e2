"""The offline Lambda emulator, end to end through boto3."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from dask_lithops.testing.lambda_emulator import LambdaEmulator, sandbox_unavailable

ROLE = "arn:aws:iam::123456789012:role/lambda-role"
SANDBOX_REASON = sandbox_unavailable()
needs_sandbox = pytest.mark.skipif(
    SANDBOX_REASON is not None,
    reason=f"network-namespace sandboxes unavailable: {SANDBOX_REASON}")

HANDLERS = r'''
import json, os, socket, sys, time

_server = None

def echo(event, context):
    print("echo", json.dumps(event))
    return {"event": event, "remaining_ms": context.get_remaining_time_in_millis(),
            "request_id": context.aws_request_id, "arn": context.invoked_function_arn,
            "memory": context.memory_limit_in_mb, "pid": os.getpid(),
            "env": {k: os.environ.get(k) for k in (
                "AWS_LAMBDA_FUNCTION_NAME", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "LAMBDA_TASK_ROOT",
                "_HANDLER", "AWS_REGION", "AWS_LAMBDA_LOG_STREAM_NAME", "GREETING")},
            "sys_path": sys.path}

def fail(event, context):
    raise ValueError("boom: " + str(event.get("why")))

def sleep(event, context):
    time.sleep(event.get("seconds", 10))
    return "slept"

def hog(event, context):
    blocks = []
    for _ in range(event.get("mb", 1024)):
        blocks.append(bytearray(1024 * 1024))
        for i in range(0, len(blocks[-1]), 4096):
            blocks[-1][i] = 1
    return len(blocks)

def crash(event, context):
    os.kill(os.getpid(), 9)

def imports(event, context):
    import boto3
    out = {"boto3": boto3.__version__}
    for name in event["modules"]:
        try:
            __import__(name)
            out[name] = "ok"
        except ImportError as e:
            out[name] = f"ImportError: {e}"
    return out

def listen(event, context):
    global _server
    _server = socket.socket()
    _server.bind(("0.0.0.0", 0))
    _server.listen(5)
    return {"port": _server.getsockname()[1]}

def dial(event, context):
    s = socket.create_connection((event["host"], event["port"]), timeout=5)
    data = s.recv(100).decode()
    s.close()
    return data
'''


def make_zip(files: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, content in files.items():
            z.writestr(name, content)
    return buf.getvalue()


CODE = make_zip({"app.py": HANDLERS})


def deploy(client, name, handler="app.echo", code=CODE, **kw):
    kw.setdefault("Timeout", 5)
    kw.setdefault("MemorySize", 128)
    r = client.create_function(FunctionName=name, Runtime="python3.11", Role=ROLE,
                               Handler=handler, Code={"ZipFile": code}, **kw)
    client.get_waiter("function_active_v2").wait(FunctionName=name)
    return r


def invoke(client, name, event=None, **kw):
    kw.setdefault("InvocationType", "RequestResponse")
    if kw["InvocationType"] == "RequestResponse":
        kw.setdefault("LogType", "Tail")
    r = client.invoke(FunctionName=name, Payload=json.dumps(event or {}), **kw)
    r["Body"] = json.loads(r["Payload"].read())
    if "FunctionError" in r and "LogResult" in r:  # shown by pytest when a test fails
        print(f"invocation of {name} failed: {r['Body']}\n"
              + base64.b64decode(r["LogResult"]).decode("utf-8", "replace"))
    return r


@pytest.fixture
def client(lambda_emulator):
    return boto3.client("lambda", endpoint_url=lambda_emulator.endpoint_url,
                        region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing",
                        config=Config(retries={"total_max_attempts": 1}, read_timeout=60))


def test_deploy_and_sync_invoke_cold_then_warm(lambda_emulator, client):
    r = deploy(client, "echo", Environment={"Variables": {"GREETING": "hi"}}, Timeout=7)
    assert r["State"] in ("Pending", "Active") and r["FunctionName"] == "echo"
    cfg = client.get_function_configuration(FunctionName="echo")
    assert cfg["State"] == "Active" and cfg["Timeout"] == 7 and cfg["Runtime"] == "python3.11"
    assert client.get_function(FunctionName="echo")["Configuration"]["CodeSha256"]
    assert [f["FunctionName"] for f in client.list_functions()["Functions"]] == ["echo"]

    first = invoke(client, "echo", {"n": 1}, LogType="Tail")
    assert first["StatusCode"] == 200 and "FunctionError" not in first
    assert first["ExecutedVersion"] == "$LATEST"
    body = first["Body"]
    assert body["event"] == {"n": 1}
    assert 6000 < body["remaining_ms"] <= 7000
    assert body["arn"] == lambda_emulator.arn("echo")
    assert body["memory"] == "128"
    env = body["env"]
    assert env["AWS_LAMBDA_FUNCTION_NAME"] == "echo" and env["GREETING"] == "hi"
    assert env["_HANDLER"] == "app.echo" and env["AWS_REGION"] == "us-east-1"
    assert body["sys_path"][1] == env["LAMBDA_TASK_ROOT"]
    tail = base64.b64decode(first["LogResult"]).decode()
    rid = first["ResponseMetadata"]["RequestId"]
    assert f"START RequestId: {rid}" in tail and 'echo {"n": 1}' in tail
    assert "Init Duration" in tail and f"REPORT RequestId: {rid}" in tail
    assert lambda_emulator.invocation(rid).cold

    second = invoke(client, "echo", {"n": 2})
    assert second["Body"]["pid"] == body["pid"]  # the warm environment was reused
    rid2 = second["ResponseMetadata"]["RequestId"]
    assert not lambda_emulator.invocation(rid2).cold
    assert "Init Duration" not in lambda_emulator.invocation_log(rid2)
    [e] = lambda_emulator.environments
    assert (e.pid, e.cold_invocations, e.warm_invocations) == (body["pid"], 1, 1)
    assert e.state == "idle"
    streams = list((lambda_emulator.log_dir / "echo").iterdir())
    assert len(streams) == 1 and 'echo {"n": 2}' in streams[0].read_text()


def test_event_invoke_returns_202_at_once_and_runs(lambda_emulator, client):
    deploy(client, "slow", handler="app.sleep")
    t0 = time.monotonic()
    r = client.invoke(FunctionName="slow", InvocationType="Event",
                      Payload=json.dumps({"seconds": 1}))
    assert r["StatusCode"] == 202 and time.monotonic() - t0 < 0.5
    rid = r["ResponseMetadata"]["RequestId"]
    deadline = time.monotonic() + 15
    while lambda_emulator.invocation(rid).status != "succeeded":
        assert time.monotonic() < deadline, lambda_emulator.invocation(rid)
        time.sleep(0.1)
    assert "END RequestId" in lambda_emulator.invocation_log(rid)


def test_handler_exception_is_unhandled_function_error(client):
    deploy(client, "fail", handler="app.fail")
    r = invoke(client, "fail", {"why": "testing"}, LogType="Tail")
    assert r["StatusCode"] == 200 and r["FunctionError"] == "Unhandled"
    body = r["Body"]
    assert body["errorType"] == "ValueError" and body["errorMessage"] == "boom: testing"
    assert body["requestId"] == r["ResponseMetadata"]["RequestId"]
    assert any("raise ValueError" in line for line in body["stackTrace"])
    assert "[ERROR] ValueError: boom: testing" in base64.b64decode(r["LogResult"]).decode()


def test_timeout_fails_the_invocation_and_replaces_the_environment(lambda_emulator, client):
    deploy(client, "sleepy", handler="app.sleep", Timeout=1)
    t0 = time.monotonic()
    r = invoke(client, "sleepy", {"seconds": 30})
    assert time.monotonic() - t0 < 5
    assert r["FunctionError"] == "Unhandled"
    assert r["Body"]["errorType"] == "Sandbox.Timedout"
    assert "Task timed out after 1.00 seconds" in r["Body"]["errorMessage"]
    rid = r["ResponseMetadata"]["RequestId"]
    assert lambda_emulator.invocation(rid).status == "timedout"
    assert "Task timed out after 1.00 seconds" in lambda_emulator.invocation_log(rid)
    r2 = invoke(client, "sleepy", {"seconds": 0})
    assert r2["Body"] == "slept"
    assert lambda_emulator.invocation(r2["ResponseMetadata"]["RequestId"]).cold


def test_out_of_memory_fails_promptly(lambda_emulator, client):
    deploy(client, "hog", handler="app.hog", MemorySize=128, Timeout=30)
    t0 = time.monotonic()
    r = invoke(client, "hog", {"mb": 600})
    assert time.monotonic() - t0 < 15
    assert r["FunctionError"] == "Unhandled"
    if lambda_emulator.memory_limit_mode == "cgroup-v1":
        assert r["Body"]["errorType"] == "Runtime.OutOfMemory"
        assert "Runtime exited with error: signal: killed" in r["Body"]["errorMessage"]
    else:
        assert r["Body"]["errorType"] == "MemoryError"
    assert invoke(client, "hog", {"mb": 10})["Body"] == 10


def test_crashed_environment_fails_its_invocation(client):
    deploy(client, "crash", handler="app.crash", Timeout=30)
    t0 = time.monotonic()
    r = invoke(client, "crash")
    assert time.monotonic() - t0 < 5
    assert r["Body"]["errorType"] == "Runtime.ExitError"
    assert r["Body"]["errorMessage"].endswith("Runtime exited with error: signal: killed")


def test_host_only_packages_are_not_importable(client):
    deploy(client, "imports", handler="app.imports")
    body = invoke(client, "imports", {"modules": ["dask", "tornado", "json", "awslambdaric"]})["Body"]
    assert body["dask"].startswith("ImportError") and body["tornado"].startswith("ImportError")
    assert body["json"] == "ok" and body["awslambdaric"] == "ok" and body["boto3"]

    deploy(client, "needs-numpy", handler="app.handler",
           code=make_zip({"app.py": "import numpy\ndef handler(e, c):\n    return 1\n"}))
    r = invoke(client, "needs-numpy")
    assert r["FunctionError"] == "Unhandled"
    assert r["Body"]["errorType"] == "Runtime.ImportModuleError"
    assert "No module named 'numpy'" in r["Body"]["errorMessage"]


def test_layers_and_updates(client):
    layer = client.publish_layer_version(
        LayerName="greet", Content={"ZipFile": make_zip({"python/greet.py": "WORD = 'layer'\n"})},
        CompatibleRuntimes=["python3.11"])
    assert layer["Version"] == 1
    code = make_zip({"app.py": "import greet, os\n"
                               "def handler(e, c):\n    return [greet.WORD, os.environ.get('X')]\n"})
    deploy(client, "layered", handler="app.handler", code=code, Layers=[layer["LayerVersionArn"]])
    assert invoke(client, "layered")["Body"] == ["layer", None]

    client.update_function_configuration(FunctionName="layered",
                                         Environment={"Variables": {"X": "1"}})
    client.get_waiter("function_updated_v2").wait(FunctionName="layered")
    assert invoke(client, "layered")["Body"] == ["layer", "1"]

    client.update_function_code(FunctionName="layered", ZipFile=make_zip(
        {"app.py": "def handler(e, c):\n    return 'v2'\n"}))
    client.get_waiter("function_updated_v2").wait(FunctionName="layered")
    assert invoke(client, "layered")["Body"] == "v2"
    client.delete_function(FunctionName="layered")
    with pytest.raises(client.exceptions.ResourceNotFoundException):
        client.get_function(FunctionName="layered")


def test_errors_have_lambdas_codes(client):
    with pytest.raises(client.exceptions.ResourceNotFoundException) as e:
        client.invoke(FunctionName="nope", Payload=b"{}")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    assert "Function not found" in e.value.response["Error"]["Message"]
    for bad in ({"MemorySize": 20000}, {"Timeout": 901}, {"Runtime": "nodejs20.x"},
                {"Environment": {"Variables": {"AWS_REGION": "x"}}}):
        kw = {"Runtime": "python3.11", "MemorySize": 128, "Timeout": 3, **bad}
        with pytest.raises(client.exceptions.InvalidParameterValueException):
            client.create_function(FunctionName="bad", Role=ROLE, Handler="app.echo",
                                   Code={"ZipFile": CODE}, **kw)
    deploy(client, "dup")
    with pytest.raises(client.exceptions.ResourceConflictException):
        deploy(client, "dup")


def test_payload_limits(lambda_emulator, client):
    deploy(client, "echo")
    big = json.dumps({"x": "a" * (6 * 1024 * 1024)})
    with pytest.raises(ClientError) as e:
        client.invoke(FunctionName="echo", Payload=big)
    assert e.value.response["Error"]["Code"] == "RequestEntityTooLargeException"
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 413
    with pytest.raises(ClientError) as e:
        client.invoke(FunctionName="echo", InvocationType="Event",
                      Payload=json.dumps({"x": "a" * (1024 * 1024)}))
    assert e.value.response["Error"]["Code"] == "RequestEntityTooLargeException"
    assert "too large for the Event invocation type" in e.value.response["Error"]["Message"]
    ok = json.dumps({"x": "a" * (5 * 1024 * 1024)})
    assert invoke(client, "echo", json.loads(ok))["StatusCode"] == 200


def test_concurrency_limit_throttles_sync_and_queues_events(lambda_emulator, client):
    deploy(client, "slow", handler="app.sleep")
    client.put_function_concurrency(FunctionName="slow", ReservedConcurrentExecutions=1)
    assert client.get_function(FunctionName="slow")["Concurrency"] == {
        "ReservedConcurrentExecutions": 1}
    results = []
    t = threading.Thread(target=lambda: results.append(invoke(client, "slow", {"seconds": 2})))
    t.start()
    deadline = time.monotonic() + 10
    while not any(e.state == "busy" for e in lambda_emulator.environments):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with pytest.raises(client.exceptions.TooManyRequestsException) as e:
        client.invoke(FunctionName="slow", Payload=b'{"seconds": 0}')
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 429
    assert e.value.response["Reason"] == "ReservedFunctionConcurrentInvocationLimitExceeded"
    # Event invocations are accepted anyway and wait for the environment
    rids = [client.invoke(FunctionName="slow", InvocationType="Event",
                          Payload=b'{"seconds": 0}')["ResponseMetadata"]["RequestId"]
            for _ in range(3)]
    t.join()
    assert results[0]["Body"] == "slept"
    deadline = time.monotonic() + 15
    while not all(lambda_emulator.invocation(r).status == "succeeded" for r in rids):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert len({lambda_emulator.invocation(r).environment for r in rids}) == 1
    assert client.get_account_settings()["AccountLimit"]["UnreservedConcurrentExecutions"] == (
        lambda_emulator.account_concurrency - 1)


def test_account_concurrency_limit():
    with LambdaEmulator(account_concurrency=1, idle_timeout=30) as emu:
        c = emu.client()
        deploy(c, "slow", handler="app.sleep")
        deploy(c, "other", handler="app.sleep")
        t = threading.Thread(target=invoke, args=(c, "slow", {"seconds": 2}))
        t.start()
        deadline = time.monotonic() + 10
        while not any(e.state == "busy" for e in emu.environments):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(c.exceptions.TooManyRequestsException) as e:
            c.invoke(FunctionName="other", Payload=b'{"seconds": 0}')
        assert e.value.response["Reason"] == "ConcurrentInvocationLimitExceeded"
        t.join()
        assert invoke(c, "other", {"seconds": 0})["Body"] == "slept"


def test_many_concurrent_environments_for_event_invocations(lambda_emulator, client):
    """Each Event invocation gets its own environment while the others are busy."""
    n = 16
    deploy(client, "worker", handler="app.sleep", Timeout=60)
    t0 = time.monotonic()
    for _ in range(n):
        r = client.invoke(FunctionName="worker", InvocationType="Event",
                          Payload=b'{"seconds": 20}')
        assert r["StatusCode"] == 202
    assert time.monotonic() - t0 < 10
    deadline = time.monotonic() + 25
    while True:
        envs = lambda_emulator.environments
        if sum(e.state == "busy" for e in envs) == n:
            break
        assert time.monotonic() < deadline, [(e.state, e.pid) for e in envs]
        time.sleep(0.1)
    assert len({e.pid for e in envs}) == n
    if lambda_emulator.sandboxed:
        assert len({e.netns for e in envs}) == n and len({e.address for e in envs}) == n


def test_idle_environments_are_reaped():
    with LambdaEmulator(idle_timeout=0.5) as emu:
        c = emu.client()
        deploy(c, "echo")
        pid = invoke(c, "echo")["Body"]["pid"]
        assert [e.pid for e in emu.environments] == [pid]
        deadline = time.monotonic() + 10
        while emu.environments:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(0.3)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        r = invoke(c, "echo")
        if "FunctionError" in r:
            pytest.fail("the invocation after reaping failed: %s\n--- its log ---\n%s" % (
                r["Body"], emu.invocation_log(r["ResponseMetadata"]["RequestId"])))
        assert r["Body"]["pid"] != pid
        assert emu.invocation(r["ResponseMetadata"]["RequestId"]).cold


@needs_sandbox
def test_sandbox_refuses_inbound_and_reaches_the_host(lambda_emulator, client):
    assert lambda_emulator.sandboxed
    deploy(client, "listen", handler="app.listen")
    # outbound: a server on the host, at the address sandboxes see the host at
    server = socket.socket()
    server.bind((lambda_emulator.host_address, 0))
    server.listen(1)

    def serve():
        conn, _ = server.accept()
        conn.sendall(b"hello from the host")
        conn.close()

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    client.update_function_configuration(FunctionName="listen", Handler="app.dial")
    client.get_waiter("function_updated_v2").wait(FunctionName="listen")
    r = invoke(client, "listen", {"host": lambda_emulator.host_address,
                                  "port": server.getsockname()[1]})
    assert r["Body"] == "hello from the host"
    th.join(5)
    server.close()

    # inbound: a listener inside the sandbox is unreachable from the host...
    client.update_function_configuration(FunctionName="listen", Handler="app.listen")
    client.get_waiter("function_updated_v2").wait(FunctionName="listen")
    port = invoke(client, "listen")["Body"]["port"]
    [env] = [e for e in lambda_emulator.environments if e.state == "idle"]
    assert env.netns and env.address
    with pytest.raises(OSError):
        socket.create_connection((env.address, port), timeout=1.5).close()
    # ...although it is listening: from inside the sandbox the same connection succeeds
    out = subprocess.run(["ip", "netns", "exec", env.netns, sys.executable, "-c",
                          f"import socket; socket.create_connection(('{env.address}', {port}),"
                          f" timeout=2).close(); print('ok')"],
                         capture_output=True, text=True, timeout=10)
    assert out.stdout.strip() == "ok", out.stderr


def test_stop_leaves_nothing_behind(tmp_path):
    emu = LambdaEmulator(idle_timeout=60).start()
    c = emu.client()
    deploy(c, "echo")
    deploy(c, "slow", handler="app.sleep", Timeout=30)
    invoke(c, "echo")
    for _ in range(3):
        c.invoke(FunctionName="slow", InvocationType="Event", Payload=b'{"seconds": 20}')
    deadline = time.monotonic() + 10
    while len([e for e in emu.environments if e.pid]) < 4:
        assert time.monotonic() < deadline, emu.environments
        time.sleep(0.05)
    made = emu.resources()
    pids = [e.pid for e in emu.environments]
    assert len(pids) == 4
    emu.stop()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    ps = subprocess.run(["pgrep", "-f", "awslambdaric"], capture_output=True, text=True).stdout
    assert not set(map(int, ps.split())) & set(pids)
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for ns in made["namespaces"]:
        assert ns not in netns
    if made["bridge"]:
        assert subprocess.run(["ip", "link", "show", made["bridge"]],
                              capture_output=True).returncode != 0
    if made["cgroup"]:
        assert not os.path.exists(made["cgroup"])
    assert not os.path.exists(made["workdir"])
    if emu.sandboxed:
        assert made["namespaces"]  # it did make namespaces, and removed them


def test_cli_start_serves_until_sigterm(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "dask_lithops.testing.lambda_emulator.cli", "start",
         "--log-dir", str(tmp_path / "logs")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "listening at" in line, proc.stderr.read()
        endpoint = line.split()[-1]
        c = boto3.client("lambda", endpoint_url=endpoint, region_name="us-east-1",
                         aws_access_key_id="x", aws_secret_access_key="x")
        deploy(c, "echo")
        assert invoke(c, "echo", {"a": 1})["Body"]["event"] == {"a": 1}
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0 and "stopped" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
