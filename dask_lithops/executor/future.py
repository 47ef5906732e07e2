"""``ResponseFuture`` and ``FuturesList`` with Lithops' surface, over Dask futures."""

from __future__ import annotations

import time
from types import SimpleNamespace


class ResponseFuture:
    """The result of one Lithops call (``lithops.future.ResponseFuture``'s surface).

    ``result()``, ``status()``, the state properties (``done``, ``success``, ``error``,
    ``ready``, ``running``...), ``stats`` (Lithops' timing keys), ``call_id``,
    ``job_id``, ``executor_id``.  Underneath is a ``distributed.Future`` (``.dask_future``),
    so the call's output stays on the workers until it is asked for, and can feed another
    map without passing through the client.
    """

    class State:
        New = "New"
        Invoked = "Invoked"
        Running = "Running"
        Ready = "Ready"
        Success = "Success"
        Error = "Error"
        Done = "Done"
        Unknown = "Unknown"

    def __init__(self, dask_future, call_id: str, job: SimpleNamespace):
        self.dask_future = dask_future
        self.call_id = call_id
        self.job_id = job.job_id
        self.job_key = job.job_key
        self.executor_id = job.executor_id
        self.function_name = job.function_name
        self.execution_timeout = job.execution_timeout
        self.runtime_name = job.runtime_name
        self.runtime_memory = job.runtime_memory
        self.activation_id = dask_future.key if dask_future is not None else None
        self.stats = dict(job.host_job_meta)
        self.logs = None
        self._produce_output = True
        self._read = False
        self._state = ResponseFuture.State.Invoked if dask_future is not None else ResponseFuture.State.New
        self._exception = None
        self._new_futures = None
        self._call_output = None
        self._call_status = None

    def __repr__(self):
        return (f"<ResponseFuture {self.executor_id}/{self.job_id}/{self.call_id} "
                f"state={self._state}>")

    def __reduce__(self):
        raise TypeError("a ResponseFuture cannot be pickled; pass a FuturesList to map() to chain "
                        "calls, or return futures from a function to have their results collected")

    # ------------------------------------------------------------------ state

    def _sync_state(self) -> None:
        if self._state in (self.State.Invoked, self.State.Running) and self.dask_future is not None:
            status = self.dask_future.status
            if status in ("finished", "error", "cancelled"):
                self._state = self.State.Ready

    @property
    def new(self):
        return self._state == self.State.New

    @property
    def invoked(self):
        self._sync_state()
        return self._state == self.State.Invoked

    @property
    def running(self):
        self._sync_state()
        return self._state == self.State.Running

    @property
    def ready(self):
        self._sync_state()
        return self._state == self.State.Ready

    @property
    def error(self):
        return self._state == self.State.Error

    @property
    def success(self):
        return self._state in (self.State.Success, self.State.Error)

    @property
    def done(self):
        return self._state in (self.State.Done, self.State.Error, self.State.Unknown)

    @property
    def futures(self):
        """True when the call returned futures (their results replace its own)."""
        return self._new_futures is not None

    def cancel(self):
        """Cancel the call (unlike Lithops, Dask can: a queued call never runs)."""
        if self.dask_future is not None and not self.done:
            self.dask_future.cancel()

    def cancelled(self):
        return self.dask_future is not None and self.dask_future.status == "cancelled"

    # ------------------------------------------------------------------ transitions (wait.py)

    def _set_status_known(self) -> None:
        """The call finished; its output is not downloaded yet."""
        self._state = self.State.Success
        self._call_status = {"type": "__end__", "exception": False,
                             "activation_id": self.activation_id}
        self.stats.setdefault("host_status_done_tstamp", time.time())

    def _set_output(self, output) -> None:
        from dask_lithops.executor.runner import CallOutput

        now = time.time()
        self.stats.setdefault("host_status_done_tstamp", now)
        self.stats["host_result_done_tstamp"] = now
        if isinstance(output, CallOutput):
            self.stats.update(output.stats)
            if output.nested is not None:
                _, results, stats = output.nested
                self._new_futures = [_done_future(self, i, r, s)
                                     for i, (r, s) in enumerate(zip(results, stats))]
                self._call_output = self._new_futures
                self._produce_output = False
            else:
                self._call_output = output.value
                if output.value is None:  # as in Lithops: a None result is no output
                    self._produce_output = False
        else:
            self._call_output = output
        self._call_status = {"type": "__end__", "exception": False,
                             "activation_id": self.activation_id}
        self._state = self.State.Done

    def _set_error(self, exc: BaseException, tb=None) -> None:
        self.stats.setdefault("host_status_done_tstamp", time.time())
        self._exception = (type(exc), exc, tb)
        self._call_status = {"type": "__end__", "exception": True,
                             "activation_id": self.activation_id}
        self._state = self.State.Error

    def _raise(self):
        _, exc, tb = self._exception
        raise exc.with_traceback(tb)

    # ------------------------------------------------------------------ public calls

    def status(self, throw_except=True, internal_storage=None, check_only=False, wait_dur_sec=1):
        """Wait for the call to finish (``check_only``: do not wait) and return its status."""
        from dask_lithops.executor.wait import ALL_COMPLETED, wait

        if self._state == self.State.New:
            raise ValueError("task not yet invoked")
        if self.success or self.done:
            if self.error and throw_except:
                self._raise()
            return self._call_status
        if check_only:
            self._sync_state()
            if self._state != self.State.Ready:
                return None
        wait([self], throw_except=throw_except, return_when=ALL_COMPLETED, download_results=False,
             show_progressbar=False)
        return self._call_status

    def result(self, throw_except=True, internal_storage=None, retries=10, wait_dur_sec=1):
        """The call's return value; its exception, with its traceback, if it raised."""
        from dask_lithops.executor.wait import ALL_COMPLETED, wait

        if self._state == self.State.New:
            raise ValueError("Task not yet invoked")
        if not self.done:
            wait([self], throw_except=throw_except, return_when=ALL_COMPLETED, download_results=True,
                 show_progressbar=False)
        if self.error:
            if throw_except:
                self._raise()
            return None
        return self._call_output


