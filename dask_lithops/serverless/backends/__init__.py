"""The registry of FaaS backends: ``lithops.backend`` name -> backend class (see base.FaaSBackend).

A backend is a package ``backends/<name>/`` (config, packaging, invoke path,
handler); adding one adds a line here, its sections to the config schema and
defaults, and its docs.
"""

from __future__ import annotations

BACKENDS = {
    "aws_lambda": "dask_lithops.serverless.backends.aws_lambda.backend.AWSLambdaBackend",
    "gcp_functions": "dask_lithops.serverless.backends.gcp_functions.backend.GCPFunctionsBackend",
}


def backend_class(name: str):
    """The backend class of ``name``; a :class:`~dask_lithops.config.ConfigError` otherwise."""
    from dask_lithops import config

    if name not in BACKENDS:
        raise config.ConfigError(f"lithops.backend = {name!r} is invalid for serverless mode; "
                                 f"allowed: {', '.join(BACKENDS)}")
    from distributed.utils import import_term

    return import_term(BACKENDS[name])
