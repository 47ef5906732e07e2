"""Standalone mode: existing hosts over SSH (and VMs created on demand)."""

from dask_lithops.standalone.cluster import StandaloneCluster

__all__ = ["StandaloneCluster"]
