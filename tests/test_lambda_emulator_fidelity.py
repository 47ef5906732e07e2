"""The Lambda emulator is no kinder than Lambda: no client files, role credentials, NAT'd client.

One emulator for the module, with ``host_reachable=False`` and moto as the test
world's AWS endpoint (STS for the role's credentials, S3 for data).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from dask_lithops.testing.lambda_emulator import LambdaEmulator, sandbox_unavailable
from dask_lithops.testing.moto_server import MotoServer, moto_available
from dask_lithops.testing.netns import Bridge, NetnsHost
from dask_lithops.testing.sandbox import filesystem_unavailable

REASON = sandbox_unavailable() or filesystem_unavailable() or moto_available()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"needs the sandbox and moto: {REASON}")

ROLE = "arn:aws:iam::123456789012:role/data-reader"

HANDLERS = r'''
import os, socket

def files(event, context):
    out = {"uid": os.getuid(), "cwd": os.getcwd(), "task": sorted(os.listdir("/var/task")),
           "tmpdir": os.environ.get("TMPDIR")}
    for path in event["read"]:
        try:
            with open(path) as f:
                out[path] = f.read()
        except OSError as e:
            out[path] = type(e).__name__
    with open("/tmp/own", "w") as f:
        f.write("mine")
    out["own"] = open("/tmp/own").read()
    return out

def dial(event, context):
    try:
        s = socket.create_connection((event["host"], event["port"]), timeout=1.5)
    except OSError as e:
        return {"error": type(e).__name__}
    data = s.recv(100).decode()
    s.close()
    return {"data": data}

def aws(event, context):
    import boto3
    ident = boto3.client("sts").get_caller_identity()
    s3 = boto3.client("s3")
    s3.put_object(Bucket=event["bucket"], Key="from-lambda", Body=b"written by the role")
    body = s3.get_object(Bucket=event["bucket"], Key="input")["Body"].read().decode()
    return {"arn": ident["Arn"], "key": os.environ["AWS_ACCESS_KEY_ID"],
            "token": bool(os.environ.get("AWS_SESSION_TOKEN")), "input": body}
'''


def make_zip(files: dict) -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, content in files.items():
            z.writestr(name, content)
    return buf.getvalue()


@pytest.fixture(scope="module")
def moto():
    with MotoServer(host="127.0.0.1") as m:
        yield m


@pytest.fixture(scope="module")
def emu(moto, tmp_path_factory):
    with LambdaEmulator(host_reachable=False, aws_endpoint_url=moto.endpoint_url,
                        log_dir=tmp_path_factory.mktemp("lambda-logs"), idle_timeout=60) as e:
        yield e


@pytest.fixture(scope="module")
def lam(emu):
    client = emu.client()
    client.create_function(FunctionName="fidelity", Runtime="python3.11", Role=ROLE,
                           Handler="app.files", Timeout=10,
                           Code={"ZipFile": make_zip({"app.py": HANDLERS})})
    client.get_waiter("function_active_v2").wait(FunctionName="fidelity")
    return client


def call(lam, handler: str, event: dict) -> dict:
    lam.update_function_configuration(FunctionName="fidelity", Handler=f"app.{handler}")
    lam.get_waiter("function_updated_v2").wait(FunctionName="fidelity")
    r = lam.invoke(FunctionName="fidelity", Payload=json.dumps(event), LogType="Tail")
    body = json.loads(r["Payload"].read())
    assert "FunctionError" not in r, body
    return body


def test_function_sees_its_code_and_private_tmp_not_the_clients_files(lam):
    secret = f"/tmp/client-secret-{uuid.uuid4().hex}"
    with open(secret, "w") as f:
        f.write("the client's")
    home = os.path.expanduser("~/.bashrc")
    try:
        body = call(lam, "files", {"read": [secret, home, __file__, "/var/task/app.py"]})
    finally:
        os.unlink(secret)
    assert body[secret] == "FileNotFoundError"
    assert body[home] in ("FileNotFoundError", "PermissionError")
    assert body[__file__] in ("FileNotFoundError", "PermissionError")
    assert "def files" in body["/var/task/app.py"]
    assert body["task"] == ["app.py"] and body["cwd"] == "/var/task"
    assert body["own"] == "mine" and body["tmpdir"] == "/tmp"
    assert body["uid"] == 993  # sbx_user1051, not root
    assert not os.path.exists("/tmp/own")  # its /tmp is its own


def _serve_once(sock: socket.socket, payload: bytes) -> threading.Thread:
    def run():
        sock.settimeout(10)
        try:
            conn, _ = sock.accept()
            conn.sendall(payload)
            conn.close()
        except OSError:
            pass
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_host_unreachable_but_the_internet_is(emu, lam):
    # a server on the client's address that functions reach when host_reachable=True
    srv = socket.socket()
    srv.bind((emu.host_address, 0))
    srv.listen(1)
    t = _serve_once(srv, b"client")
    try:
        assert call(lam, "dial", {"host": emu.host_address, "port": srv.getsockname()[1]}) \
            == {"error": "TimeoutError"}
    finally:
        srv.close()
        t.join()

    # a host "on the internet": a namespace on another bridge, routed through this machine
    with Bridge() as bridge, NetnsHost(bridge) as far:
        code = ("import socket\ns = socket.socket(); s.bind(('0.0.0.0', 8765)); s.listen(8)\n"
                "while True:\n    c, _ = s.accept(); c.sendall(b'internet'); c.close()\n")
        proc = far.popen([sys.executable, "-c", code])
        try:
            deadline = time.monotonic() + 10
            while True:  # listening yet? (the host may dial a namespace on another bridge)
                try:
                    socket.create_connection((far.address, 8765), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
            assert call(lam, "dial", {"host": far.address, "port": 8765}) == {"data": "internet"}
        finally:
            proc.kill()
            proc.wait()


def test_credentials_are_the_roles_and_work_against_moto(moto, lam):
    s3 = moto.client("s3")
    bucket = f"fidelity-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="input", Body=b"written by the client")
    body = call(lam, "aws", {"bucket": bucket})
    assert body["arn"].startswith("arn:aws:sts::123456789012:assumed-role/data-reader/")
    assert body["key"].startswith("ASIA") and body["key"] != "testing" and body["token"]
    assert body["input"] == "written by the client"
    got = s3.get_object(Bucket=bucket, Key="from-lambda")["Body"].read()
    assert got == b"written by the role"


def test_host_reachable_needs_the_sandbox():
    with pytest.raises(RuntimeError, match="host_reachable=False needs the network sandbox"):
        LambdaEmulator(sandbox=False, host_reachable=False).start()


def test_stop_removes_the_host_firewall(moto):
    emu = LambdaEmulator(host_reachable=False, aws_endpoint_url=moto.endpoint_url).start()
    table = emu.resources()["firewall"]
    assert table in subprocess.run(["nft", "list", "tables"], capture_output=True,
                                   text=True).stdout
    emu.stop()
    assert table not in subprocess.run(["nft", "list", "tables"], capture_output=True,
                                       text=True).stdout
