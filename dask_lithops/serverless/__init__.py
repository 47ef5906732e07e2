"""Serverless mode: Dask workers as FaaS function invocations.

``ServerlessCluster`` is imported lazily: functions import the handler from this
package and never need the cluster (nor its imports) on a cold start.
"""

from __future__ import annotations

__all__ = ["ServerlessCluster"]


def __getattr__(name):
    if name == "ServerlessCluster":
        from dask_lithops.serverless.cluster import ServerlessCluster

        return ServerlessCluster
    raise AttributeError(name)
