"""Object iterdata -> one call per object partition, as ``lithops.job.partitioner`` splits them.

``obj`` values may be ``<backend>://bucket/prefix/``, ``bucket/key`` (the executor's
storage), a ``CloudObject``, public ``http(s)://`` URLs or local paths (``/...``: files or
directories).  Each object is split by ``obj_chunk_size`` (bytes) or ``obj_chunk_number``;
with ``obj_newline`` (default ``"\\n"``) each partition's range reaches back one byte and
ahead ``CHUNK_THRESHOLD`` bytes so the worker can keep lines whole.
"""

from __future__ import annotations

import fnmatch
import os
import urllib.request

from dask_lithops.storage.storage import Storage
from dask_lithops.storage.utils import CloudObject, CloudObjectLocal, CloudObjectUrl, split_object_url

CHUNK_THRESHOLD = 128 * 1024


def _chunk_size(obj_size, chunk_size, chunk_number):
    if chunk_number and obj_size:
        rest = obj_size % chunk_number
        return obj_size // chunk_number + round(rest / chunk_number + 0.5)
    if chunk_size and obj_size:
        return chunk_size
    return obj_size or 1


def _split(make_obj, entry, obj_size, chunk_size, chunk_number, newline):
    csize = _chunk_size(obj_size, chunk_size, chunk_number)
    parts, pos = [], 0
    while True:
        if obj_size <= csize:  # one partition: the whole object
            brange, this = None, obj_size
        elif newline is None:  # exact byte ranges
            this = min(csize, obj_size - pos)
            brange = (pos, pos + this - 1)
        elif pos + csize < obj_size:  # one byte back, a margin ahead, for whole lines
            this = csize
            brange = (pos - 1 if pos > 0 else 0, pos + csize + CHUNK_THRESHOLD)
        else:  # the last partition
            this = obj_size - pos
            brange = (pos - 1, obj_size - 1)
        obj = make_obj()
        obj.data_byte_range = brange
        obj.chunk_size = this
        obj.part = len(parts) + 1
        obj.newline = newline
        parts.append({**entry, "obj": obj})
        pos += this
        if pos >= obj_size:
            break
    for p in parts:
        p["obj"].total_parts = len(parts)
    return parts


def create_partitions(storage_factory, map_iterdata, obj_chunk_size, obj_chunk_number, obj_newline):
    """``(call dicts, parts per object)``; ``storage_factory(backend)`` gives a ``Storage``."""
    if obj_chunk_size is not None and (isinstance(obj_chunk_size, bool) or not isinstance(obj_chunk_size, int)
                                       or obj_chunk_size <= 0):
        raise ValueError(f"obj_chunk_size = {obj_chunk_size!r} is invalid; allowed: bytes > 0, or None")
    if obj_chunk_number is not None and (isinstance(obj_chunk_number, bool)
                                         or not isinstance(obj_chunk_number, int) or obj_chunk_number <= 0):
        raise ValueError(f"obj_chunk_number = {obj_chunk_number!r} is invalid; allowed: an integer > 0, "
                         "or None")
    if obj_newline is not None and (not isinstance(obj_newline, str) or len(obj_newline.encode()) != 1):
        raise ValueError(f"obj_newline = {obj_newline!r} is invalid; allowed: a one-byte string such as "
                         "'\\n', or None")
    for i, elem in enumerate(map_iterdata):
        if "obj" not in elem:
            raise ValueError(f"iterdata[{i}] has no 'obj' value; a function with an obj parameter takes "
                             "object keys, <backend>://bucket/prefix/ URLs, http(s) URLs or local paths")
    urls = [e for e in map_iterdata if str(e["obj"]).startswith(("http://", "https://"))]
    paths = [e for e in map_iterdata if str(e["obj"]).startswith("/")]
    if urls:
        return _from_urls(urls, obj_chunk_size, obj_chunk_number, obj_newline)
    if paths:
        return _from_paths(paths, obj_chunk_size, obj_chunk_number, obj_newline)
    return _from_storage(storage_factory, map_iterdata, obj_chunk_size, obj_chunk_number, obj_newline)


