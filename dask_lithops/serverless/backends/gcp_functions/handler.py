"""The Cloud Run function's entry point (a functions-framework HTTP function).

``main.py`` of the runtime re-exports :func:`handle_request`.  One request is
one worker: the response (the worker's exit report, JSON) is sent when the
worker ends, so the request is held open for the worker's lifetime.  A Cloud
Run function knows neither its timeout nor its memory from the platform, so the
deployment sets ``DASK_LITHOPS_TIMEOUT`` and ``DASK_LITHOPS_MEMORY_MB``.
"""

from __future__ import annotations

import json
import os
import time

from dask_lithops.serverless.handler import handle_event

REQUEST_ID_HEADER = "X-Dask-Lithops-Request"


def handle_request(request):
    received = time.monotonic()
    event = request.get_json(force=True, silent=True)
    timeout = float(os.environ.get("DASK_LITHOPS_TIMEOUT") or 0) or None
    memory_mb = int(os.environ.get("DASK_LITHOPS_MEMORY_MB") or 0) or None
    request_id = (request.headers.get(REQUEST_ID_HEADER)
                  or request.headers.get("Function-Execution-Id")
                  or request.headers.get("X-Cloud-Trace-Context", "").split("/")[0] or None)
    remaining = timeout - (time.monotonic() - received) if timeout else None
    result = handle_event(event, remaining=remaining, memory_mb=memory_mb, request_id=request_id)
    status = 400 if isinstance(result, dict) and set(result) == {"error"} else 200
    return json.dumps(result, default=str), status, {"Content-Type": "application/json"}
