"""Serverless mode: Dask workers as FaaS function invocations."""

from dask_lithops.serverless.cluster import ServerlessCluster

__all__ = ["ServerlessCluster"]
