"""The dismantle keeper: runs on every VM dask-lithops creates, stops it when orphaned.

    python3 keeper.py --config /etc/dask-lithops/keeper.json [--root DIR]

Standard library only (it starts at boot from EC2 user data, before any
runtime exists on the VM).  Every ``interval`` seconds it reads the heartbeat
file the cluster refreshes over SSH while it lives; it dismantles its own
instance (StopInstances, or TerminateInstances when ``delete_on_dismantle``)
once the heartbeat is older than ``soft_dismantle_timeout`` -- or, with no
heartbeat since this boot, that long after it started -- and always
``hard_dismantle_timeout`` after it started.  So a client killed with SIGKILL
leaves no VM running past the soft timeout.

The heartbeat file (JSON) may override the timeouts and ``delete_on_dismantle``
for the cluster currently using the VM (a reused VM keeps its first user data).

Instance id: ``<root>/var/lib/cloud/data/instance-id`` (written by cloud-init),
else the instance metadata service (IMDSv2).  Credentials: the environment
(``AWS_ACCESS_KEY_ID``...), else the instance role through IMDSv2 -- give the
VM an ``instance_role`` allowing ``ec2:StopInstances``/``ec2:TerminateInstances``
on itself.  The EC2 call is a SigV4-signed Query API request; no secret is
ever logged.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import hmac
import json
import logging
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

logger = logging.getLogger("dask_lithops.keeper")

IMDS = "http://169.254.169.254"
EC2_API_VERSION = "2016-11-15"
DEFAULTS = {"soft_dismantle_timeout": 300.0, "hard_dismantle_timeout": 3600.0,
            "delete_on_dismantle": False, "interval": 1.0, "region": "us-east-1",
            "endpoint_url": None, "heartbeat_file": None}


# -- instance metadata and credentials ---------------------------------------------------------
def _imds_get(path: str, timeout: float = 2.0) -> str:
    req = urllib.request.Request(f"{IMDS}/latest/api/token", method="PUT",
                                 headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"})
    token = urllib.request.urlopen(req, timeout=timeout).read().decode()
    req = urllib.request.Request(f"{IMDS}/latest/{path}",
                                 headers={"X-aws-ec2-metadata-token": token})
    return urllib.request.urlopen(req, timeout=timeout).read().decode()


def instance_id(root: str = "") -> str:
    path = os.path.join(root or "/", "var/lib/cloud/data/instance-id")
    try:
        with open(path) as f:
            value = f.read().strip()
        if value and value != "iid-datasource-none":
            return value
    except OSError:
        pass
    return _imds_get("meta-data/instance-id")


def credentials() -> dict:
    """{access_key, secret_key, token}: the environment, else the instance role."""
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        return {"access_key": os.environ["AWS_ACCESS_KEY_ID"],
                "secret_key": os.environ["AWS_SECRET_ACCESS_KEY"],
                "token": os.environ.get("AWS_SESSION_TOKEN")}
    role = _imds_get("meta-data/iam/security-credentials/").strip().splitlines()[0]
    data = json.loads(_imds_get(f"meta-data/iam/security-credentials/{role}"))
    return {"access_key": data["AccessKeyId"], "secret_key": data["SecretAccessKey"],
            "token": data.get("Token")}


# -- a SigV4-signed EC2 Query API call ---------------------------------------------------------
def _sign(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def ec2_call(action: str, params: dict, region: str, endpoint_url: str | None,
             creds: dict, timeout: float = 20.0) -> str:
    endpoint = endpoint_url or f"https://ec2.{region}.amazonaws.com"
    url = urllib.parse.urlsplit(endpoint)
    host = url.netloc
    path = url.path or "/"
    body = urllib.parse.urlencode({"Action": action, "Version": EC2_API_VERSION, **params})
    now = datetime.datetime.now(datetime.timezone.utc)
    amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    headers = {"content-type": "application/x-www-form-urlencoded; charset=utf-8",
               "host": host, "x-amz-date": amz_date}
    if creds.get("token"):
        headers["x-amz-security-token"] = creds["token"]
    signed = ";".join(sorted(headers))
    canonical = "\n".join(["POST", path, "",
                           "".join(f"{k}:{headers[k]}\n" for k in sorted(headers)), signed,
                           hashlib.sha256(body.encode()).hexdigest()])
    scope = f"{day}/{region}/ec2/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                         hashlib.sha256(canonical.encode()).hexdigest()])
    k = _sign(("AWS4" + creds["secret_key"]).encode(), day)
    for part in (region, "ec2", "aws4_request"):
        k = _sign(k, part)
    signature = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={creds['access_key']}/{scope}, "
                                f"SignedHeaders={signed}, Signature={signature}")
    req = urllib.request.Request(endpoint, data=body.encode(), method="POST",
                                 headers={k: v for k, v in headers.items() if k != "host"})
    try:
        return urllib.request.urlopen(req, timeout=timeout).read().decode()
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")[:500]
        raise RuntimeError(f"EC2 {action} failed: HTTP {e.code}: {detail}") from None


# -- the keeper --------------------------------------------------------------------------------
class Keeper:
    def __init__(self, cfg: dict, root: str = ""):
        self.cfg = {**DEFAULTS, **cfg}
        self.root = root
        self.started_wall = time.time()
        self.started = time.monotonic()
        self.last_alive = self.started

    def effective(self) -> dict:
        """Config, overridden by the current cluster's heartbeat file."""
        out = dict(self.cfg)
        hb = self.cfg.get("heartbeat_file")
        if hb:
            try:
                with open(hb) as f:
                    data = json.load(f)
                for k in ("soft_dismantle_timeout", "hard_dismantle_timeout",
                          "delete_on_dismantle"):
                    if k in data:
                        out[k] = data[k]
            except (OSError, ValueError):
                pass
        return out

    def heartbeat_age(self) -> float | None:
        """Seconds since the last heartbeat of this boot (None: none yet)."""
        hb = self.cfg.get("heartbeat_file")
        if not hb:
            return None
        try:
            mtime = os.stat(hb).st_mtime
        except OSError:
            return None
        if mtime < self.started_wall:
            return None  # from before this boot
        return max(0.0, time.time() - mtime)

    def check(self) -> str | None:
        """Why the VM must go now, or None."""
        eff = self.effective()
        now = time.monotonic()
        age = self.heartbeat_age()
        if age is not None:
            self.last_alive = max(self.last_alive, now - age)
        if now - self.started > float(eff["hard_dismantle_timeout"]):
            return f"hard_dismantle_timeout ({eff['hard_dismantle_timeout']}s) reached"
        idle = now - self.last_alive
        if idle > float(eff["soft_dismantle_timeout"]):
            return (f"no cluster heartbeat for {idle:.0f}s "
                    f"(soft_dismantle_timeout {eff['soft_dismantle_timeout']}s)")
        return None

    def dismantle(self, reason: str) -> None:
        eff = self.effective()
        action = "TerminateInstances" if eff["delete_on_dismantle"] else "StopInstances"
        delay = 1.0
        while True:
            try:
                iid = instance_id(self.root)
                logger.warning("dismantling %s (%s): %s", iid, action, reason)
                ec2_call(action, {"InstanceId.1": iid}, eff["region"], eff["endpoint_url"],
                         credentials())
                logger.warning("%s %s requested", action, iid)
                return
            except Exception as e:  # keep trying: a running orphan is billed
                logger.error("dismantle failed (retrying in %.0fs): %s", delay, e)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)

    def run(self) -> None:
        eff = self.effective()
        logger.info("keeper started: soft %ss, hard %ss, %s on dismantle",
                    eff["soft_dismantle_timeout"], eff["hard_dismantle_timeout"],
                    "terminate" if eff["delete_on_dismantle"] else "stop")
        while True:
            reason = self.check()
            if reason:
                self.dismantle(reason)
                return
            time.sleep(float(self.cfg["interval"]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dask-lithops keeper")
    parser.add_argument("--config", required=True)
    parser.add_argument("--root", default=os.environ.get("DASK_LITHOPS_VM_ROOT", ""))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s keeper %(levelname)s %(message)s")
    with open(args.config) as f:
        cfg = json.load(f)
    Keeper(cfg, root=args.root).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
