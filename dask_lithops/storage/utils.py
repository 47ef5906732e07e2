"""Cloud objects and object URLs, named and shaped as in ``lithops.storage.utils``."""

from __future__ import annotations

import os


class StorageNoSuchKeyError(Exception):
    def __init__(self, bucket, key):
        super().__init__(f"No such key /{bucket}/{key} found in storage.")
        self.bucket = bucket
        self.key = key

    def __reduce__(self):
        return type(self), (self.bucket, self.key)


class CloudObject:
    """An object in a storage backend; with object iterdata also a partition of it.

    A function that takes an ``obj`` parameter gets one, with ``part``,
    ``total_parts``, ``chunk_size``, ``data_byte_range`` and ``data_stream``
    (a file-like object over its partition) filled in.
    """

    def __init__(self, backend, bucket, key):
        self.backend = backend
        self.bucket = bucket
        self.key = key

    def __str__(self):
        return f"<CloudObject at {self.backend}://{self.bucket}/{self.key}>"

    __repr__ = __str__


class CloudObjectUrl:
    def __init__(self, url):
        self.url = url

    def __str__(self):
        return f"<CloudObject at {self.url}>"

    __repr__ = __str__


class CloudObjectLocal:
    def __init__(self, path):
        self.path = path
        self.bucket = os.path.dirname(path)
        self.key = os.path.basename(path)

    def __str__(self):
        return f"<CloudObject at {self.path}>"

    __repr__ = __str__


def split_object_url(obj_url: str) -> tuple[str | None, str, str, str]:
    """``"s3://bucket/a/b.csv"`` -> ``("aws_s3", "bucket", "a", "b.csv")``, as Lithops splits it."""
    if "://" in obj_url:
        sb, path = obj_url.split("://", 1)
    else:
        sb, path = None, obj_url
    sb = {"s3": "aws_s3", "cos": "ibm_cos"}.get(sb, sb)
    bucket, full_key = path.split("/", 1) if "/" in path else (path, "")
    if full_key.endswith("/"):
        prefix, obj_name = full_key[:-1], ""
    elif full_key:
        prefix, obj_name = full_key.rsplit("/", 1) if "/" in full_key else ("", full_key)
    else:
        prefix, obj_name = "", ""
    return sb, bucket, prefix, obj_name
