"""``FunctionExecutor`` and friends: Lithops' programming model on a dask-lithops cluster.

Each call of a job is one Dask task (``runner.run_call``); a job is submitted with one
``Client.map`` (one scheduler message, whatever its size), and results come back with
one ``gather``.  The executor starts the configured mode's cluster (keywords, ``config``,
``config_file``, dask config, Lithops config file: the clusters' own resolution) or
attaches to one (``cluster=`` a cluster, a ``Client`` or a scheduler address; inside a
task, the worker's own scheduler), and closes what it started on ``clean()``/exit.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import inspect
import itertools
import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime
from types import SimpleNamespace
from typing import Any

import cloudpickle
import dask.config
import yaml

from dask_lithops import config as dl_config
from dask_lithops.executor.future import FuturesList, ResponseFuture, create_futures_list
from dask_lithops.executor.iterdata import (
    call_layout,
    is_object_processing_function,
    verify_args,
)
from dask_lithops.executor.partitioner import create_partitions
from dask_lithops.executor.runner import run_call
from dask_lithops.executor.wait import (
    ALL_COMPLETED,
    ALWAYS,
    THREADPOOL_SIZE,
    check_return_when,
    check_timeout,
)
from dask_lithops.executor.wait import wait as _wait

logger = logging.getLogger("dask_lithops.executor")

_SESSION_ID = uuid.uuid4().hex[:6]
_EXECUTOR_COUNTER = itertools.count()
MONITORING = ("storage", "rabbitmq")


def create_executor_id() -> str:
    return f"{_SESSION_ID}-{next(_EXECUTOR_COUNTER)}"


def on_dask_worker() -> bool:
    try:
        from distributed import get_worker

        get_worker()
        return True
    except (ImportError, ValueError):
        return False


def _flatten(tree: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _check_list(name, value):
    if value is not None and not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} = {value!r} is invalid; allowed: a list of module names, or None")


def _check_env(extra_env):
    if extra_env is None:
        return None
    if not isinstance(extra_env, Mapping):
        raise ValueError(f"extra_env = {extra_env!r} is invalid; allowed: a dict of variable names "
                         "to values")
    env = {}
    for k, v in extra_env.items():
        if not isinstance(k, str) or not k:
            raise ValueError(f"extra_env key {k!r} is invalid; allowed: non-empty strings")
        env[k] = str(v)  # Lithops turns booleans (and everything else) into strings
    return env


def _check_positive_int(name, value, allow_zero=False):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise ValueError(f"{name} = {value!r} is invalid; allowed: an integer "
                         f"{'>= 0' if allow_zero else '> 0'}, or None")
    return value


class FunctionExecutor:
    """Lithops' ``FunctionExecutor`` on a dask-lithops cluster.

    :param mode: ``localhost``, ``serverless`` or ``standalone`` (default: from config;
        localhost when nothing is configured).
    :param config: a Lithops config dict; replaces the Lithops config file, as in Lithops.
    :param config_file: path of a Lithops config file to use instead of the default one.
    :param backend: compute backend (``localhost``, ``aws_lambda``, ``ssh``, ``aws_ec2``).
    :param storage: storage backend (``localhost``, ``aws_s3``).
    :param monitoring: accepted (``storage``, ``rabbitmq``); Dask's scheduler reports states.
    :param log_level: ``INFO``, ``DEBUG``... for the ``dask_lithops`` logger.
    :param cluster: run on this cluster instead of starting one: a dask-lithops (or any
        Dask) cluster, a ``distributed.Client`` or a scheduler address.
    :param kwargs: options of the mode's cluster (the backend section's keys, e.g.
        ``worker_processes``, ``runtime_memory``), as in Lithops.
    """

    def __init__(self, mode: str | None = None, config: dict | None = None,
                 config_file: str | None = None, backend: str | None = None,
                 storage: str | None = None, monitoring: str | None = None,
                 log_level: str | None | bool = False, cluster: Any = None, **kwargs: Any):
        self.is_lithops_worker = on_dask_worker()
        self.executor_id = create_executor_id()
        self.futures: list[ResponseFuture] = []
        self.cleaned_jobs: set = set()
        self.total_jobs = 0
        self.last_call = None
        self.log_path = None
        self._client = None
        self._cluster = None
        self._owns_client = self._owns_cluster = False
        self._storages: dict = {}

        if monitoring is not None and monitoring not in MONITORING:
            raise ValueError(f"monitoring = {monitoring!r} is invalid; allowed: "
                             f"{', '.join(MONITORING)}, or None")
        if log_level:
            _setup_logging(log_level)
        lithops_config = _load_lithops_config(config, config_file)
        self._overlay = {}
        if lithops_config is not None:
            mapped = dl_config.map_lithops_config(lithops_config)
            source = "config" if config is not None else f"config_file {config_file}"
            try:
                dl_config.validate(mapped)
            except dl_config.ConfigError as e:
                raise dl_config.ConfigError(f"{e}\n(from FunctionExecutor's {source})") from None
            self._overlay = {k: v for k, v in _flatten(mapped).items() if v is not None}
        with self._config_context():
            self.mode, self.backend = dl_config.resolve_mode(mode, backend)
            from dask_lithops.storage.storage import resolve_storage_config

            self._storage_config = resolve_storage_config(lithops_config, storage, self.mode)
        if self._storage_config["backend"] == "localhost" and self.mode != "localhost":
            raise dl_config.ConfigError(
                f"storage = 'localhost' cannot be used with backend {self.backend!r}: its workers do not "
                "share this machine's disk; allowed: aws_s3")
        general = (lithops_config if lithops_config is not None else _lithops_file()).get("lithops") or {}
        self.config = {
            "lithops": {"mode": self.mode, "backend": self.backend,
                        "storage": self._storage_config["backend"],
                        "monitoring": monitoring or "storage",
                        "retries": general.get("retries", 0),
                        "execution_timeout": general.get("execution_timeout"),
                        "chunksize": general.get("chunksize"),
                        "data_cleaner": general.get("data_cleaner", True)},
            self.backend: dict(kwargs),
        }
        self._cluster_kwargs = kwargs
        self._connect(cluster)
        logger.debug("Function executor for %s created with ID: %s", self.backend, self.executor_id)

    # ------------------------------------------------------------------ cluster

    @contextlib.contextmanager
    def _config_context(self):
        if self._overlay:
            with dask.config.set(self._overlay):
                yield
        else:
            yield

    def _connect(self, cluster) -> None:
        from distributed import Client

        if cluster is None and self.is_lithops_worker:
            from distributed import get_client

            self._client = get_client()
            return
        if isinstance(cluster, Client):
            self._client = cluster
            return
        if isinstance(cluster, str):
            self._client = Client(cluster)
            self._owns_client = True
            return
        if cluster is not None:
            if not hasattr(cluster, "scheduler_address"):
                raise TypeError(f"cluster = {cluster!r} is invalid; allowed: a Dask cluster, a "
                                "distributed.Client, a scheduler address, or None (start one)")
            self._cluster = cluster
            self._client = Client(cluster)
            self._owns_client = True
            return
        self._start_cluster()

    def _start_cluster(self) -> None:
        from distributed import Client

        from dask_lithops.factory import Cluster

        with self._config_context():
            try:
                self._cluster = Cluster(self.mode, self.backend, **self._cluster_kwargs)
            except TypeError as e:
                if "unexpected keyword argument" in str(e):
                    raise TypeError(f"FunctionExecutor: {e} -- not an option of the {self.mode} "
                                    f"cluster ({self.backend})") from None
                raise
        self._owns_cluster = True
        if self.mode != "localhost" and not self._cluster.worker_spec:
            # No worker count given: as Lithops invokes a function per call, let the
            # cluster grow with the work (up to the backend's max_workers) and shrink after.
            self._cluster.adapt(minimum=0, maximum=getattr(self._cluster, "max_workers", None) or 1000)
        try:
            self._client = Client(self._cluster)
        except BaseException:
            self._cluster.close()
            raise
        self._owns_client = True

    @property
    def client(self):
        """The ``distributed.Client`` the calls go through (a cluster is restarted if cleaned)."""
        if self._client is None:
            self._start_cluster()
        return self._client

    @property
    def cluster(self):
        return self._cluster

    def _close(self) -> None:
        client, cluster = self._client, self._cluster
        if self._owns_client and client is not None:
            client.close()
            self._client = None
        if self._owns_cluster and cluster is not None:
            cluster.close()
            self._cluster = None
            self._owns_cluster = False

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_value, traceback):
        self._close()

    # ------------------------------------------------------------------ storage

    @property
    def storage(self):
        """The executor's ``Storage`` (``lithops.storage``)."""
        return self._storage_for(None)

    def _storage_for(self, backend: str | None):
        from dask_lithops.storage.storage import Storage

        backend = backend or self._storage_config["backend"]
        if backend not in self._storages:
            if backend == self._storage_config["backend"]:
                self._storages[backend] = Storage(storage_config=self._storage_config)
            else:
                self._storages[backend] = Storage(backend=backend)
        return self._storages[backend]

    # ------------------------------------------------------------------ jobs

    def _create_job_id(self, call_type: str) -> str:
        job_id = f"{call_type}{self.total_jobs:03d}"
        self.total_jobs += 1
        return job_id

    def _job_info(self, job_id, func, runtime_memory, timeout) -> SimpleNamespace:
        name = func.__name__ if inspect.isfunction(func) or inspect.ismethod(func) else type(func).__name__
        return SimpleNamespace(
            job_id=job_id, job_key=f"{self.executor_id}-{job_id}", executor_id=self.executor_id,
            function_name=name, execution_timeout=timeout, runtime_name=self.backend,
            runtime_memory=runtime_memory, host_job_meta={"host_job_create_tstamp": time.time()})

    def _submit(self, func, job_id, iterdata, *, extra_args=None, extra_env=None, runtime_memory=None,
                timeout=None, chunksize=None, include_modules=None, exclude_modules=None,
                obj_chunk_size=None, obj_chunk_number=None, obj_newline="\n",
                reduce_of=None) -> tuple[list[ResponseFuture], list | None]:
        if not callable(func):
            raise TypeError(f"the function to run must be callable, not {type(func).__name__}")
        extra_env = _check_env(extra_env)
        timeout = check_timeout(timeout or self.config["lithops"]["execution_timeout"])
        _check_positive_int("chunksize", chunksize, allow_zero=True)
        _check_positive_int("runtime_memory", runtime_memory)
        _check_list("include_modules", include_modules)
        _check_list("exclude_modules", exclude_modules)
        info = self._job_info(job_id, func, runtime_memory, timeout)

        try:
            params = set(inspect.signature(func).parameters)
        except (TypeError, ValueError):
            params = set()
        obj_job = "obj" in params and reduce_of is None and is_object_processing_function(func)
        if reduce_of is not None:
            reduce_param, call = _reduce_call(func, extra_args)
            calls = [call for _ in reduce_of]
            deps = [[f.dask_future for f in group] for group in reduce_of]
        else:
            reduce_param = None
            calls = verify_args(func, iterdata, extra_args)
            deps = None
            if calls and "__chained__" in calls[0]:
                deps = [c["__chained__"].future.dask_future for c in calls]
                calls = [{"__chained__": True} for _ in calls]
        ppo = None
        if obj_job and deps is None:
            calls, ppo = create_partitions(self._storage_for, calls, obj_chunk_size,
                                           obj_chunk_number, obj_newline)
        if not calls:
            return [], ppo
        if "id" in params:
            calls = [{**c, "id": i} for i, c in enumerate(calls)]
        inject_storage = "storage" in params
        func_bytes = cloudpickle.dumps(func)
        job = {"func": func_bytes, "func_digest": hashlib.sha1(func_bytes).digest(),
               "layout": call_layout(func), "obj": obj_job, "inject_storage": inject_storage,
               "storage_config": self._storage_config if (obj_job or inject_storage) else None,
               "extra_env": extra_env, "timeout": timeout, "reduce_param": reduce_param}
        # The function travels pickled (cloudpickle, as Lithops ships it), once per job;
        # modules registered with cloudpickle.register_pickle_by_value go by value.
        runner = functools.partial(run_call, job)
        prefix = f"{info.function_name}-{info.job_key}"
        keys = [f"{prefix}-{i:05d}" for i in range(len(calls))]
        info.host_job_meta["host_submit_tstamp"] = time.time()
        if deps is None:
            dask_futures = self.client.map(runner, calls, key=keys, pure=False)
        else:
            dask_futures = self.client.map(runner, calls, deps, key=keys, pure=False)
        futures = [ResponseFuture(df, f"{i:05d}", info) for i, df in enumerate(dask_futures)]
        self.futures.extend(futures)
        return futures, ppo

    def call_async(self, func: Callable, data, extra_env: dict | None = None,
                   runtime_memory: int | None = None, timeout: int | None = None,
                   include_modules: list | None = [], exclude_modules: list | None = []) -> ResponseFuture:  # noqa: B006
        """Run ``func`` once on ``data`` (a value, a tuple of arguments or a dict of keywords)."""
        job_id = self._create_job_id("A")
        self.last_call = "call_async"
        futures, _ = self._submit(func, job_id, [data], extra_env=extra_env,
                                  runtime_memory=runtime_memory, timeout=timeout,
                                  include_modules=include_modules, exclude_modules=exclude_modules)
        return futures[0]

    def map(self, map_function: Callable, map_iterdata, chunksize: int | None = None,
            extra_args=None, extra_env: dict | None = None, runtime_memory: int | None = None,
            obj_chunk_size: int | None = None, obj_chunk_number: int | None = None,
            obj_newline: str | None = "\n", timeout: int | None = None,
            include_modules: list | None = [], exclude_modules: list | None = []) -> FuturesList:  # noqa: B006
        """One call of ``map_function`` per element of ``map_iterdata`` (or object partition)."""
        job_id = self._create_job_id("M")
        self.last_call = "map"
        futures, _ = self._submit(
            map_function, job_id, map_iterdata, extra_args=extra_args, extra_env=extra_env,
            runtime_memory=runtime_memory, timeout=timeout, chunksize=chunksize,
            include_modules=include_modules, exclude_modules=exclude_modules,
            obj_chunk_size=obj_chunk_size, obj_chunk_number=obj_chunk_number, obj_newline=obj_newline)
        if isinstance(map_iterdata, FuturesList):
            for f in map_iterdata:
                f._produce_output = False
        return create_futures_list(futures, self)

    def map_reduce(self, map_function: Callable, map_iterdata, reduce_function: Callable,
                   chunksize: int | None = None, extra_args=None, extra_args_reduce=None,
                   extra_env: dict | None = None, map_runtime_memory: int | None = None,
                   reduce_runtime_memory: int | None = None, timeout: int | None = None,
                   obj_chunk_size: int | None = None, obj_chunk_number: int | None = None,
                   obj_newline: str | None = "\n", obj_reduce_by_key: bool = False,
                   spawn_reducer: int = 20, include_modules: list | None = [],  # noqa: B006
                   exclude_modules: list | None = [], reducer_one_per_object: bool | None = None  # noqa: B006
                   ) -> FuturesList:
        """Map, then ``reduce_function`` over the list of map outputs (one per object with
        ``obj_reduce_by_key``; ``reducer_one_per_object`` is its older Lithops name)."""
        check_return_when(spawn_reducer)
        _reduce_call(reduce_function, extra_args_reduce)  # a bad reducer fails before the maps run
        if reducer_one_per_object is not None:
            obj_reduce_by_key = obj_reduce_by_key or bool(reducer_one_per_object)
        self.last_call = "map_reduce"
        map_job_id = self._create_job_id("M")
        map_futures, ppo = self._submit(
            map_function, map_job_id, map_iterdata, extra_args=extra_args, extra_env=extra_env,
            runtime_memory=map_runtime_memory, timeout=timeout, chunksize=chunksize,
            include_modules=include_modules, exclude_modules=exclude_modules,
            obj_chunk_size=obj_chunk_size, obj_chunk_number=obj_chunk_number, obj_newline=obj_newline)
        if isinstance(map_iterdata, FuturesList):
            for f in map_iterdata:
                f._produce_output = False
        if spawn_reducer != ALWAYS:
            self.wait(map_futures, return_when=spawn_reducer, show_progressbar=False)
        if obj_reduce_by_key and ppo:
            groups, pos = [], 0
            for n in ppo:
                groups.append(map_futures[pos:pos + n])
                pos += n
        else:
            groups = [map_futures]
        reduce_futures, _ = self._submit(
            reduce_function, map_job_id.replace("M", "R"), None, extra_args=extra_args_reduce,
            extra_env=extra_env, runtime_memory=reduce_runtime_memory,
            include_modules=include_modules, exclude_modules=exclude_modules, reduce_of=groups)
        for f in map_futures:
            f._read = True
            f._produce_output = False
        return create_futures_list(map_futures + reduce_futures, self)

    # ------------------------------------------------------------------ waiting

    def wait(self, fs=None, throw_except: bool = True, return_when: int = ALL_COMPLETED,
             download_results: bool = False, timeout: int | None = None,
             threadpool_size: int = THREADPOOL_SIZE, wait_dur_sec: int | None = None,
             show_progressbar: bool = True, clean_jobs: bool | None = None
             ) -> tuple[FuturesList, FuturesList]:
        """``(fs_done, fs_notdone)`` once ``return_when`` of ``fs`` (default: all of this
        executor's futures) have completed; see :func:`dask_lithops.wait`.  ``clean_jobs``
        is accepted (Lithops' temporary job data does not exist here)."""
        check_return_when(return_when)
        check_timeout(timeout)
        futures = fs or self.futures
        if isinstance(futures, ResponseFuture):
            futures = [futures]
        elif not isinstance(futures, (list, FuturesList)):
            futures = list(futures)
        if not futures:
            return create_futures_list([], self), create_futures_list([], self)
        done, not_done = _wait(futures, throw_except=throw_except, return_when=return_when,
                               download_results=download_results, timeout=timeout,
                               threadpool_size=threadpool_size, wait_dur_sec=wait_dur_sec,
                               show_progressbar=show_progressbar, futures_from_executor_wait=fs is None)
        return create_futures_list(done, self), create_futures_list(not_done, self)

    def get_result(self, fs=None, throw_except: bool = True, timeout: int | None = None,
                   threadpool_size: int = THREADPOOL_SIZE, wait_dur_sec: int | None = None,
                   show_progressbar: bool = True):
        """Outputs of ``fs`` (default: the not yet read futures of this executor), in order.

        A single output (after ``call_async``/``map_reduce``) is returned as itself.
        """
        if not fs:  # None or empty: this executor's unread futures, as in Lithops
            fs = [f for f in self.futures if not f._read and not f.futures]
            from_executor = True
        else:
            from_executor = False
        fs_done, _ = self.wait(fs=fs, throw_except=throw_except, timeout=timeout, download_results=True,
                               threadpool_size=threadpool_size, wait_dur_sec=wait_dur_sec,
                               show_progressbar=show_progressbar)
        result = []
        for f in fs_done:
            if f.futures or not f._produce_output:
                continue
            if from_executor and f._read:
                continue
            result.append(f.result(throw_except=throw_except))
            if from_executor:
                f._read = True
        if len(result) == 1 and self.last_call != "map":
            return result[0]
        return result

    # ------------------------------------------------------------------ reports

    def plot(self, fs=None, dst: str | None = None, figsize: tuple = (10, 6)):
        """Timeline and histogram of the calls (``<dst>_timeline.png``, ``<dst>_histogram.png``)."""
        ftrs = self.futures if not fs else fs
        if isinstance(ftrs, ResponseFuture):
            ftrs = [ftrs]
        ftrs = [f for f in ftrs if f.dask_future is not None or f.done]
        _wait(ftrs, throw_except=False, download_results=True, show_progressbar=False)
        to_plot = [f for f in ftrs if (f.success or f.done) and not f.error
                   and "worker_start_tstamp" in f.stats]
        if not to_plot:
            logger.debug("ExecutorID %s - No futures ready to plot", self.executor_id)
            return
        try:
            from dask_lithops.executor.plots import create_histogram, create_timeline
        except ImportError:
            raise ModuleNotFoundError(
                "plot() needs matplotlib: pip install 'dask-lithops[plotting]'") from None
        create_timeline(to_plot, dst, figsize)
        create_histogram(to_plot, dst, figsize)

    def job_summary(self, cloud_objects_n: int = 0) -> str:
        """Append one row per job (calls, mean run time) to a CSV log; returns its path."""
        from dask_lithops.executor.wait import wait as wait_fs

        futures = [f for f in self.futures if f.dask_future is not None]
        wait_fs(futures, throw_except=False, download_results=True, show_progressbar=False)
        if not self.log_path:
            logs = os.path.join(_lithops_temp_dir(), "logs")
            os.makedirs(logs, exist_ok=True)
            self.log_path = os.path.join(logs, datetime.now().strftime("%Y-%m-%d_%H-%M-%S.csv"))
        jobs: dict[str, list] = {}
        for f in futures:
            jobs.setdefault(f.job_id, []).append(f)
        rows, total_calls, weighted = [], 0, 0.0
        for job_id, fs in jobs.items():
            times = [f.stats.get("worker_exec_time", 0.0) for f in fs]
            avg = sum(times) / len(times)
            rows.append([job_id, fs[0].function_name, len(fs), fs[0].runtime_memory or "",
                         round(avg, 10), "", ""])
            total_calls += len(fs)
            weighted += avg * len(fs)
        rows.append(["Summary", " ", total_calls, "", round(weighted / max(total_calls, 1), 10), "",
                     cloud_objects_n])
        with open(self.log_path, "w", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(["Job_ID", "Function", "Invocations", "Memory(MB)", "AvgRuntime", "Cost",
                             "CloudObjects"])
            writer.writerows(rows)
        logger.info("View log file logs at %s", self.log_path)
        return self.log_path

    # ------------------------------------------------------------------ cleaning

    def clean(self, fs=None, cs=None, clean_cloudobjects: bool = True, clean_fn: bool = False,
              force: bool = False, on_exit: bool = False):
        """Release the calls' outputs on the workers, delete ``cs`` cloud objects, and close
        the cluster this executor started (it starts again if the executor is used again)."""
        if cs:
            self.storage.delete_cloudobjects(list(cs))
            if not fs:
                return
        futures = fs or self.futures
        if isinstance(futures, ResponseFuture):
            futures = [futures]
        for f in futures:
            if f.dask_future is not None and (f.done or force):
                f.dask_future.release()
                self.cleaned_jobs.add(f.job_key)
        if fs is None:
            self._close()


def _reduce_call(func, extra_args) -> tuple[str, dict]:
    """The reducer's parameter for the map results, and its call (results left out)."""
    if not callable(func):
        raise TypeError(f"reduce_function must be callable, not {type(func).__name__}")
    marker = object()
    call = verify_args(func, [(marker,)], extra_args)[0]
    param = next((k for k, v in call.items() if v is marker), None)
    if param is None:
        raise TypeError(f"reduce_function {getattr(func, '__name__', func)}{inspect.signature(func)} "
                        "must take the list of map results as its first parameter")
    return param, {**call, param: None}


def _lithops_temp_dir() -> str:
    from dask_lithops.storage.backends.localhost import default_root

    return default_root()


def _load_lithops_config(config, config_file):
    if config is not None:
        if not isinstance(config, Mapping):
            raise dl_config.ConfigError(f"config = {config!r} is invalid; allowed: a Lithops config "
                                        "dict ({'lithops': {...}, '<backend>': {...}}) or None")
        return dict(config)
    if config_file is not None:
        if not os.path.isfile(config_file):
            raise dl_config.ConfigError(f"config_file = {config_file!r} does not exist")
        with open(config_file) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise dl_config.ConfigError(f"config_file {config_file} is not valid YAML: {e}") from None
        if not isinstance(data, Mapping):
            raise dl_config.ConfigError(f"config_file {config_file} must be a mapping of sections")
        return data
    return None


def _lithops_file() -> dict:
    """The Lithops config file in effect, as it is (for its general ``lithops`` section)."""
    path = dl_config.lithops_config_file()
    if not path or not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        return {}  # the cluster's own config resolution reports a broken file
    return data if isinstance(data, Mapping) else {}


def _setup_logging(level) -> None:
    name = str(level).upper()
    if name not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError(f"log_level = {level!r} is invalid; allowed: DEBUG, INFO, WARNING, ERROR, "
                         "CRITICAL, or None")
    log = logging.getLogger("dask_lithops")
    log.setLevel(name)
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(name)s -- %(message)s"))
        log.addHandler(handler)


class LocalhostExecutor(FunctionExecutor):
    """``FunctionExecutor`` in localhost mode (local worker processes, localhost storage)."""

    def __init__(self, config=None, config_file=None, storage=None, monitoring=None, log_level=False,
                 cluster=None, **kwargs):
        super().__init__(mode="localhost", backend="localhost", config=config, config_file=config_file,
                         storage=storage or "localhost", monitoring=monitoring, log_level=log_level,
                         cluster=cluster, **kwargs)


class ServerlessExecutor(FunctionExecutor):
    """``FunctionExecutor`` in serverless mode (function invocations as workers)."""

    def __init__(self, config=None, config_file=None, backend=None, storage=None, monitoring=None,
                 log_level=False, cluster=None, **kwargs):
        super().__init__(mode="serverless", config=config, config_file=config_file, backend=backend,
                         storage=storage, monitoring=monitoring, log_level=log_level, cluster=cluster,
                         **kwargs)


class StandaloneExecutor(FunctionExecutor):
    """``FunctionExecutor`` in standalone mode (SSH hosts or VMs as workers)."""

    def __init__(self, config=None, config_file=None, backend=None, storage=None, monitoring=None,
                 log_level=False, cluster=None, **kwargs):
        super().__init__(mode="standalone", config=config, config_file=config_file, backend=backend,
                         storage=storage, monitoring=monitoring, log_level=log_level, cluster=cluster,
                         **kwargs)


