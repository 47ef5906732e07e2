"""Why workers die, in plain words, and what the cluster does about it.

Three parts, used by every mode:

* :class:`WorkerFailure`: one lost worker's reason (kind, message, fix), built by
  :func:`describe` from the raw reports that reach the scheduler (the worker's own
  exit report, its nanny's, a launcher's: process exit code, Lambda's
  ``Runtime.OutOfMemory``, ...).
* :class:`FailureMonitor`: a scheduler plugin (registered over the scheduler's RPC,
  so it works when the scheduler runs elsewhere) that collects those reports, counts
  finished tasks (progress) and, when the cluster gives up, fails the computations
  waiting for workers with :class:`WorkerFailureError` instead of leaving them queued.
* :class:`WorkerFailureError`: what the client's ``compute()``/``result()`` raises then.
* :class:`TaskKilledWorkersError`: dask's ``KilledWorker`` (a task on which
  ``distributed.scheduler.allowed-failures`` workers died) with the reason they died;
  :class:`LithopsScheduler` raises it instead of the bare one.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import asdict, dataclass, field

from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.protocol.pickle import dumps
from distributed.scheduler import KilledWorker

logger = logging.getLogger(__name__)

PLUGIN_NAME = "dask-lithops-failures"
EXIT_REPORT_OP = "dask_lithops_worker_exit"  # a worker, nanny or launcher posts why it ended
REPORTS_OP = "dask_lithops_worker_reports"  # the cluster reads them (and the progress count)
FAIL_WAITING_OP = "dask_lithops_fail_waiting"  # the cluster gives up: fail what waits for workers

REASON_WAIT = 2.0  # s a task's KilledWorker waits for the report of why its last worker died

# Report kinds that are not failures: the worker ended as planned.
PLANNED = frozenset({"lifetime", "stopped", "retired", "scheduler-lost", "expired",
                     "scheduler-unreachable"})


# how much a report kind says: a later, vaguer report does not replace a recent precise one
_RANK = {"missing-module": 3, "missing-library": 3, "deserialization": 3, "out-of-memory": 3,
         "timeout": 3, "signal": 2, "exit": 2, "error": 2, "finished": 1}


class WorkerFailureError(RuntimeError):
    """Workers keep dying (the crash-loop limit was reached): the reason and the fix."""


class TaskKilledWorkersError(KilledWorker, WorkerFailureError):
    """A task killed every worker it ran on: dask's ``KilledWorker``, with why they died.

    Both ``except KilledWorker`` and ``except WorkerFailureError`` catch it; ``reason``
    is the plain-words cause and fix, ``kind`` its kind (``out-of-memory``, ...).
    """

    def __init__(self, task, last_worker, allowed_failures: int, reason: str = "",
                 kind: str = "lost"):
        Exception.__init__(self, task, last_worker, allowed_failures, reason, kind)

    @property
    def reason(self) -> str:
        return self.args[3]

    @property
    def kind(self) -> str:
        return self.args[4]

    def __str__(self) -> str:
        return (f"Attempted to run task {self.task!r} on {self.allowed_failures + 1} different "
                f"workers (distributed.scheduler.allowed-failures={self.allowed_failures}), but "
                f"all those workers died while running it: {self.reason}")


@dataclass
class WorkerFailure:
    """One worker that ended unexpectedly, and why."""

    name: str
    kind: str  # out-of-memory | timeout | missing-module | deserialization | signal | exit | error | lost
    message: str
    fix: str | None = None
    time: float = field(default_factory=time.time)
    detail: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.message}. Fix: {self.fix}" if self.fix else self.message

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def cause(self) -> tuple:
        """What makes two failures the same (logged once).

        How the process ended counts only where it is all there is to say: a memory kill
        may come with the nanny's SIGTERM exit report merged in, or without it."""
        if self.kind in ("signal", "exit"):
            return (self.kind, self.detail.get("exitcode") or self.detail.get("signal"))
        return (self.kind, self.detail.get("module") or self.detail.get("library"))


