"""AWS Lambda (``backend="aws_lambda"``): config, packaging, Event invokes, handler.

The names are imported lazily: the function's handler lives in this package and
must not import boto3 on a cold start.
"""

from __future__ import annotations

__all__ = ["AWSLambdaBackend", "resolve_config"]


def __getattr__(name):
    if name in __all__:
        from dask_lithops.serverless.backends.aws_lambda import backend

        return getattr(backend, name)
    raise AttributeError(name)
