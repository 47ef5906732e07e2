"""A lean Event-invoke path for AWS Lambda (SigV4-signed requests on a urllib3 pool)."""

from __future__ import annotations

import json
import os
import urllib.parse

from dask_lithops.serverless.backends.base import BackendError


class EventInvoker:
    """Event invokes without botocore's per-call machinery.

    A worker launch is one Event invoke, and botocore spends ~1.4 ms of CPU on each
    (event hooks, request building, validation, response parsing): ~500/s at best
    with the GIL to itself.  This signs the request with botocore's own SigV4
    signer and the session's (refreshing) credentials, and sends it on a keep-alive
    urllib3 pool to the endpoint botocore resolved: ~0.5 ms each.  Everything
    else (and any setup with a proxy) goes through boto3.
    """

    _PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                   "all_proxy")

    @classmethod
    def usable(cls) -> bool:
        return not any(os.environ.get(v) for v in cls._PROXY_VARS)

    def __init__(self, client, session, pool_size: int, connect_timeout: float = 10,
                 read_timeout: float = 60):
        import botocore
        import urllib3
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.httpsession import get_cert_path

        self._SigV4Auth, self._AWSRequest = SigV4Auth, AWSRequest
        self.endpoint = client.meta.endpoint_url.rstrip("/")
        self.region = client.meta.region_name
        self.credentials = session.get_credentials()
        u = urllib.parse.urlsplit(self.endpoint)
        self.base_path = u.path.rstrip("/")
        timeout = urllib3.Timeout(connect=connect_timeout, read=read_timeout)
        if u.scheme == "https":
            ca = os.environ.get("AWS_CA_BUNDLE") or get_cert_path(True)
            self.pool = urllib3.HTTPSConnectionPool(
                u.hostname, u.port, maxsize=pool_size, timeout=timeout, retries=False,
                cert_reqs="CERT_REQUIRED", ca_certs=ca)
        else:
            self.pool = urllib3.HTTPConnectionPool(u.hostname, u.port, maxsize=pool_size,
                                                   timeout=timeout, retries=False)
        self.user_agent = f"dask-lithops botocore/{botocore.__version__}"

    def invoke(self, function_name: str, body: bytes) -> tuple[int, str, str, str]:
        """(status, error code, error message, request id) of one Event invoke."""
        from urllib3.exceptions import HTTPError

        path = (f"{self.base_path}/2015-03-31/functions/"
                f"{urllib.parse.quote(function_name, safe='')}/invocations")
        req = self._AWSRequest(method="POST", url=self.endpoint + path, data=body,
                               headers={"X-Amz-Invocation-Type": "Event",
                                        "User-Agent": self.user_agent})
        creds = self.credentials.get_frozen_credentials() if self.credentials else None
        if creds is None:
            raise BackendError("no AWS credentials found (the boto3 credential chain is empty)")
        self._SigV4Auth(creds, "lambda", self.region).add_auth(req)
        try:
            r = self.pool.urlopen("POST", path, body=body, headers=dict(req.headers.items()),
                                  retries=False)
        except HTTPError as e:
            raise BackendError(f"Lambda Invoke (Event) of {function_name}: {e}") from e
        request_id = r.headers.get("x-amzn-RequestId", "")
        if r.status == 202:
            return 202, "", "", request_id
        code = (r.headers.get("x-amzn-ErrorType") or "").split(":")[0]
        message = r.data.decode(errors="replace")
        try:
            err = json.loads(message)
            code = code or err.get("__type") or err.get("Type") or err.get("code") or ""
            code = code.rsplit("#", 1)[-1]
            message = err.get("message") or err.get("Message") or message
        except (ValueError, AttributeError):
            pass
        return r.status, code, f"{message} (HTTP {r.status}, RequestId {request_id})", \
            request_id