# ---------------------------------------------------------------------- reports -> words

_NO_MODULE = re.compile(r"No module named '([^']+)'")
_NO_LIBRARY = re.compile(r"(lib[\w.+-]+\.so[\w.]*): cannot open shared object file")


def classify_exception(exc: BaseException) -> dict | None:
    """The report of an exception that stops a worker from running user code, or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, ImportError):
            m = _NO_LIBRARY.search(str(exc))
            if m:
                return {"kind": "missing-library", "library": m.group(1), "error": text}
            module = getattr(exc, "name", None)
            m = _NO_MODULE.search(str(exc))
            if m or module:
                return {"kind": "missing-module", "module": module or m.group(1), "error": text}
            return {"kind": "deserialization", "error": text}
        if isinstance(exc, (AttributeError, TypeError)) and "Can't get attribute" in str(exc):
            return {"kind": "deserialization", "error": text}
        exc = exc.__cause__ or exc.__context__
    return None


def _signal_name(sig: int) -> str:
    import signal

    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _fmt_bytes(n) -> str:
    from dask.utils import format_bytes

    try:
        return format_bytes(int(n))
    except (TypeError, ValueError):
        return str(n)


def describe(name: str, report: dict | None, mode: str = "", limits: dict | None = None
             ) -> WorkerFailure:
    """Plain words for a raw report (``None``: the worker left without saying why).

    ``limits`` holds what the fix may mention for this mode: ``memory_option``
    (e.g. ``runtime_memory``), ``max_memory``, ``timeout``, ``max_timeout``.
    """
    report = dict(report or {})
    limits = limits or {}
    kind = report.get("kind") or "lost"
    who = f"worker {name}"
    detail = {k: v for k, v in report.items() if k not in ("name", "kind")}
    if kind == "missing-module":
        module = report.get("module") or "?"
        top = module.split(".")[0]
        where = client_module_origin(top)
        if where["local"]:
            msg = (f"{who} cannot run the computation: module {module!r} is a local file of "
                   f"the client ({where['path']}), not in the workers' runtime")
            fix = (f"client.upload_file({where['path']!r}) after creating the Client (for a "
                   "package directory, upload a zip of it), or install it as a package; "
                   "modules under the working directory or the script's directory are "
                   "shipped automatically while lithops.runtime.local_code is true")
        else:
            dist = where["distribution"] or top
            msg = (f"{who} cannot run the computation: module {module!r} is not installed in "
                   f"the workers' runtime ({report.get('error', 'ModuleNotFoundError')})")
            fix = _missing_fix(mode, f"{dist!r}", f'extra_packages=["{dist}"]')
        detail["distribution"] = where["distribution"]
        return WorkerFailure(name, kind, msg, fix, detail=detail)
    if kind == "missing-library":
        lib = report.get("library") or "?"
        msg = (f"{who} cannot run the computation: shared library {lib} is missing in the "
               f"workers' runtime ({report.get('error', '')})")
        fix = ("install the system package that provides it on the hosts, or use a wheel "
               "that bundles it (manylinux)")
        return WorkerFailure(name, kind, msg, fix, detail=detail)
    if kind == "deserialization":
        msg = f"{who} could not load a task: {report.get('error', '')}"
        fix = ("make the workers' runtime match the client's (same packages and local modules; "
               "client.upload_file for a module of your own)")
        return WorkerFailure(name, kind, msg, fix, detail=detail)
    if kind == "out-of-memory":
        limit = report.get("limit")
        size = f" of {_fmt_bytes(limit)}" if limit else ""
        msg = f"{who} ran out of memory: a task needed more than its memory limit{size}"
        option = limits.get("memory_option", "memory_limit")
        most = f" (up to {limits['max_memory']})" if limits.get("max_memory") else ""
        fix = f"raise {option}{most}, or split the work into smaller tasks (smaller chunks/partitions)"
        return WorkerFailure(name, kind, msg, fix, detail=detail)
    if kind == "timeout":
        timeout = report.get("timeout") or limits.get("timeout")
        msg = (f"{who}: a task ran longer than a worker's lifetime"
               + (f" (function timeout {timeout}s)" if timeout else "")
               + f"{' ' + report['error'] if report.get('error') else ''}")
        most = (f" up to the backend's limit of {limits['max_timeout']}s"
                if limits.get("max_timeout") else " up to the backend's limit")
        fix = (f"raise runtime_timeout{most}, split the task into shorter ones, or use "
               "StandaloneCluster (no time limit)")
        return WorkerFailure(name, kind, msg, fix, detail=detail)
    if kind == "signal":
        sig = int(report.get("signal") or 0)
        msg = f"{who} was killed by {_signal_name(sig)}"
        fix = ("SIGKILL usually means the operating system's out-of-memory killer: give workers "
               "more memory or use smaller tasks" if sig == 9 else
               "see the worker's log (cluster.get_logs())")
        return WorkerFailure(name, kind, msg, fix, detail=detail)
    if kind == "exit":
        code = report.get("exitcode")
        msg = f"{who} exited with code {code}" + (f": {report['error']}" if report.get("error")
                                                  else "")
        return WorkerFailure(name, kind, msg, "see the worker's log (cluster.get_logs())",
                             detail=detail)
    if kind == "error":
        msg = f"{who} failed: {report.get('error', '')}"
        return WorkerFailure(name, kind, msg, "see the worker's log (cluster.get_logs())",
                             detail=detail)
    if kind == "finished":
        msg = f"{who} closed itself" + (f" ({report['error']})" if report.get("error") else "")
        return WorkerFailure(name, kind, msg, "see the worker's log (cluster.get_logs())",
                             detail=detail)
    if mode == "serverless":
        msg = f"{who}'s invocation ended without a report" + (
            f" ({report['error']})" if report.get("error") else "")
        return WorkerFailure(name, "lost", msg, (
            "see the function's logs; a function worker that ends without a word was usually "
            "killed by its platform for memory (raise runtime_memory, or use smaller tasks: a "
            "single allocation past the limit leaves no time to report) or time"),
            detail=detail)
    msg = f"{who} left the cluster without saying why" + (
        f" ({report['error']})" if report.get("error") else "")
    return WorkerFailure(name, "lost", msg, "see the worker's log (cluster.get_logs())",
                         detail=detail)


def client_module_origin(top: str) -> dict:
    """Where the client imports ``top`` from: an installed distribution, or a local file."""
    import importlib.metadata
    import importlib.util
    import sys

    out = {"local": False, "path": None, "distribution": None}
    try:
        dists = importlib.metadata.packages_distributions().get(top) or []
    except Exception:
        dists = []
    if dists:
        out["distribution"] = dists[0]
        return out
    module = sys.modules.get(top)
    try:
        spec = module.__spec__ if module is not None else importlib.util.find_spec(top)
    except (ImportError, ValueError, AttributeError):
        spec = None
    origin = getattr(spec, "origin", None)
    if origin and origin not in ("built-in", "frozen") and "site-packages" not in origin:
        out["local"] = True
        out["path"] = origin[:-len("/__init__.py")] if origin.endswith("/__init__.py") else origin
    return out


def _missing_fix(mode: str, package: str, extra: str) -> str:
    if mode == "serverless":
        return (f"add it to the function's runtime: {extra} (or lithops.runtime.package_sync, "
                "which ships the client's versions of dask's optional dependencies)")
    if mode == "standalone":
        return (f"lithops.runtime.package_sync=True (the hosts' runtime venv gets the "
                f"client's environment, {package} included), or install {package} in the "
                "Python the hosts run workers with (remote_python)")
    return (f"install {package} in the Python that runs the workers (lithops.localhost.runtime), "
            "or for a module of your own, client.upload_file(...)")


# ---------------------------------------------------------------------- scheduler side


class FailureMonitor(SchedulerPlugin):
    """Scheduler plugin: collects exit reports, counts progress, fails waiting tasks on demand.

    Installed by the cluster through ``register_scheduler_plugin`` so that it runs
    wherever the scheduler runs; the cluster talks to it through three RPC handlers.
    """

    name = PLUGIN_NAME

    def __init__(self, max_reports: int = 1000, mode: str = "", limits: dict | None = None):
        self.max_reports = max_reports
        self.mode = mode  # what describe() needs for the fix a KilledWorker names
        self.limits = limits or {}
        self.events: dict[str, list[dict]] = {}  # worker name -> its reports, oldest first
        self.seq = 0
        self.completed = 0  # tasks that reached memory: the cluster's measure of progress
        self.given_up: str | None = None  # message waiting tasks fail with
        self.scheduler = None
        self.joined: dict[str, float] = {}  # worker address -> when it joined
        # task key -> (name, joined, died) of the workers that died running it
        self.task_deaths: dict = {}
        self._removing: set[str] = set()

    async def start(self, scheduler) -> None:
        self.scheduler = scheduler
        scheduler.handlers[EXIT_REPORT_OP] = self.on_report
        scheduler.handlers[REPORTS_OP] = self.get_reports
        scheduler.handlers[FAIL_WAITING_OP] = self.fail_waiting

    # ---- hooks

    def add_worker(self, scheduler, worker: str) -> None:
        self.given_up = None  # a worker is back: let computations wait for it again
        self.joined[worker] = time.time()

    def remove_worker(self, scheduler, worker: str, **kwargs) -> None:
        self.joined.pop(worker, None)

    def transition(self, key, start: str, finish: str, *args, **kwargs) -> None:
        if finish in ("memory", "erred", "forgotten"):
            self.task_deaths.pop(key, None)
        if finish == "memory":
            self.completed += 1
        elif finish == "no-worker" and self.given_up is not None:
            # cannot transition from inside a transition: right after it
            self.scheduler.loop.add_callback(self._fail, [key], self.given_up)

    # ---- RPC handlers

    def on_report(self, report: dict | None = None, **kwargs) -> None:
        if report and report.get("name"):
            self._store(report)

    def get_reports(self, names: list | None = None, since: int = 0, **kwargs) -> dict:
        """Reports (with ``seq`` > ``since``) about the named workers, and the progress count."""
        names = list(self.events) if names is None else names
        return {"reports": {n: [e for e in self.events.get(n, ()) if e["seq"] > since]
                            for n in names if n in self.events},
                "completed": self.completed}

    def fail_waiting(self, message: str | None = None, keys: list | None = None,
                     **kwargs) -> int:
        """Fail tasks waiting for a worker, or the given keys (waiting or processing),
        with ``message``."""
        if keys is None:
            self.given_up = message
            keys = [ts.key for ts in self.scheduler.unrunnable]
            if not self.scheduler.running:
                keys += [ts.key for ts in self.scheduler.queued]
        return self._fail(keys, message)

    # ---- tasks that kill their workers

    async def fail_tasks_killing(self, address: str, stimulus_id: str) -> None:
        """Worker ``address`` died unexpectedly: fail the tasks on it that have now killed
        ``allowed-failures`` + 1 workers with a :class:`TaskKilledWorkersError` naming why.

        Runs just before ``Scheduler.remove_worker``, which would fail them with a bare
        ``KilledWorker`` (see :class:`dask_lithops.scheduler.LithopsScheduler`)."""
        s = self.scheduler
        ws = s.workers.get(address)
        if ws is None or address in self._removing:
            return
        name, now = str(ws.name), time.time()
        joined = self.joined.get(address, 0.0)
        for ts in ws.processing:
            deaths = self.task_deaths.setdefault(ts.key, [])
            deaths.append((name, joined, now))
            del deaths[:-20]
        while len(self.task_deaths) > 10 * self.max_reports:
            self.task_deaths.pop(next(iter(self.task_deaths)))
        poison = [ts for ts in ws.processing if ts.suspicious + 1 > s.allowed_failures]
        if not poison:
            return
        self._removing.add(address)
        try:
            reason = self._reason_since(name, joined)
            if reason is None and not any(self._earlier_reason(ts.key) for ts in poison):
                # the report of this death may be on its way (a nanny posts it once the
                # process has exited): wait for it briefly, the client waits for the error
                deadline = time.monotonic() + REASON_WAIT
                while reason is None and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                    reason = self._reason_since(name, joined)
            recs: dict = {}
            for ts in poison:
                if ts.processing_on is not ws or s.workers.get(address) is not ws:
                    continue  # finished or moved while we waited
                who, report = (name, reason) if reason is not None else \
                    (self._earlier_reason(ts.key) or (name, None))
                failure = describe(who, report, mode=self.mode, limits=self.limits)
                ts.suspicious += 1
                ts.prefix.suspicious += 1
                exc = TaskKilledWorkersError(ts.key, ws.clean(), s.allowed_failures,
                                             str(failure), failure.kind)
                recs.update(s.transition(ts.key, "erred", exception=dumps(exc), cause=ts.key,
                                         exception_text=str(exc), stimulus_id=stimulus_id,
                                         worker=address))
                # distributed's own line: the reason is logged once, by the cluster
                logger.error("Task %s marked as failed because %d workers died while trying "
                             "to run it", ts.key, ts.suspicious)
            if recs:
                s.transitions(recs, stimulus_id=stimulus_id)
        finally:
            self._removing.discard(address)

    def _reason_since(self, name: str, since: float) -> dict | None:
        """The latest report of an unplanned end of worker ``name`` received after ``since``."""
        for event in reversed(self.events.get(name, ())):
            if event["received"] < since:
                return None
            if event.get("kind") not in PLANNED:
                return event
        return None

    def _earlier_reason(self, key) -> tuple[str, dict] | None:
        """(name, report) of the latest earlier death of a worker running ``key`` that
        reported its reason."""
        for name, joined, _died in reversed(self.task_deaths.get(key, ())[:-1]):
            report = self._reason_since(name, joined)
            if report is not None:
                return name, report
        return None

    # ---- internals

    def _store(self, report: dict) -> None:
        """Keep ``report`` as an event; a vaguer report right after a precise one about the
        same end (the process then exits: signal, exit code, "finished") completes it."""
        name = str(report["name"])
        events = self.events.setdefault(name, [])
        now = time.time()
        last = events[-1] if events else None
        if last is not None and now - last["received"] < 30 and \
                _RANK.get(last.get("kind"), 0) > _RANK.get(report.get("kind"), 0):
            last.update({k: v for k, v in report.items() if k not in last})
            return
        if last is not None and now - last["received"] < 5 and last.get("final") and \
                _RANK.get(last.get("kind"), 0) <= 1 < _RANK.get(report.get("kind"), 0):
            last.update(report)  # the precise reason of an end just reported vaguely
            return
        self.seq += 1
        events.append({**report, "received": now, "seq": self.seq})
        del events[:-20]
        while len(self.events) > self.max_reports:
            self.events.pop(next(iter(self.events)))

    def _fail(self, keys, message: str) -> int:
        s = self.scheduler
        exc = dumps(WorkerFailureError(message))
        stimulus_id = f"dask-lithops-give-up-{time.time()}"
        recs = {}
        for key in keys:
            ts = s.tasks.get(key)
            if ts is None or ts.state not in ("no-worker", "queued", "processing"):
                continue
            extra = {}
            if ts.state == "processing":  # e.g. it outlived its worker's lifetime
                extra["worker"] = ts.processing_on.address
            recs.update(s.transition(key, "erred", exception=exc, cause=key,
                                     exception_text=message, stimulus_id=stimulus_id, **extra))
        if recs:
            s.transitions(recs, stimulus_id=stimulus_id)
        n = sum(1 for k in keys if getattr(s.tasks.get(k), "state", None) == "erred")
        if n:
            logger.info("failed %d tasks waiting for workers: %s", n, message)
        return n
