"""``relay://``: Dask comms for workers that accept no inbound connection.

See docs/relay.md.  Public API:

* :class:`RelayServer` -- the relay (asyncio; in-process or ``dask-lithops relay``)
* :func:`worker_addresses` -- the Worker/Nanny keyword arguments that put a
  worker behind a relay
* :func:`relay_security` -- a ``distributed.Security`` carrying the relay token
"""

from __future__ import annotations

from dask_lithops.relay.protocol import (
    TOKEN_ENV,
    RelayAddress,
    RelayRefused,
    parse_relay_address,
    unparse_relay_address,
)
from dask_lithops.relay.server import RelayServer

__all__ = ["RelayServer", "RelayAddress", "RelayRefused", "TOKEN_ENV", "parse_relay_address",
           "unparse_relay_address", "worker_addresses", "relay_security", "new_token"]


def worker_addresses(relay_address: str, worker_id: str) -> dict:
    """Keyword arguments that run a ``Worker`` or a ``Nanny`` behind the relay.

    *relay_address* is ``"host:port"`` (or ``relay://host:port``) of the relay
    as the worker can reach it -- a concrete host, not ``0.0.0.0``.  Returns::

        {"protocol": "relay", "host": host, "port": port,
         "contact_address": "relay://host:port/<worker_id>"}

    Pass it as ``Worker(scheduler, **worker_addresses(...), security=sec)`` or
    ``Nanny(scheduler, **worker_addresses(...), security=sec)``.  With a Nanny
    the worker process registers as ``<worker_id>`` and the nanny itself as
    ``<worker_id>-nanny`` (``Nanny`` forwards ``contact_address``, ``host``
    and ``protocol`` to its worker).  *security* must carry the token:
    ``Security(extra_conn_args={"relay_token": token})`` (see
    :func:`relay_security`).
    """
    a = parse_relay_address(relay_address)
    if a.worker_id:
        raise ValueError(f"relay_address {relay_address!r} must be host:port of the relay, "
                         "without a worker id")
    if a.host in ("", "0.0.0.0", "::", "[::]"):
        raise ValueError(f"relay_address {relay_address!r}: workers need a concrete host "
                         "to dial, not a wildcard")
    if not worker_id or "/" in worker_id:
        raise ValueError(f"invalid worker_id {worker_id!r} (non-empty, no '/')")
    return {"protocol": "relay", "host": a.host, "port": a.port,
            "contact_address": unparse_relay_address(a.host, a.port, worker_id)}


def relay_security(token: str, security=None):
    """Return a ``distributed.Security`` carrying *token* (a copy of *security* if given)."""
    from distributed import Security

    if security is None:
        return Security(extra_conn_args={"relay_token": token})
    import copy

    sec = copy.copy(security)
    sec.extra_conn_args = {**(security.extra_conn_args or {}), "relay_token": token}
    return sec


def new_token() -> str:
    """A fresh random relay token."""
    import secrets

    return secrets.token_urlsafe(32)
