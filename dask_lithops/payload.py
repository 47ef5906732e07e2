"""Payloads: what the client hands to the processes it starts elsewhere.

* :class:`LaunchPayload` -- every mode hands it to the worker entry point
  (:mod:`dask_lithops.worker`);
* :class:`SchedulerPayload` -- a scheduler (and optionally a relay) started on
  a remote host (:mod:`dask_lithops.standalone.remote_scheduler`).

Both are plain msgpack-able dicts, so they travel on a subprocess' stdin, in a
function invocation's event, or in a 0600 file uploaded over SFTP; TLS material
travels as PEM contents (the other side has none of the client's files).
"""

from __future__ import annotations

import base64
import sys
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import msgpack

# Packages whose versions must match between client and workers: a mismatch
# breaks pickled task and data exchange in ways that surface as hangs.
RUNTIME_PACKAGES = ("dask", "distributed", "cloudpickle", "msgpack")

_SECURITY_FIELDS = (
    "require_encryption",
    "tls_ca_file",
    "tls_ciphers",
    "tls_min_version",
    "tls_max_version",
    "tls_worker_cert",
    "tls_worker_key",
    "tls_client_cert",
    "tls_client_key",
)


_SAME_AS = "same-as:"


class PayloadError(ValueError):
    """A launch payload is malformed."""


class RuntimeMismatch(RuntimeError):
    """The worker's Python or packages differ from the client's."""


def installed_version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def runtime_key() -> dict[str, str | None]:
    """Versions that must agree between the client and every worker."""
    key = {"python": "%d.%d" % sys.version_info[:2]}
    key.update({name: installed_version(name) for name in RUNTIME_PACKAGES})
    return key


def runtime_mismatch(expected: dict, actual: dict | None = None) -> dict[str, tuple]:
    """{package: (client's version, worker's version)} for every difference."""
    actual = actual or runtime_key()
    return {
        k: (v, actual.get(k))
        for k, v in expected.items()
        if k in actual and v is not None and v != actual.get(k)
    }


def describe_mismatch(diff: dict[str, tuple], where: str = "worker") -> str:
    parts = [f"{k}: client {c}, {where} {w}" for k, (c, w) in sorted(diff.items())]
    return (
        f"The {where}'s runtime does not match the client's ("
        + "; ".join(parts)
        + "). Rebuild or redeploy the runtime with the client's versions."
    )


def _pem(value):
    """PEM contents of a certificate/key given as contents or as a path (read here)."""
    if isinstance(value, str) and value and not value.lstrip().startswith("-----BEGIN"):
        with open(value) as f:  # a path: ship the contents, the other side has no such file
            return f.read()
    return value


def security_to_dict(security, scheduler: bool = False) -> dict | None:
    """The fields of a distributed.Security a remote process needs (PEM contents, not paths).

    Workers get the CA, worker and client certificates; ``scheduler=True`` adds
    ``tls_scheduler_cert``/``_key``, the certificate a remote scheduler serves
    with (the scheduler's own, else the worker's, as ``Security.temporary()``
    uses one certificate for every role).
    """
    if security is None:
        return None
    out: dict[str, Any] = {}
    for name in _SECURITY_FIELDS:
        value = getattr(security, name, None)
        if name.endswith(("_file", "_cert", "_key")):
            value = _pem(value)
        if name in ("tls_min_version", "tls_max_version") and value is not None:
            value = int(value)
        if value is not None:
            out[name] = value
    if scheduler:
        for role in ("scheduler", "worker"):
            cert = getattr(security, f"tls_{role}_cert", None)
            if cert:
                out["tls_scheduler_cert"] = _pem(cert)
                out["tls_scheduler_key"] = _pem(getattr(security, f"tls_{role}_key", None))
                break
    extra = getattr(security, "extra_conn_args", None)
    if extra:
        out["extra_conn_args"] = dict(extra)
    # Security.temporary() uses one certificate as CA, worker and client cert:
    # ship each PEM once (a FaaS event has a size limit), refer to it by field name.
    first_of: dict[str, str] = {}
    for name, value in list(out.items()):
        if isinstance(value, str) and value.lstrip().startswith("-----BEGIN"):
            if value in first_of:
                out[name] = _SAME_AS + first_of[value]
            else:
                first_of[value] = name
    return out


