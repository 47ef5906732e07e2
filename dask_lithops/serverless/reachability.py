"""Can the functions dial the scheduler and the relay?  Asked before any worker is invoked.

Functions dial out to the scheduler and keep a control connection to the relay;
when neither can be reached (the client behind NAT or a firewall, a private
address), every worker invocation would wait and end without ever joining.
Instead the cluster asks one function first: the metadata request of the
handler (:func:`dask_lithops.serverless.handler.metadata`) takes a ``dial``
list and answers, per address, whether a TCP connection opened.  The backend
only carries the request (``invoke_sync``), so every backend gets the check.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


class SchedulerUnreachable(RuntimeError):
    """The functions cannot open a connection to the scheduler or the relay."""


def dial_targets(scheduler_address: str, relay_address: str | None) -> dict[str, str]:
    """``{"scheduler": "host:port", "relay": "host:port"}`` as the workers dial them."""
    out = {"scheduler": scheduler_address.split("://")[-1]}
    if relay_address:
        out["relay"] = relay_address.split("://")[-1]
    return out


def explain(backend, targets: dict[str, str], failures: dict[str, str] | None = None) -> str:
    """Why workers cannot join and what fixes it (the error and the late warning say the same)."""
    failures = failures or {}
    tried = "; ".join(f"the {what} at {addr}" + (f" ({failures[addr]})" if addr in failures else "")
                      for what, addr in targets.items())
    fixes = [
        'ServerlessCluster(scheduler="aws_ec2") (lithops.serverless.scheduler): the scheduler and '
        "the relay run on a small EC2 VM that functions can reach; the client reaches it over SSH",
        'ServerlessCluster(scheduler="ssh", scheduler_host="user@host"): the same on a host you '
        "have that functions can reach",
        'contact_address="<an address of this host the functions can reach>" '
        "(lithops.cluster.contact_address)",
    ]
    hint = getattr(backend, "network_hint", "")
    if hint:
        fixes.append(hint)
    return (f"{backend.name} functions cannot dial {tried}: this host is not reachable from "
            "them (behind NAT or a firewall, or a private address), so no worker could join. "
            "Fix it with one of: " + "; or ".join(fixes) + ".")


def check(backend, function_name: str, targets: dict[str, str], timeout: float) -> None:
    """Ask one function to dial every target (blocking); raise :class:`SchedulerUnreachable`."""
    reply = backend.invoke_sync(function_name, {"dask_lithops": "metadata",
                                                "dial": list(targets.values()),
                                                "dial_timeout": timeout})
    results = (reply or {}).get("dial")
    if not isinstance(results, dict):
        raise SchedulerUnreachable(f"function {function_name} did not answer the reachability "
                                   f"check (its runtime predates it?): {reply!r}")
    failures = {addr: results.get(addr, "not tried") for addr in targets.values()
                if results.get(addr, "not tried") is not None}
    if failures:
        raise SchedulerUnreachable(explain(backend, targets, failures))
    logger.debug("functions of %s reach %s", function_name, ", ".join(targets.values()))
