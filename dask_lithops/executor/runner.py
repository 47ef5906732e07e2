"""What runs on a Dask worker for one Lithops call: the task function of every job.

A call's task returns a :class:`CallOutput` (the function's value plus Lithops' timing
stats); an exception raised by the function is left to Dask, which carries its type and
traceback to the client.  By name, ``storage`` (a :class:`~dask_lithops.storage.Storage`),
``id`` (the call's number) and, for object iterdata, ``obj`` (a cloud object with its
``data_stream``) are filled in, as Lithops' job runner does.
"""

from __future__ import annotations

import contextlib
import copy
import os
import threading
import time

from dask_lithops.executor.iterdata import call_arguments, verify_args


class CallOutput:
    """A call's value and stats; ``nested`` when the function returned futures (their results)."""

    __slots__ = ("value", "stats", "nested")

    def __init__(self, value, stats, nested=None):
        self.value = value
        self.stats = stats
        self.nested = nested  # None, or ("single" | "list", [results], [stats])

    def __reduce__(self):
        return CallOutput, (self.value, self.stats, self.nested)

    def output(self):
        """What a chained map or a reducer receives from this call."""
        if self.nested is None:
            return self.value
        shape, results, _ = self.nested
        return results[0] if shape == "single" and len(results) == 1 else results


# --------------------------------------------------------------------------- extra_env

_ENV_LOCK = threading.Lock()
_ENV_USERS: dict[str, list] = {}  # name -> [users, value before the first]


@contextlib.contextmanager
def extra_environment(env: dict | None):
    """Set ``env`` in this worker process while the call runs.

    Calls share their worker's process, so a variable stays set while any call that
    asked for it runs, and is restored after the last.
    """
    if not env:
        yield
        return
    with _ENV_LOCK:
        for name, value in env.items():
            entry = _ENV_USERS.setdefault(name, [0, os.environ.get(name)])
            entry[0] += 1
            os.environ[name] = value
    try:
        yield
    finally:
        with _ENV_LOCK:
            for name in env:
                entry = _ENV_USERS[name]
                entry[0] -= 1
                if entry[0] == 0:
                    del _ENV_USERS[name]
                    if entry[1] is None:
                        os.environ.pop(name, None)
                    else:
                        os.environ[name] = entry[1]


# --------------------------------------------------------------------------- objects


def load_object(obj, storage_config: dict | None) -> None:
    """Open ``obj.data_stream`` over the object's partition (Lithops' ``_load_object``)."""
    from dask_lithops.storage.storage import cached_storage
    from dask_lithops.storage.streams import PartitionStream, buffered

    brange = obj.data_byte_range
    if hasattr(obj, "path"):
        from dask_lithops.storage.streams import RangeReader

        raw = RangeReader(open(obj.path, "rb"), *(brange or (0, None)))
    elif hasattr(obj, "url"):
        import urllib.request

        headers = {"Range": "bytes={}-{}".format(*brange)} if brange else {}
        raw = urllib.request.urlopen(urllib.request.Request(obj.url, headers=headers), timeout=60)
    else:
        if storage_config and obj.backend == storage_config.get("backend"):
            storage = cached_storage(storage_config)
        else:
            storage = cached_storage({"backend": obj.backend, obj.backend: {}})
        extra = {"Range": "bytes={}-{}".format(*brange)} if brange else {}
        raw = storage.get_object(obj.bucket, obj.key, stream=True, extra_get_args=extra)

    if brange is None:
        obj.data_stream = raw if hasattr(raw, "readline") else buffered(raw)
        obj.data_byte_range = (0, obj.chunk_size - 1)
        return
    first, last = brange
    if obj.newline is None:
        obj.data_stream = raw if hasattr(raw, "readline") else buffered(raw)
    else:
        start = 0 if first == 0 else first + 1
        obj.data_stream = buffered(PartitionStream(raw, first, start, obj.chunk_size,
                                                   obj.newline.encode()))
    if last - first > obj.chunk_size:
        obj.data_byte_range = (first, first + obj.chunk_size - 1)


# --------------------------------------------------------------------------- the task


def _returned_futures(value):
    from dask_lithops.executor.future import FuturesList, ResponseFuture

    if isinstance(value, ResponseFuture):
        return "single", [value]
    if isinstance(value, FuturesList) or (
            isinstance(value, list) and value and all(isinstance(f, ResponseFuture) for f in value)):
        return "list", list(value)
    return None


def _with_timeout(func, args, kwargs, timeout):
    """Run ``func`` for at most ``timeout`` seconds (the thread is left behind if it overruns)."""
    box = {}

    def target():
        try:
            box["value"] = func(*args, **kwargs)
        except BaseException as e:  # noqa: B036  (re-raised in the task's thread)
            box["error"] = e

    t = threading.Thread(target=target, name="lithops-call", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"Function exceeded maximum time of {timeout} seconds and was "
                           "abandoned (its thread keeps running until it returns)")
    if "error" in box:
        raise box["error"]
    return box["value"]


_FUNCTIONS: dict[bytes, object] = {}
_FUNCTIONS_LOCK = threading.Lock()


def job_function(job: dict):
    """The job's function, unpickled once per worker process."""
    digest = job["func_digest"]
    func = _FUNCTIONS.get(digest)
    if func is None:
        import cloudpickle

        with _FUNCTIONS_LOCK:
            func = _FUNCTIONS.get(digest)
            if func is None:
                if len(_FUNCTIONS) > 256:
                    _FUNCTIONS.clear()
                func = _FUNCTIONS[digest] = cloudpickle.loads(job["func"])
    return func


def run_call(job: dict, data: dict, dependency=None) -> CallOutput:
    """Run one call of a job: the job's function with the arguments ``data`` describes."""
    start = time.time()
    func = job_function(job)
    data = dict(data)
    if job.get("reduce_param"):
        data[job["reduce_param"]] = [d.output() if isinstance(d, CallOutput) else d
                                     for d in dependency]
    elif "__chained__" in data:
        del data["__chained__"]
        prev = dependency.output() if isinstance(dependency, CallOutput) else dependency
        data.update(verify_args(func, [prev], None)[0])
    if job.get("obj") and data.get("obj") is not None and not isinstance(data["obj"], str):
        data["obj"] = copy.copy(data["obj"])  # the task's input stays as it was (retries)
        load_object(data["obj"], job.get("storage_config"))
    if job.get("inject_storage"):
        from dask_lithops.storage.storage import cached_storage

        data["storage"] = cached_storage(job["storage_config"])
    args, kwargs = call_arguments(job.get("layout"), data)

    with extra_environment(job.get("extra_env")):
        func_start = time.time()
        if job.get("timeout"):
            value = _with_timeout(func, args, kwargs, job["timeout"])
        else:
            value = func(*args, **kwargs)
        func_end = time.time()

    nested = None
    returned = _returned_futures(value)
    if returned is not None:
        from dask_lithops.executor.wait import get_result_with_stats

        shape, futures = returned
        results, stats = get_result_with_stats(futures)
        nested, value = (shape, results, stats), None
    end = time.time()
    return CallOutput(value, {
        "worker_start_tstamp": start,
        "worker_func_start_tstamp": func_start,
        "worker_func_end_tstamp": func_end,
        "worker_func_exec_time": round(func_end - func_start, 8),
        "worker_end_tstamp": end,
        "worker_exec_time": round(end - start, 8),
    }, nested)
