"""``Storage``: Lithops' object-storage API over the ``localhost`` and ``aws_s3`` backends."""

from __future__ import annotations

import importlib
import itertools
import json
import os
import threading
from collections.abc import Mapping
from typing import Any

from dask_lithops import config as dl_config
from dask_lithops.storage.backends import BACKENDS
from dask_lithops.storage.utils import CloudObject

TEMP_PREFIX = "lithops.jobs/tmp"
_COBJECTS_INDEX = itertools.count()
_AWS_KEYS = ("region", "access_key_id", "secret_access_key", "session_token")


def default_backend(mode: str | None = None) -> str:
    """``lithops.storage`` if set; else ``localhost`` in localhost mode, ``aws_s3`` otherwise."""
    configured = dl_config.get("storage")
    if configured:
        return configured
    if mode is None:
        mode, _ = dl_config.resolve_mode()
    return "localhost" if mode == "localhost" else "aws_s3"


def resolve_storage_config(config: Mapping | None = None, backend: str | None = None,
                           mode: str | None = None) -> dict:
    """``{"backend": name, name: {...}}`` from a Lithops config dict, or from ours.

    With ``config`` (a Lithops config dict, as ``Storage(config=...)`` takes it) its
    ``lithops.storage``, ``aws``/``aws_s3`` and ``localhost`` sections are used, as Lithops
    merges them; without it the dask config (``lithops.storage``, ``lithops.aws``,
    ``lithops.aws_s3``) and the Lithops config file are.
    """
    if config is not None and not backend:
        general = config.get("lithops") or {}
        backend = general.get("storage")
        config_mode = general.get("mode") or dl_config.MODE_OF_BACKEND.get(general.get("backend"))
        if not backend and config_mode:
            backend = "localhost" if config_mode == "localhost" else "aws_s3"
    backend = backend or default_backend(mode)
    if backend not in BACKENDS:
        raise dl_config.ConfigError(
            f"lithops.storage = {backend!r} is invalid; allowed: {', '.join(BACKENDS)}")
    section: dict[str, Any] = {}
    if config is not None:
        if backend == "aws_s3":
            section.update({k: v for k, v in (config.get("aws") or {}).items() if v is not None})
            if "region_name" in section:
                section["region"] = section.pop("region_name")
        section.update({k: v for k, v in (config.get(backend) or {}).items() if v is not None})
    elif backend == "aws_s3":
        for key in _AWS_KEYS:
            value = dl_config.get(f"aws_s3.{key}") if key == "region" else None
            value = value or dl_config.get(f"aws.{key}")
            if value is not None:
                section[key] = value
        for key in ("storage_bucket", "endpoint_url"):
            value = dl_config.get(f"aws_s3.{key}")
            if value is not None:
                section[key] = value
    return {"backend": backend, backend: section}