def _done_future(parent: ResponseFuture, i: int, value, stats) -> ResponseFuture:
    """A finished future standing for a call a function started (its output already here)."""
    job = SimpleNamespace(job_id=parent.job_id, job_key=parent.job_key,
                          executor_id=parent.executor_id, function_name=parent.function_name,
                          execution_timeout=parent.execution_timeout,
                          runtime_name=parent.runtime_name, runtime_memory=parent.runtime_memory,
                          host_job_meta={k: v for k, v in parent.stats.items() if k.startswith("host_")})
    f = ResponseFuture(None, f"{parent.call_id}-{i:05d}", job)
    f.stats.update(stats or {})
    f._call_output = value
    f._state = ResponseFuture.State.Done
    if value is None:
        f._produce_output = False
    return f


class FuturesList(list):
    """A list of ``ResponseFuture`` that can be waited on, read, or mapped over again."""

    executor = None
    config = None

    def _create_executor(self):
        if not self.executor:
            from dask_lithops.executor.executors import FunctionExecutor

            self.executor = FunctionExecutor(config=self.config)

    def _extend_futures(self, fs):
        for fut in self:
            fut._produce_output = False
        if not hasattr(self, "alt_list"):
            self.alt_list = list(self)
        self.alt_list.extend(fs)
        self.clear()
        self.extend(fs)

    def map(self, map_function, sync=False, **kwargs):
        self._create_executor()
        if sync:
            self.executor.wait(self)
        fs = self.executor.map(map_function, self, **kwargs)
        self._extend_futures(fs)
        return self

    def map_reduce(self, map_function, reduce_function, sync=False, **kwargs):
        self._create_executor()
        if sync:
            self.executor.wait(self)
        fs = self.executor.map_reduce(map_function, self, reduce_function, **kwargs)
        self._extend_futures(fs)
        return self

    def wait(self, **kwargs):
        self._create_executor()
        return self.executor.wait(getattr(self, "alt_list", self), **kwargs)

    def get_result(self, **kwargs):
        self._create_executor()
        return self.executor.get_result(getattr(self, "alt_list", self), **kwargs)

    def __reduce__(self):
        raise TypeError("a FuturesList cannot be pickled")


def create_futures_list(futures, executor) -> FuturesList:
    fl = FuturesList(futures)
    fl.config = executor.config
    fl.executor = executor
    return fl
