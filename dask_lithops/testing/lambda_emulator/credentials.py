"""Execution-role credentials for environments, as Lambda gives them.

Lambda puts temporary credentials of the function's execution role in
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``.  With a
test world's STS (``aws_endpoint_url``, e.g. moto) the emulator gets them the
same way: ``AssumeRole`` of the function's ``Role`` -- never the client's keys.
Without one, environments get fixed dummy credentials that authorise nothing.
"""

from __future__ import annotations

import threading
import time

DUMMY = {"AWS_ACCESS_KEY_ID": "ASIAEMULATOREXAMPLE00",
         "AWS_SECRET_ACCESS_KEY": "emulator-secret-access-key",
         "AWS_SESSION_TOKEN": "emulator-session-token"}
REFRESH_MARGIN = 300.0  # seconds before expiry a cached set is renewed


class RoleCredentials:
    def __init__(self, endpoint_url: str | None, region: str):
        self.endpoint_url, self.region = endpoint_url, region
        self._cache: dict[str, tuple[float, dict]] = {}
        self._lock = threading.Lock()

    def get(self, role_arn: str, session_name: str) -> dict:
        """Credentials of ``role_arn`` (blocking: one STS call per role and hour)."""
        if not self.endpoint_url:
            return dict(DUMMY)
        with self._lock:
            hit = self._cache.get(role_arn)
            if hit is not None and hit[0] - REFRESH_MARGIN > time.time():
                return dict(hit[1])
        import boto3

        # the emulator is the Lambda service here: it signs its own AssumeRole call
        sts = boto3.client("sts", endpoint_url=self.endpoint_url, region_name=self.region,
                           aws_access_key_id="lambda-service", aws_secret_access_key="lambda")
        c = sts.assume_role(RoleArn=role_arn, RoleSessionName=session_name[:64],
                            DurationSeconds=3600)["Credentials"]
        creds = {"AWS_ACCESS_KEY_ID": c["AccessKeyId"],
                 "AWS_SECRET_ACCESS_KEY": c["SecretAccessKey"],
                 "AWS_SESSION_TOKEN": c["SessionToken"]}
        with self._lock:
            self._cache[role_arn] = (c["Expiration"].timestamp(), creds)
        return dict(creds)
