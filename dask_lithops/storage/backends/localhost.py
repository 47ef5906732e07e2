"""``localhost`` storage: buckets are directories under a root (Lithops' layout)."""

from __future__ import annotations

import fnmatch
import getpass
import os
import shutil
import tempfile

from dask_lithops.storage.streams import RangeReader, buffered
from dask_lithops.storage.utils import StorageNoSuchKeyError

_PARTIAL = ".partial"


def default_root() -> str:
    """Where Lithops' localhost storage keeps its buckets: ``<tmp>/lithops-<user>``."""
    try:
        user = getpass.getuser()
    except Exception:
        user = os.getenv("USER", "root")
    return os.path.join(os.path.realpath(tempfile.gettempdir()), f"lithops-{user}")


def parse_range(extra_get_args: dict | None) -> tuple[int, int | None] | None:
    spec = (extra_get_args or {}).get("Range")
    if not spec:
        return None
    first, _, last = spec.replace("bytes=", "").partition("-")
    return int(first), int(last) if last else None


class StorageBackend:
    def __init__(self, config: dict):
        self.root = os.path.abspath(config.get("storage_root") or default_root())

    def get_client(self):
        return self

    def generate_bucket_name(self) -> str:
        return "storage"

    def _path(self, bucket: str, key: str = "") -> str:
        base = os.path.join(self.root, bucket)
        path = os.path.normpath(os.path.join(base, key))
        if path != base and not path.startswith(base + os.sep):
            raise ValueError(f"key {key!r} leaves bucket {bucket!r}")
        return path

    def create_bucket(self, bucket: str) -> None:
        os.makedirs(self._path(bucket), exist_ok=True)

    def put_object(self, bucket, key, data):
        path = self._path(bucket, key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # written aside, then renamed: readers never see a half-written object
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}{_PARTIAL}")
        with open(tmp, "wb") as f:
            if isinstance(data, (bytes, bytearray, memoryview)):
                f.write(data)
            elif isinstance(data, str):
                f.write(data.encode())
            elif hasattr(data, "read"):
                shutil.copyfileobj(data, f, 1024 * 1024)
            else:
                raise TypeError(f"body must be str, bytes or a file-like object, not {type(data).__name__}")
        os.replace(tmp, path)

    def get_object(self, bucket, key, stream=False, extra_get_args=None):
        path = self._path(bucket, key)
        if not os.path.isfile(path):
            raise StorageNoSuchKeyError(bucket, key)
        byte_range = parse_range(extra_get_args)
        f = open(path, "rb")
        if stream:
            return buffered(RangeReader(f, *byte_range)) if byte_range else f
        with f:
            if byte_range:
                first, last = byte_range
                f.seek(first)
                return f.read() if last is None else f.read(last - first + 1)
            return f.read()

    def upload_file(self, file_name, bucket, key=None, extra_args=None, config=None):
        with open(file_name, "rb") as f:
            self.put_object(bucket, key or os.path.basename(file_name), f)
        return True

    def download_file(self, bucket, key, file_name=None, extra_args=None, config=None):
        file_name = file_name or key
        if os.path.dirname(file_name):
            os.makedirs(os.path.dirname(file_name), exist_ok=True)
        with self.get_object(bucket, key, stream=True) as src, open(file_name, "wb") as dst:
            shutil.copyfileobj(src, dst)
        return True

    def head_object(self, bucket, key):
        path = self._path(bucket, key)
        if not os.path.isfile(path):
            raise StorageNoSuchKeyError(bucket, key)
        return {"content-length": str(os.stat(path).st_size)}

    def delete_object(self, bucket, key):
        path = self._path(bucket, key)
        try:
            os.remove(path)
        except FileNotFoundError:
            return
        base = self._path(bucket)
        parent = os.path.dirname(path)
        while parent.startswith(base + os.sep):  # drop empty "folders", not the bucket
            try:
                os.rmdir(parent)
            except OSError:
                break
            parent = os.path.dirname(parent)

    def delete_objects(self, bucket, key_list):
        for key in key_list:
            self.delete_object(bucket, key)

    def head_bucket(self, bucket):
        if os.path.isdir(self._path(bucket)):
            return {"ResponseMetadata": {"HTTPStatusCode": 200}}
        raise StorageNoSuchKeyError(bucket, "")

    def list_objects(self, bucket, prefix=None, match_pattern=None):
        base = self._path(bucket)
        out = []
        for key in self.list_keys(bucket, prefix):
            if match_pattern is None or fnmatch.fnmatchcase(key, match_pattern):
                out.append({"Key": key, "Size": os.stat(os.path.join(base, key)).st_size})
        return out

    def list_keys(self, bucket, prefix=None):
        base = self._path(bucket)
        prefix = prefix or ""
        keys = []
        for dirpath, _, files in os.walk(base):
            for name in files:
                if name.startswith(".") and name.endswith(_PARTIAL):
                    continue
                key = os.path.relpath(os.path.join(dirpath, name), base).replace(os.sep, "/")
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)


