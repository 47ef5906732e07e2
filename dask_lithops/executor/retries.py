"""``RetryingFunctionExecutor``: re-run calls that raised, as ``lithops.retries`` does."""

from __future__ import annotations

from typing import Any

from dask_lithops.executor.wait import ALL_COMPLETED, ALWAYS, ANY_COMPLETED, THREADPOOL_SIZE, WAIT_DUR_SEC


class RetryingFuture:
    """A ``ResponseFuture`` plus what it takes to submit its call again."""

    def __init__(self, response_future, map_function, input, retries: int | None = None, **kwargs):
        self.response_future = response_future
        self.map_function = map_function
        self.input = input
        self.retries = retries or 0
        self.map_kwargs = kwargs
        self.failure_count = 0
        self.cancelled = False

    def _inc_failure_count(self):
        self.failure_count += 1

    def _should_retry(self):
        return not self.cancelled and self.failure_count <= self.retries

    def _retry(self, function_executor):
        self.response_future = function_executor.map(self.map_function, [self.input],
                                                     **self.map_kwargs)[0]

    def cancel(self):
        """No more retries (a running call is not stopped)."""
        self.cancelled = True

    @property
    def done(self):
        return self.response_future.done

    @property
    def error(self):
        return self.response_future.error

    @property
    def _exception(self):
        return self.response_future._exception

    @property
    def stats(self):
        return self.response_future.stats

    def status(self, throw_except=True, internal_storage=None, check_only=False):
        stat = self.response_future.status(throw_except=throw_except, internal_storage=internal_storage,
                                           check_only=check_only)
        if self.response_future.error and throw_except:
            self.response_future._raise()
        return stat

    def result(self, throw_except=True, internal_storage=None):
        res = self.response_future.result(throw_except=throw_except, internal_storage=internal_storage)
        if self.response_future.error and throw_except:
            self.response_future._raise()
        return res


class RetryingFunctionExecutor:
    """Wraps a ``FunctionExecutor``; ``map(..., retries=N)`` re-runs each failed call up to N times.

    Calls lost with a worker are already re-run by Dask; these retries are for calls whose
    function raised (``lithops.retries`` in the config gives the default).
    """

    def __init__(self, executor):
        self.executor = executor
        self.config = executor.config

    def __enter__(self):
        self.executor.__enter__()
        return self

    def __exit__(self, exc_type, exc_value, traceback):
        self.executor.__exit__(exc_type, exc_value, traceback)

    def map(self, map_function, map_iterdata, chunksize=None, extra_args=None, extra_env=None,
            runtime_memory=None, obj_chunk_size=None, obj_chunk_number=None, obj_newline="\n",
            timeout=None, include_modules=[], exclude_modules=[], retries=None):  # noqa: B006
        retries = retries if retries is not None else self.config.get("lithops", {}).get("retries", 0)
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries = {retries!r} is invalid; allowed: an integer >= 0")
        inputs = list(map_iterdata) if not isinstance(map_iterdata, list) else map_iterdata
        kwargs = dict(chunksize=chunksize, extra_args=extra_args, extra_env=extra_env,
                      runtime_memory=runtime_memory, obj_chunk_size=obj_chunk_size,
                      obj_chunk_number=obj_chunk_number, obj_newline=obj_newline, timeout=timeout,
                      include_modules=include_modules, exclude_modules=exclude_modules)
        futures = self.executor.map(map_function, inputs, **kwargs)
        return [RetryingFuture(f, map_function=map_function, input=i, retries=retries, **kwargs)
                for i, f in zip(inputs, futures)]

    def wait(self, fs, throw_except=True, return_when: Any = ALL_COMPLETED, download_results=False,
             timeout=None, threadpool_size=THREADPOOL_SIZE, wait_dur_sec=WAIT_DUR_SEC,
             show_progressbar=True):
        """Wait like ``FunctionExecutor.wait``, re-submitting failed calls that have retries
        left; with ``throw_except`` the error of a call out of retries is raised."""
        lookup = {id(f.response_future): f for f in fs}
        final, active = [], list(fs)
        while True:
            done, pending = self.executor.wait(
                [f.response_future for f in active], throw_except=False, return_when=return_when,
                download_results=download_results, timeout=timeout, threadpool_size=threadpool_size,
                wait_dur_sec=wait_dur_sec, show_progressbar=show_progressbar)
            active = [lookup[id(rf)] for rf in pending]
            for rf in done:
                f = lookup[id(rf)]
                if rf.error:
                    f._inc_failure_count()
                    if f._should_retry():
                        f._retry(self.executor)
                        lookup[id(f.response_future)] = f
                        active.append(f)
                        continue
                final.append(f)
            if return_when == ALWAYS or not active:
                break
            if return_when == ANY_COMPLETED and final:
                break
            if return_when != ALL_COMPLETED and final and len(final) * 100 >= return_when * len(fs):
                break
        if throw_except:
            for f in final:
                if f.error:
                    f.response_future._raise()
        order = {id(f): i for i, f in enumerate(fs)}
        return (sorted(final, key=lambda f: order[id(f)]), sorted(active, key=lambda f: order[id(f)]))

    def clean(self, fs=None, cs=None, clean_cloudobjects=True, clean_fn=False, force=False):
        fs = [f.response_future if isinstance(f, RetryingFuture) else f for f in fs] if fs else fs
        self.executor.clean(fs, cs, clean_cloudobjects, clean_fn, force)

