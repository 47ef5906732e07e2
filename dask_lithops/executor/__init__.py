"""Lithops' programming model (``FunctionExecutor``, ``map``, ``get_result``...) on dask-lithops."""

from dask_lithops.executor.executors import (
    FunctionExecutor,
    LocalhostExecutor,
    ServerlessExecutor,
    StandaloneExecutor,
)
from dask_lithops.executor.future import FuturesList, ResponseFuture
from dask_lithops.executor.retries import RetryingFunctionExecutor, RetryingFuture
from dask_lithops.executor.wait import ALL_COMPLETED, ALWAYS, ANY_COMPLETED, get_result, wait

__all__ = ["ALL_COMPLETED", "ALWAYS", "ANY_COMPLETED", "FunctionExecutor", "FuturesList",
           "LocalhostExecutor", "ResponseFuture", "RetryingFunctionExecutor", "RetryingFuture",
           "ServerlessExecutor", "StandaloneExecutor", "get_result", "wait"]