def security_from_dict(data: dict | None):
    from distributed.security import Security

    if not data:
        return Security()
    import ssl

    data = dict(data)
    extra = data.pop("extra_conn_args", None) or {}
    for name, value in list(data.items()):
        if isinstance(value, str) and value.startswith(_SAME_AS):
            data[name] = data[value[len(_SAME_AS):]]
    for name in ("tls_min_version", "tls_max_version"):
        if data.get(name) is not None:
            data[name] = ssl.TLSVersion(data[name])
    return Security(extra_conn_args=extra, **data)


@dataclass
class LaunchPayload:
    scheduler_address: str
    name: str
    nthreads: int = 1
    memory_limit: int | str | None = "auto"
    nanny: bool = True
    lifetime: float | None = None
    lifetime_stagger: float = 0.0
    death_timeout: float = 60.0
    security: dict | None = None
    relay: dict | None = None  # {"address": "host:port"}; the token is in security.extra_conn_args
    config: dict = field(default_factory=dict)
    runtime_key: dict = field(default_factory=runtime_key)
    local_directory: str | None = None
    resources: dict | None = None
    host: str | None = None
    listen_address: str | None = None
    contact_address: str | None = None
    mode: str = "localhost"
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LaunchPayload:
        if not isinstance(data, dict):
            raise PayloadError(f"launch payload must be a mapping, got {type(data).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise PayloadError(
                f"unknown launch payload keys {sorted(unknown)}; allowed: {sorted(known)}"
            )
        for required in ("scheduler_address", "name"):
            if not data.get(required):
                raise PayloadError(f"launch payload is missing {required!r}")
        if not isinstance(data["name"], str):
            raise PayloadError("launch payload 'name' must be a string (it is the spec key)")
        nthreads = data.get("nthreads", 1)
        if not isinstance(nthreads, int) or nthreads < 1:
            raise PayloadError(f"launch payload 'nthreads' = {nthreads!r}; allowed: integer >= 1")
        return cls(**data)


def encode(payload: LaunchPayload | dict) -> bytes:
    data = payload.to_dict() if isinstance(payload, LaunchPayload) else payload
    return msgpack.packb(data, use_bin_type=True)


def decode(raw: bytes) -> LaunchPayload:
    try:
        data = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception as e:
        raise PayloadError(f"launch payload is not valid msgpack: {e}") from e
    return LaunchPayload.from_dict(data)


def encode_b64(payload: LaunchPayload | dict) -> str:
    return base64.b64encode(encode(payload)).decode()


def decode_b64(text: str) -> LaunchPayload:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except Exception as e:
        raise PayloadError(f"launch payload is not valid base64: {e}") from e
    return decode(raw)


@dataclass
class SchedulerPayload:
    """What a scheduler started on a remote host needs (``remote_scheduler --payload-file``).

    ``host``/``port``: where it listens (``port`` 0: any); ``security``: from
    :func:`security_to_dict` with ``scheduler=True``; ``dashboard_address``:
    None for no dashboard; ``config``: the client's dask config (differences
    from the defaults); ``relay``: ``{"host": ..., "port": ...}`` to run a
    ``relay://`` relay in the same process (its token travels in
    ``security["extra_conn_args"]["relay_token"]``), or None.
    """

    host: str
    port: int = 0
    protocol: str | None = None
    security: dict | None = None
    dashboard_address: str | None = None
    config: dict = field(default_factory=dict)
    idle_timeout: float | None = None
    relay: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def encode(self) -> bytes:
        return msgpack.packb(self.to_dict(), use_bin_type=True)

    @classmethod
    def decode(cls, raw: bytes) -> SchedulerPayload:
        try:
            data = msgpack.unpackb(raw, raw=False, strict_map_key=False)
        except Exception as e:
            raise PayloadError(f"scheduler payload is not valid msgpack: {e}") from e
        if not isinstance(data, dict):
            raise PayloadError(f"scheduler payload must be a mapping, got {type(data).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise PayloadError(f"unknown scheduler payload keys {sorted(unknown)}; "
                               f"allowed: {sorted(known)}")
        if not data.get("host"):
            raise PayloadError("scheduler payload is missing 'host'")
        relay = data.get("relay")
        if relay is not None and not (data.get("security") or {}).get(
                "extra_conn_args", {}).get("relay_token"):
            raise PayloadError("scheduler payload has 'relay' but no relay token in "
                               "security.extra_conn_args")
        return cls(**data)