def _from_urls(entries, chunk_size, chunk_number, newline):
    partitions, ppo = [], []
    for entry in entries:
        url = entry["obj"]
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=30) as r:
            size = int(r.headers.get("content-length") or 0)
            ranges = "bytes" in (r.headers.get("accept-ranges") or "")
        parts = _split(lambda u=url: CloudObjectUrl(u), entry, size,
                       chunk_size if ranges else None, chunk_number if ranges else None, newline)
        partitions += parts
        ppo.append(len(parts))
    return partitions, ppo


def _from_paths(entries, chunk_size, chunk_number, newline):
    files, expanded = set(), []
    for entry in entries:
        path = entry["obj"]
        if os.path.isdir(path):
            for name in sorted(os.listdir(path)):
                full = os.path.join(path, name)
                if full not in files and os.path.isfile(full):
                    files.add(full)
                    expanded.append({**entry, "obj": full})
        elif os.path.isfile(path):
            if path not in files:
                files.add(path)
                expanded.append(entry)
        else:
            raise FileNotFoundError(f"obj = {path!r}: no such file or directory")
    partitions, ppo = [], []
    for entry in expanded:
        path = entry["obj"]
        parts = _split(lambda p=path: CloudObjectLocal(p), entry, os.stat(path).st_size,
                       chunk_size, chunk_number, newline)
        partitions += parts
        ppo.append(len(parts))
    return partitions, ppo


def _from_storage(storage_factory, entries, chunk_size, chunk_number, newline):
    default_backend = storage_factory(None).backend
    normalised, backends = [], set()
    for entry in entries:
        obj = entry["obj"]
        if isinstance(obj, CloudObject):
            obj = f"{obj.backend}://{obj.bucket}/{obj.key}"
        if not isinstance(obj, str):
            raise ValueError(f"obj = {obj!r} is invalid; allowed: object keys 'bucket/key', "
                             "'<backend>://bucket/prefix/', CloudObject, http(s) URLs, local paths")
        sb = split_object_url(obj)[0]
        if sb is None:
            sb, obj = default_backend, f"{default_backend}://{obj}"
        backends.add(sb)
        normalised.append({**entry, "obj": obj})
    if len(backends) > 1:
        raise ValueError(f"objects from several storage backends in one map: {sorted(backends)}")
    sb = backends.pop()
    storage: Storage = storage_factory(sb)

    partitions, ppo, total = [], [], 0
    for entry in normalised:
        params = {k: v for k, v in entry.items() if k != "obj"}
        _, bucket, prefix, obj_name = split_object_url(entry["obj"])
        if obj_name and "*" not in prefix + obj_name:
            key = f"{prefix}/{obj_name}" if prefix else obj_name
            head = storage.head_object(bucket, key)
            objects = [{"Key": key, "Size": int(head["content-length"])}]
        else:
            pattern = None
            full = f"{prefix}/{obj_name}" if obj_name else prefix
            if "*" in full:
                pattern, full = full, full[:full.index("*")]
                listing_prefix = full
            else:
                listing_prefix = f"{full}/" if full else ""
            objects = storage.list_objects(bucket, listing_prefix)
            if pattern:
                objects = [o for o in objects if fnmatch.fnmatchcase(o["Key"], pattern)]
        total += len(objects)
        for o in objects:
            key = o["Key"]
            if key.endswith("/"):
                continue
            parts = _split(lambda k=key, b=bucket: CloudObject(sb, b, k), {**params}, int(o["Size"]),
                           chunk_size, chunk_number, newline)
            partitions += parts
            ppo.append(len(parts))
    if total == 0:
        raise FileNotFoundError("No objects found: " + ", ".join(e["obj"] for e in normalised))
    return partitions, ppo
