from dask_lithops.localhost.cluster import LocalhostCluster, LocalhostWorker

__all__ = ["LocalhostCluster", "LocalhostWorker"]
