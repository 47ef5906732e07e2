"""The interface of a FaaS backend, in the spirit of Lithops' serverless backends.

A backend manages *runtimes* (one deployed function per runtime, memory and
runtime version) and *invokes* them.  The generic serverless layer (cluster,
worker rotation, usage report, launch payload, relay) knows a platform only
through this class; see docs/serverless-backends.md ("Writing a serverless
backend").  Methods are blocking (SDK calls) and run in threads, except
:meth:`FaaSBackend.start_invocation`, which runs on the cluster's event loop.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from dask_lithops import config as _config

FUNCTION_PREFIX = "dask-lithops"


class BackendError(RuntimeError):
    """A FaaS platform call failed; the message names the call and the platform's answer."""


class ThrottledError(BackendError):
    """The platform kept throttling invocations after every retry."""


class FunctionError(BackendError):
    """A synchronous invocation raised inside the function."""


@dataclass
class RuntimeInfo:
    """One deployed runtime (a function)."""

    function_name: str
    runtime_name: str
    version: str
    memory: int
    timeout: int | None = None
    architecture: str | None = None
    state: str | None = None
    extra: dict = field(default_factory=dict)


def sanitize_runtime_name(name: str) -> str:
    out = re.sub(r"[^a-zA-Z0-9-]+", "-", name).strip("-").lower()
    return out[:30] or "default"


class Invocation:
    """One worker invocation as the cluster holds it.

    The base is a fire-and-forget invocation (Lambda's ``Event``): once the
    platform accepted it, the function runs on its own and reports its end to
    the scheduler.  Backends whose invocation is a request held open for the
    worker's lifetime subclass it (see ``gcp_functions``).
    """

    def __init__(self, request_id: str | None = None, accepted: float | None = None):
        self.request_id = request_id
        self.accepted = accepted  # epoch seconds the platform took it (None: not known yet)
        self.joined = False  # the worker registered (set by the cluster)

    def done(self) -> bool:
        return True

    async def end(self, timeout: float) -> None:
        """The worker was told to stop: wait up to ``timeout`` for the invocation to
        return, then cut it off.  Never raises."""


