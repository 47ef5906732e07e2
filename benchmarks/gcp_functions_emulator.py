"""Cloud Run functions emulator: cold and warm request latency through the front end.

    python benchmarks/gcp_functions_emulator.py [--quick]

Cold: a request that starts a new instance (namespace, cgroup, private root,
functions-framework import and gunicorn start) and is answered by it; warm: a
request to an idle instance.  Both through the front end with an ID token, as a
client sends them.  The build is cached, so it is not part of either.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
import zipfile

import google.auth.transport.requests as gtr
import requests
from google.oauth2 import service_account

from dask_lithops.testing.gcp_functions_emulator import CloudFunctionsEmulator

PARENT = "projects/test-project/locations/us-central1"
MAIN = "def handle(request):\n    return 'ok'\n"


def _deploy(emu, api, name: str) -> str:
    up = api.post(f"{emu.endpoint_url}/v2/{PARENT}/functions:generateUploadUrl", json={}).json()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("main.py", MAIN)
    requests.put(up["uploadUrl"], data=buf.getvalue()).raise_for_status()
    body = {"buildConfig": {"runtime": "python311", "entryPoint": "handle",
                            "source": {"storageSource": up["storageSource"]}},
            "serviceConfig": {"availableMemory": "256Mi", "maxInstanceCount": 1}}
    op = api.post(f"{emu.endpoint_url}/v2/{PARENT}/functions", params={"functionId": name},
                  json=body).json()
    while not op["done"]:
        time.sleep(0.1)
        op = api.get(f"{emu.endpoint_url}/v2/{op['name']}").json()
    assert "error" not in op, op
    return op["response"]["serviceConfig"]["uri"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer samples")
    args = ap.parse_args()
    cold_n, warm_n = (3, 30) if args.quick else (8, 200)
    with CloudFunctionsEmulator() as emu:
        print(f"emulator {emu.endpoint_url}  sandboxed={emu.sandboxed}  "
              f"own root={emu.filesystem_isolated}  memory limit={emu.memory_limit_mode}")
        api = gtr.AuthorizedSession(service_account.Credentials.from_service_account_file(
            str(emu.credentials_file), scopes=["https://www.googleapis.com/auth/cloud-platform"]))
        cold = []
        for i in range(cold_n):
            uri = _deploy(emu, api, f"cold{i}")
            headers = {"Authorization": f"Bearer {emu.id_token(uri)}"}
            time.sleep(0.2)  # let the namespace pool refill, as between real cold starts
            t = time.perf_counter()
            requests.get(uri, headers=headers).raise_for_status()
            cold.append((time.perf_counter() - t) * 1000)
        warm = []
        with requests.Session() as s:
            s.headers["Authorization"] = headers["Authorization"]
            for _ in range(warm_n):
                t = time.perf_counter()
                s.get(uri).raise_for_status()
                warm.append((time.perf_counter() - t) * 1000)
    warm.sort()
    print(f"cold request (new instance)  (n={cold_n}): median {statistics.median(cold):7.1f} ms"
          f"   max {max(cold):7.1f} ms")
    print(f"warm request                 (n={warm_n}): median {statistics.median(warm):7.2f} ms"
          f"   p95 {warm[int(len(warm) * 0.95) - 1]:7.2f} ms")


if __name__ == "__main__":
    main()
