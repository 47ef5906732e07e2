"""Lithops' ``Storage`` API on dask-lithops (``localhost`` and ``aws_s3`` backends)."""

from dask_lithops.storage.storage import Storage
from dask_lithops.storage.utils import CloudObject, StorageNoSuchKeyError

__all__ = ["CloudObject", "Storage", "StorageNoSuchKeyError"]