class Storage:
    """Lithops' ``Storage``: object calls on the configured storage backend.

    ``Storage()`` uses the configured backend (``lithops.storage``; ``localhost`` in
    localhost mode, else ``aws_s3``).  ``Storage(backend="aws_s3", config={...})`` takes a
    Lithops config dict (``aws``/``aws_s3`` sections: ``region``, ``access_key_id``,
    ``secret_access_key``, ``session_token``, ``storage_bucket``, ``endpoint_url``);
    ``localhost`` keeps buckets as directories under ``localhost.storage_root``
    (default Lithops' ``<tmp>/lithops-<user>``).
    """

    def __init__(self, config: Mapping | None = None, backend: str | None = None,
                 storage_config: Mapping | None = None):
        if storage_config:
            storage_config = dict(storage_config)
            backend = storage_config.get("backend")
            if backend not in BACKENDS:
                raise dl_config.ConfigError(
                    f"storage_config['backend'] = {backend!r} is invalid; allowed: {', '.join(BACKENDS)}")
            storage_config.setdefault(backend, {})
            self.config = storage_config
        else:
            self.config = resolve_storage_config(config, backend)
        self.backend = self.config["backend"]
        module = importlib.import_module(f"dask_lithops.storage.backends.{self.backend}")
        self.storage_handler = module.StorageBackend(self.config[self.backend])
        self._bucket = self.config[self.backend].get("storage_bucket")

    def __reduce__(self):
        return type(self), (None, None, self.config)

    def __repr__(self):
        return f"<Storage backend={self.backend}>"

    @property
    def bucket(self) -> str:
        """The default bucket (``storage_bucket``; else one named as Lithops names it)."""
        if not self._bucket:
            self._bucket = self.storage_handler.generate_bucket_name()
        return self._bucket

    def get_client(self):
        return self.storage_handler.get_client()

    def get_storage_config(self) -> dict:
        return self.config

    def create_bucket(self, bucket: str):
        return self.storage_handler.create_bucket(bucket)

    def put_object(self, bucket: str, key: str, body):
        return self.storage_handler.put_object(bucket, key, body)

    def get_object(self, bucket: str, key: str, stream: bool = False, extra_get_args: dict | None = None):
        return self.storage_handler.get_object(bucket, key, stream, extra_get_args or {})

    def upload_file(self, file_name: str, bucket: str, key: str | None = None,
                    extra_args: dict | None = None, config=None):
        return self.storage_handler.upload_file(file_name, bucket, key, extra_args or {}, config)

    def download_file(self, bucket: str, key: str, file_name: str | None = None,
                      extra_args: dict | None = None, config=None):
        return self.storage_handler.download_file(bucket, key, file_name, extra_args or {}, config)

    def head_object(self, bucket: str, key: str) -> dict:
        return self.storage_handler.head_object(bucket, key)

    def delete_object(self, bucket: str, key: str):
        return self.storage_handler.delete_object(bucket, key)

    def delete_objects(self, bucket: str, key_list: list[str]):
        return self.storage_handler.delete_objects(bucket, key_list)

    def head_bucket(self, bucket: str) -> dict:
        return self.storage_handler.head_bucket(bucket)

    def list_objects(self, bucket: str, prefix: str | None = None, match_pattern: str | None = None):
        return self.storage_handler.list_objects(bucket, prefix, match_pattern)

    def list_keys(self, bucket: str, prefix: str | None = None) -> list[str]:
        return self.storage_handler.list_keys(bucket, prefix)

    def put_cloudobject(self, body, bucket: str | None = None, key: str | None = None) -> CloudObject:
        if key is None:
            session = os.environ.get("__LITHOPS_SESSION_ID", "")
            name = f"cloudobject_{os.getpid():x}{next(_COBJECTS_INDEX):x}"
            key = "/".join([TEMP_PREFIX, session, name] if session else [TEMP_PREFIX, name])
        bucket = bucket or self.bucket
        self.storage_handler.put_object(bucket, key, body)
        return CloudObject(self.backend, bucket, key)

    def _check_backend(self, cloudobject: CloudObject) -> None:
        if cloudobject.backend != self.backend:
            raise ValueError(f"CloudObject: invalid storage backend {cloudobject.backend!r}; "
                             f"this Storage is {self.backend!r}")

    def get_cloudobject(self, cloudobject: CloudObject, stream: bool = False):
        self._check_backend(cloudobject)
        return self.storage_handler.get_object(cloudobject.bucket, cloudobject.key, stream=stream)

    def delete_cloudobject(self, cloudobject: CloudObject):
        self._check_backend(cloudobject)
        return self.storage_handler.delete_object(cloudobject.bucket, cloudobject.key)

    def delete_cloudobjects(self, cloudobjects: list[CloudObject]):
        by_bucket: dict[str, list[str]] = {}
        for co in cloudobjects:
            self._check_backend(co)
            by_bucket.setdefault(co.bucket, []).append(co.key)
        for bucket, keys in by_bucket.items():
            self.storage_handler.delete_objects(bucket, keys)


_CACHE: dict[str, Storage] = {}
_CACHE_LOCK = threading.Lock()


def cached_storage(storage_config: Mapping) -> Storage:
    """One ``Storage`` per config in this process (clients are costly to create)."""
    key = json.dumps(storage_config, sort_keys=True, default=str)
    with _CACHE_LOCK:
        storage = _CACHE.get(key)
        if storage is None:
            storage = _CACHE[key] = Storage(storage_config=storage_config)
        return storage
