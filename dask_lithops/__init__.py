"""dask-lithops: Lithops' execution modes (localhost, serverless, standalone) as Dask clusters."""

from dask_lithops import config  # noqa: F401  (loads the package defaults into dask.config)
from dask_lithops.cluster import LithopsCluster, WorkerLauncher
from dask_lithops.executor import (
    ALL_COMPLETED,
    ALWAYS,
    ANY_COMPLETED,
    FunctionExecutor,
    LocalhostExecutor,
    RetryingFunctionExecutor,
    ServerlessExecutor,
    StandaloneExecutor,
)
from dask_lithops.factory import Cluster
from dask_lithops.localhost import LocalhostCluster
from dask_lithops.storage import Storage
from dask_lithops.wait import get_result, wait  # after the submodule: the names are the functions

__version__ = "0.1.0"


def __getattr__(name):
    # Mode classes whose SDKs are optional extras import on first use.
    if name == "ServerlessCluster":
        from dask_lithops.serverless import ServerlessCluster

        return ServerlessCluster
    if name == "StandaloneCluster":
        from dask_lithops.standalone import StandaloneCluster

        return StandaloneCluster
    raise AttributeError(name)


__all__ = ["Cluster", "LithopsCluster", "LocalhostCluster", "ServerlessCluster",
           "StandaloneCluster", "WorkerLauncher",
           # Lithops' API (import dask_lithops as lithops)
           "FunctionExecutor", "LocalhostExecutor", "ServerlessExecutor", "StandaloneExecutor",
           "RetryingFunctionExecutor", "Storage", "wait", "get_result",
           "ALWAYS", "ANY_COMPLETED", "ALL_COMPLETED"]
