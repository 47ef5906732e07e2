"""``wait`` and ``get_result`` over ``ResponseFuture`` lists, with Lithops' signatures.

Dask's scheduler tells the client when a call finishes, so nothing is polled: ``wait``
blocks on the futures' Dask states, and downloads finished outputs with one ``gather``
per client (one request for a whole map, not one per call).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time

ALWAYS = 0
ANY_COMPLETED = -1
ALL_COMPLETED = 100

THREADPOOL_SIZE = 64
WAIT_DUR_SEC = 1

logger = logging.getLogger(__name__)


def check_return_when(return_when) -> int:
    if isinstance(return_when, bool) or not isinstance(return_when, int) or not (
            return_when == ANY_COMPLETED or 0 <= return_when <= 100):
        raise ValueError(
            f"return_when = {return_when!r} is invalid; allowed: ALWAYS (0), ANY_COMPLETED (-1), "
            "ALL_COMPLETED (100), or a percentage of completed calls between 0 and 100")
    return return_when


def check_timeout(timeout, name="timeout"):
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError(f"{name} = {timeout!r} is invalid; allowed: a number of seconds > 0, or None")
    return timeout


@contextlib.contextmanager
def _seceded():
    """Inside a Dask task, leave the worker's thread pool while blocking (nested executors)."""
    try:
        from distributed import get_worker

        get_worker()
    except ValueError:
        yield
        return
    from distributed import worker_client

    with worker_client(separate_thread=True):
        yield


def _finished_count(fs, download_results) -> int:
    if download_results:
        return sum(1 for f in fs if f.done)
    return sum(1 for f in fs if f.success or f.done)


def _settle(fs, download_results: bool) -> None:
    """Move every future whose Dask state is final to Lithops' state (downloading outputs)."""
    to_gather: dict = {}
    for f in fs:
        if f.done or f.dask_future is None:
            continue
        status = f.dask_future.status
        if status == "finished":
            if download_results:
                to_gather.setdefault(f.dask_future.client, []).append(f)
            elif not f.success:
                f._set_status_known()
        elif status == "error":
            exc = f.dask_future.exception()
            f._set_error(exc, f.dask_future.traceback())
        elif status == "cancelled":
            from concurrent.futures import CancelledError

            f._set_error(CancelledError(f"call {f.job_key}/{f.call_id} was cancelled"))
    for client, group in to_gather.items():
        outputs = client.gather([f.dask_future for f in group], errors="raise")
        for f, out in zip(group, outputs):
            f._set_output(out)
    if to_gather:
        for f in fs:  # calls that returned futures: their results join the list, as in Lithops
            if f._new_futures and not getattr(f, "_new_futures_listed", False):
                f._new_futures_listed = True
                fs.extend(f._new_futures)


def _block(fs, return_when: int, download_results: bool, deadline: float | None, progress) -> None:
    """Block until ``return_when`` of ``fs`` are final in Dask (or the deadline)."""
    from distributed import as_completed
    from distributed import wait as dask_wait

    pending = [f.dask_future for f in fs
               if f.dask_future is not None and not (f.done or (not download_results and f.success))
               and f.dask_future.status not in ("finished", "error", "cancelled")]
    if not pending:
        return
    total = len(fs)
    final = total - len(pending)
    needed = total if return_when == ALL_COMPLETED else 1 if return_when == ANY_COMPLETED else \
        math.ceil(return_when * total / 100)
    if final >= needed:
        return
    remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
    if progress is None and needed == total:
        dask_wait(pending, timeout=remaining, return_when="ALL_COMPLETED")
    elif progress is None and needed - final == 1:
        dask_wait(pending, timeout=remaining, return_when="FIRST_COMPLETED")
    else:
        for _ in as_completed(pending, timeout=remaining):
            final += 1
            if progress is not None:
                progress.update(1)
            if final >= needed:
                break


