"""``EC2Cluster``: the name ``StandaloneCluster(backend="aws_ec2")`` had before host providers.

Everything EC2 lives in :class:`~dask_lithops.standalone.providers.aws_ec2.EC2Provider`;
this alias stays for code that imports it (the test world's client script).
"""

from __future__ import annotations

from .cluster import StandaloneCluster


class EC2Cluster(StandaloneCluster):
    """``StandaloneCluster(backend="aws_ec2", ...)``."""

    def __init__(self, backend: str | None = "aws_ec2", **kwargs):
        super().__init__(backend=backend, **kwargs)
