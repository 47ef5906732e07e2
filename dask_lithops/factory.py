"""``Cluster(mode=None, backend=None, **kwargs)``: the configured mode's cluster class."""

from __future__ import annotations

from dask_lithops import config


def cluster_class(mode: str):
    if mode == "localhost":
        from dask_lithops.localhost import LocalhostCluster

        return LocalhostCluster
    if mode == "serverless":
        from dask_lithops.serverless import ServerlessCluster

        return ServerlessCluster
    if mode == "standalone":
        from dask_lithops.standalone import StandaloneCluster

        return StandaloneCluster
    raise config.ConfigError(f"lithops.mode = {mode!r} is invalid; allowed: "
                             "localhost, serverless, standalone")


def Cluster(mode: str | None = None, backend: str | None = None, **kwargs):
    """The cluster of the configured mode, chosen the way Lithops' ``FunctionExecutor()`` does.

    A backend implies its mode (``aws_lambda`` → serverless, ``ssh``/``aws_ec2`` →
    standalone); a mode alone takes its default backend; with nothing
    configured (no keyword, dask config or Lithops config file) it is localhost.
    """
    mode, backend = config.resolve_mode(mode, backend)
    cls = cluster_class(mode)
    if mode != "localhost":
        kwargs["backend"] = backend
    return cls(**kwargs)
