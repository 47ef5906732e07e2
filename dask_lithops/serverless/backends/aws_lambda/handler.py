"""The Lambda function's entry point: ``dask_lithops.serverless.backends.aws_lambda.handler.handler``.

Reads what Lambda tells a function (``AWS_LAMBDA_FUNCTION_MEMORY_SIZE``, the
context's remaining time and request id) and runs the event with
:func:`dask_lithops.serverless.handler.handle_event`.  Worker events are
``Event`` invocations: their result goes nowhere, so the exit report is also
posted to the scheduler.
"""

from __future__ import annotations

import os

from dask_lithops.serverless.handler import handle_event


def handler(event, context):
    memory_mb = int(os.environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE") or 0) or None
    remaining = context.get_remaining_time_in_millis() / 1000 if context else None
    return handle_event(event, remaining=remaining, memory_mb=memory_mb,
                        request_id=getattr(context, "aws_request_id", None))