def _progress_bar(show, total, done):
    if not show:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    bar = tqdm(bar_format="  {l_bar}{bar}| {n_fmt}/{total_fmt}  ", total=total, initial=done,
               disable=None)
    if bar.disable:
        bar.close()
        return None
    return bar


def wait(fs, internal_storage=None, job_monitor=None, throw_except=True, return_when=ALL_COMPLETED,
         download_results=False, timeout=None, threadpool_size=THREADPOOL_SIZE, wait_dur_sec=None,
         show_progressbar=True, futures_from_executor_wait=False):
    """Wait for ``return_when`` of the futures; return ``(fs_done, fs_notdone)``.

    ``return_when``: ``ALWAYS`` (do not wait), ``ANY_COMPLETED``, ``ALL_COMPLETED`` or a
    percentage.  ``download_results`` also fetches the outputs (else only states).
    ``throw_except`` re-raises the first failed call's exception with its traceback.
    ``timeout`` (seconds): ``TimeoutError`` if the futures are not done by then (they keep
    running and can be waited for again).  ``threadpool_size``, ``wait_dur_sec``,
    ``internal_storage`` and ``job_monitor`` are accepted for compatibility: Dask pushes
    states to the client, there is nothing to poll.
    """
    from dask_lithops.executor.future import FuturesList, ResponseFuture

    return_when = check_return_when(return_when)
    timeout = check_timeout(timeout)
    if not fs:
        return
    if isinstance(fs, ResponseFuture):
        fs = [fs]
    elif not isinstance(fs, (list, FuturesList)):
        fs = list(fs)
    deadline = None if timeout is None else time.monotonic() + timeout

    progress = None
    try:
        if return_when != ALWAYS:
            progress = _progress_bar(show_progressbar, len(fs), _finished_count(fs, download_results))
            try:
                with _seceded():
                    _block(fs, return_when, download_results, deadline, progress)
            except (TimeoutError, asyncio.TimeoutError):  # distinct classes on Python 3.10
                raise TimeoutError(
                    f"Timeout of {timeout} seconds exceeded waiting for function activations to "
                    f"finish ({len(fs) - _finished_count(fs, download_results)} of {len(fs)} not done; "
                    "they keep running: wait again, or raise timeout)") from None
        _settle(fs, download_results)
    finally:
        if progress is not None:
            progress.close()

    if throw_except:
        for f in fs:
            if f.error:
                logger.warning("ExecutorID %s | JobID %s - CallID: %s - There was an exception - %s",
                               f.executor_id, f.job_id, f.call_id, f._exception[0].__name__)
                f._raise()
    if download_results:
        return [f for f in fs if f.done], [f for f in fs if not f.done]
    return [f for f in fs if f.success or f.done], [f for f in fs if not (f.success or f.done)]


def get_result(fs=None, internal_storage=None, throw_except=True, timeout=None,
               threadpool_size=THREADPOOL_SIZE, wait_dur_sec=None, show_progressbar=True):
    """The outputs of the futures, in order (calls that returned ``None`` give none)."""
    from dask_lithops.executor.future import FuturesList, ResponseFuture

    if isinstance(fs, ResponseFuture):
        fs = [fs]
    elif not isinstance(fs, (list, FuturesList)):
        fs = list(fs or [])
    if not fs:
        return []
    fs_done, _ = wait(fs, throw_except=throw_except, timeout=timeout, download_results=True,
                      show_progressbar=show_progressbar)
    return [f.result(throw_except=throw_except) for f in fs_done
            if not f.futures and f._produce_output]


def get_result_with_stats(futures) -> tuple[list, list]:
    """Outputs and stats of futures a function returned (collected on the worker)."""
    fs = list(futures)
    fs_done, _ = wait(fs, throw_except=True, download_results=True, show_progressbar=False)
    done = [f for f in fs_done if not f.futures and f._produce_output]
    return [f.result() for f in done], [f.stats for f in done]
