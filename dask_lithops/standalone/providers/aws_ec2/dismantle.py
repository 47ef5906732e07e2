"""The keeper's dismantle call for EC2 VMs (runs on the VM; standard library only).

:mod:`dask_lithops.standalone.keeper` calls :func:`dismantle` when the VM must
go.  Instance id: ``<root>/var/lib/cloud/data/instance-id`` (written by
cloud-init), else the instance metadata service (IMDSv2).  Credentials: the
environment (``AWS_ACCESS_KEY_ID``...), else the instance role through IMDSv2 --
give the VM an ``instance_role`` allowing ``ec2:StopInstances``/
``ec2:TerminateInstances`` on itself.  The call is a SigV4-signed EC2 Query API
request; no secret is ever logged.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import os
import urllib.error
import urllib.parse
import urllib.request

IMDS = "http://169.254.169.254"
EC2_API_VERSION = "2016-11-15"


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


def dismantle(config: dict, delete: bool, root: str = "") -> str:
    """Stop (or, with ``delete``, terminate) this VM; return what was requested.

    ``config``: ``region`` and ``endpoint_url`` (:meth:`EC2Provider.keeper_config`).
    """
    action = "TerminateInstances" if delete else "StopInstances"
    iid = instance_id(root)
    ec2_call(action, {"InstanceId.1": iid}, config.get("region") or "us-east-1",
             config.get("endpoint_url"), credentials())
    return f"{action} {iid}"