class FaaSBackend:
    """Base of FaaS backends.  Subclasses set the class attributes and implement the methods.

    Class attributes:

    name:
        the backend's name (``lithops.backend``) and its config section (``lithops.<name>``)
    config_sections:
        every config section the backend reads (its own first, e.g. ``("aws_lambda", "aws")``)
    worker_name_prefix:
        prefix of worker names (``lambda-0``, ``gcf-0``)
    max_event_payload:
        bytes a worker launch event may have
    memory_range, max_timeout:
        what the platform allows (MB, seconds)
    """

    name: ClassVar[str] = ""
    account_section: ClassVar[str | None] = None  # Lithops' cloud-account section, if any
    account_keys: ClassVar[tuple[str, ...]] = ()  # the keys read from it
    config_sections: ClassVar[tuple[str, ...]] = ()
    worker_name_prefix: ClassVar[str] = "function"
    max_event_payload: ClassVar[int] = 256 * 1024
    memory_range: ClassVar[tuple[int, int]] = (128, 10240)
    max_timeout: ClassVar[int] = 900
    # usage report: what one invocation costs
    price_per_gb_second: float = 0.0
    price_per_vcpu_second: float = 0.0
    price_per_request: float = 0.0
    # what in this platform's settings connects functions to a private network (the
    # reachability check's advice), e.g. Lambda's VPC subnets and security groups
    network_hint: ClassVar[str] = ""
    # where scheduler="auto" puts the scheduler when no contact address is known: a host
    # provider of the same cloud (lithops.serverless.scheduler), or None: ask for one
    auto_scheduler_placement: ClassVar[str | None] = None

    def __init__(self, config: dict[str, Any], *, platform: bool = True):
        """``config``: from :meth:`resolve_config`.  Validates it (a ConfigError naming the
        key and the allowed values).  ``platform=False``: only packages are built, so
        what the platform's API needs (region, role, project) is not required."""
        self.config = config
        self.platform = platform

    # -- config
    @classmethod
    def option_names(cls) -> set[str]:
        """Keyword arguments of ``ServerlessCluster`` that go to this backend."""
        names: set[str] = set()
        for s in cls.config_sections:
            names |= set(_config.PACKAGE_DEFAULTS[_config.NAMESPACE].get(s) or ())
        return names

    @classmethod
    def resolve_config(cls, **overrides) -> dict:
        """The backend's config sections merged with keyword ``overrides``, validated.

        A backend with an account section (Lithops' ``aws``, ``gcp``) gets its
        ``account_keys`` from there, and its region where its own section sets none."""
        if cls.account_section is None:
            return _config.section(cls.name, **overrides)
        account = _config.section(cls.account_section, **{
            k: overrides.pop(k) for k in cls.account_keys if k in overrides})
        cfg = _config.section(cls.name, **overrides)
        cfg["region"] = cfg.get("region") or account.get("region")
        for k in cls.account_keys:
            cfg[k] = account.get(k)
        return cfg

    @classmethod
    def key(cls, option: str) -> str:
        """The full config key of ``option``, for error messages."""
        return f"lithops.{cls.name}.{option}"

    @property
    def runtime_name(self) -> str:
        return self.config.get("runtime") or "default"

    @property
    def memory(self) -> int:
        return int(self.config["runtime_memory"])

    @property
    def timeout(self) -> int:
        return int(self.config["runtime_timeout"])

    @property
    def vcpus(self) -> float:
        """vCPUs of one function instance at the configured memory."""
        return 1.0

    def threads_for_memory(self, memory_mb: int) -> int:
        """Worker threads by default: one per vCPU the platform gives ``memory_mb``."""
        return max(1, round(self.vcpus))

    # -- naming
    def get_runtime_key(self, runtime_name: str, memory: int, version: str) -> str:
        """The function name of ``runtime_name`` at ``memory`` MB and runtime ``version``."""
        return f"{FUNCTION_PREFIX}-{sanitize_runtime_name(runtime_name)}-{version}-{memory}MB"

    @staticmethod
    def parse_runtime_key(function_name: str) -> tuple[str, str, int] | None:
        m = re.match(rf"^{FUNCTION_PREFIX}-(.+)-([0-9a-f]{{10}})-([0-9]+)MB$", function_name)
        if not m:
            return None
        return m.group(1), m.group(2), int(m.group(3))

    # -- runtimes
    def build_runtime(self, runtime_name: str | None = None, *, force: bool = False, log=None,
                      package_sync: bool | None = None, progress=None):
        """Build (or reuse from the cache) the runtime's deployment package.

        The package has ``name``, ``version``, ``runtime_key`` and ``describe()`` (lines
        for ``dask-lithops runtime build``).  ``package_sync`` (None:
        ``lithops.runtime.package_sync``) adds the client's installed dask optional
        dependencies (docs/runtime.md); ``progress`` (:mod:`dask_lithops.progress`)
        reports the build.
        """
        raise NotImplementedError

    def deploy_runtime(self, package, memory: int, timeout: int) -> RuntimeInfo:
        raise NotImplementedError

    def get_runtime_info(self, function_name: str) -> RuntimeInfo | None:
        raise NotImplementedError

    def get_runtime_meta(self, function_name: str) -> dict:
        """One metadata request to the deployed function: its ``runtime_key`` (versions)."""
        return self.invoke_sync(function_name, {"dask_lithops": "metadata"})

    def delete_runtime(self, function_name: str) -> None:
        raise NotImplementedError

    def list_runtimes(self, runtime_name: str | None = None) -> list[RuntimeInfo]:
        raise NotImplementedError

    def clean(self) -> list[str]:
        """Delete every function (and artefact) this package made; return what was deleted."""
        raise NotImplementedError

    # -- invocations
    def invoke(self, function_name: str, event: bytes) -> str:
        """Asynchronous (fire-and-forget) invocation; returns the request id.  Retries
        throttling with backoff, then raises :class:`ThrottledError`."""
        raise NotImplementedError

    async def start_invocation(self, function_name: str, event: bytes, *, name: str,
                               executor, on_accepted, on_end) -> Invocation:
        """Start worker ``name``'s invocation (on the event loop; blocking calls go to
        ``executor``).  Raises when the platform refused it.

        ``on_accepted(name, request_id, epoch_seconds)``: the platform took the
        invocation.  ``on_end(name, report)``: the invocation returned, with the
        worker's exit report or ``{"reason": "error"|"throttled", "error": ...}``
        -- for invocations whose end the platform tells (a held request);
        fire-and-forget invocations report through the scheduler instead.
        """
        loop = asyncio.get_running_loop()
        request_id = await loop.run_in_executor(executor, self.invoke, function_name, event)
        invocation = Invocation(request_id=request_id, accepted=time.time())
        on_accepted(name, request_id, invocation.accepted)
        return invocation

    def prepare_invoke(self, function_name: str) -> None:
        """Make what invokes need (clients, connection pools, tokens) before the first scale."""

    def invoke_sync(self, function_name: str, event: dict) -> dict:
        """Synchronous invocation; returns the function's JSON result."""
        raise NotImplementedError

    def default_contact_address(self) -> str | None:
        """The address functions reach this host at, when the platform can tell."""
        return None

    async def aclose(self) -> None:
        """End every invocation still held (the cluster is closing)."""

    def close(self) -> None:
        pass
