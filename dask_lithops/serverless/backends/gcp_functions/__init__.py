"""Google Cloud Run functions (``backend="gcp_functions"``): config, source packaging, held
HTTPS requests as workers, handler.

The names are imported lazily: the function's handler lives in this package and
must not import google-auth or httpx on a cold start.
"""

from __future__ import annotations

__all__ = ["GCPFunctionsBackend"]


def __getattr__(name):
    if name in __all__:
        from dask_lithops.serverless.backends.gcp_functions import backend

        return getattr(backend, name)
    raise AttributeError(name)
