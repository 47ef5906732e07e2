"""moto's EC2 API server on a local address, started and stopped by PID.

``MotoServer(host="127.0.0.1")`` runs ``python -m moto.server -H host -p port``
in a subprocess; ``endpoint_url`` is what boto3 (and the VM keeper) use.  The
test world binds it to a test bridge's gateway address -- an address of this
machine that processes inside the namespace VMs can reach -- so the traffic
never leaves the machine.  Tests only: it sets dummy credentials in ``env``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

DUMMY_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_SESSION_TOKEN": "testing"}


def moto_available() -> str | None:
    try:
        import flask  # noqa: F401
        import moto.server  # noqa: F401
    except ImportError as e:
        return f"moto[server] is not installed ({e}); pip install 'moto[server,ec2]'"
    return None


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class MotoServer:
    def __init__(self, host: str = "127.0.0.1", port: int | None = None,
                 region: str = "us-east-1"):
        self.host = host
        self.port = port
        self.region = region
        self.proc: subprocess.Popen | None = None
        self._log = None
        self.log_path: str | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def env(self) -> dict:
        return {**DUMMY_CREDENTIALS, "AWS_DEFAULT_REGION": self.region}

    def start(self, timeout: float = 30.0) -> MotoServer:
        self.port = self.port or _free_port(self.host)
        fd, self.log_path = tempfile.mkstemp(prefix="dl-moto-", suffix=".log")
        self._log = os.fdopen(fd, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, **self.env}, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited: {self.log()[-2000:]}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"moto_server not listening after {timeout}s") from None
                time.sleep(0.05)
        return self

    def client(self, service: str = "ec2"):
        import boto3

        return boto3.client(service, region_name=self.region, endpoint_url=self.endpoint_url,
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def warm_up(self) -> None:
        """moto loads its AMI catalogue on first use (~10s); do it up front."""
        self.client().describe_images(Owners=["amazon"], MaxResults=5)

    def reset(self) -> None:
        import urllib.request

        urllib.request.urlopen(urllib.request.Request(
            f"{self.endpoint_url}/moto-api/reset", method="POST"), timeout=10).read()

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except (OSError, TypeError):
            return ""

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGTERM)  # its own session, started by us
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(timeout=5)
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.log_path:
            try:
                os.unlink(self.log_path)
            except OSError:
                pass
            self.log_path = None

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
