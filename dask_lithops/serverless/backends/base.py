"""The interface of a FaaS backend, in the spirit of Lithops' serverless backends.

A backend manages *runtimes* (one deployed function per runtime, memory and
runtime version) and *invokes* them.  Everything here is blocking (SDK calls);
the cluster calls it from threads, never on its event loop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

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


class FaaSBackend:
    """Base of FaaS backends.  Subclasses set ``name`` and implement the methods below.

    Class attributes:

    name:
        the backend's name (``lithops.backend``)
    max_event_payload:
        bytes an asynchronous invocation's event may have
    memory_range, max_timeout:
        what the platform allows
    """

    name: ClassVar[str] = ""
    max_event_payload: ClassVar[int] = 256 * 1024
    memory_range: ClassVar[tuple[int, int]] = (128, 10240)
    max_timeout: ClassVar[int] = 900
    price_per_gb_second: ClassVar[float] = 0.0
    price_per_request: ClassVar[float] = 0.0
    # what in this platform's settings connects functions to a private network (the
    # reachability check's advice), e.g. Lambda's VPC subnets and security groups
    network_hint: ClassVar[str] = ""

    def __init__(self, config: dict[str, Any]):
        self.config = config

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
    def deploy_runtime(self, package, memory: int, timeout: int) -> RuntimeInfo:
        raise NotImplementedError

    def get_runtime_info(self, function_name: str) -> RuntimeInfo | None:
        raise NotImplementedError

    def delete_runtime(self, function_name: str) -> None:
        raise NotImplementedError

    def list_runtimes(self, runtime_name: str | None = None) -> list[RuntimeInfo]:
        raise NotImplementedError

    def clean(self) -> list[str]:
        """Delete every function and layer this package made; return what was deleted."""
        raise NotImplementedError

    # -- invocations
    def invoke(self, function_name: str, event: dict) -> str:
        """Asynchronous invocation; returns the request id.  Retries throttling."""
        raise NotImplementedError

    def prepare_invoke(self) -> None:
        """Make what invokes need (clients, connection pools) before the first scale."""

    def invoke_sync(self, function_name: str, event: dict) -> dict:
        """Synchronous invocation; returns the function's JSON result."""
        raise NotImplementedError

    def default_contact_address(self) -> str | None:
        """The address functions reach this host at, when the platform can tell."""
        return None

    def close(self) -> None:
        pass
