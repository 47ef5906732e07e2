"""Progress of a cluster's long phases: one console line per phase, with its duration.

Building a runtime, deploying a function, syncing packages to hosts, booting
VMs: each is a :meth:`Progress.phase`.  The console gets a line when a phase
starts and one when it ends (``... done in 12.3 s (45.1 MB)``); a phase with
measurable progress (bytes uploaded, hosts ready) also draws a ``tqdm`` bar
while it runs when the console is a terminal.  Every phase is recorded, so the
cluster's notebook widget (``_repr_html_``) shows them too.

Quiet with ``lithops.cluster.quiet: true`` (or ``quiet=True``), or when the
cluster's ``silence_logs`` asks for errors only.  Phases are also logged to
the ``dask_lithops.progress`` logger at INFO.
"""

from __future__ import annotations

import html
import logging
import sys
import threading
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)


def format_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def format_duration(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{int(s // 60)} min {int(s % 60)} s"


@dataclass
class PhaseRecord:
    title: str
    started: float
    duration: float | None = None  # None while running
    detail: str = ""
    done: float = 0
    total: float | None = None
    unit: str = ""
    failed: bool = False

    def describe(self) -> str:
        if self.duration is None:
            amount = ""
            if self.total:
                amount = f" {_amount(self.done, self.unit)}/{_amount(self.total, self.unit)}"
            return f"{self.title} ...{amount}"
        what = "failed after" if self.failed else "done in"
        extra = f" ({self.detail})" if self.detail else ""
        return f"{self.title}: {what} {format_duration(self.duration)}{extra}"


def _amount(n: float, unit: str) -> str:
    return format_bytes(n) if unit == "B" else f"{n:.0f}{(' ' + unit) if unit else ''}"


class Phase:
    """A running phase: :meth:`advance` its measurable progress, set :attr:`detail`."""

    def __init__(self, progress: Progress, record: PhaseRecord):
        self.progress = progress
        self.record = record
        self._bar = None
        self._lock = threading.Lock()

    @property
    def detail(self) -> str:
        return self.record.detail

    @detail.setter
    def detail(self, text: str) -> None:
        self.record.detail = text

    def set_total(self, total: float | None, unit: str | None = None) -> None:
        self.record.total = total
        if unit is not None:
            self.record.unit = unit
        if total and self._bar is None and self.progress.bars:
            from tqdm import tqdm

            unit = self.record.unit or "it"
            self._bar = tqdm(total=total, desc=f"{self.progress.prefix}{self.record.title}",
                             unit=unit, unit_scale=unit == "B", unit_divisor=1000,
                             file=self.progress.stream, leave=False, dynamic_ncols=True)
            self._bar.update(self.record.done)

    def advance(self, n: float = 1) -> None:
        with self._lock:
            self.record.done += n
            if self._bar is not None:
                self._bar.update(n)

    def __enter__(self) -> Phase:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        rec = self.record
        rec.duration = time.monotonic() - rec.started
        rec.failed = exc_type is not None
        if self._bar is not None:
            self._bar.close()
        self.progress._emit(rec.describe())


class Progress:
    """The phases of one cluster (or one CLI command)."""

    def __init__(self, quiet: bool = False, stream=None, prefix: str = "dask-lithops: "):
        self.quiet = quiet
        self._stream = stream
        self.prefix = prefix
        self.records: list[PhaseRecord] = []
        self._lock = threading.Lock()

    @property
    def stream(self):
        return self._stream or sys.stderr  # looked up late: pytest's capsys swaps it

    @property
    def bars(self) -> bool:
        if self.quiet:
            return False
        try:
            import tqdm  # noqa: F401
        except ImportError:
            return False
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def phase(self, title: str, total: float | None = None, unit: str = "") -> Phase:
        rec = PhaseRecord(title, time.monotonic(), unit=unit)
        with self._lock:
            self.records.append(rec)
        p = Phase(self, rec)
        self._emit(f"{title} ...")
        if total:
            p.set_total(total, unit)
        return p

    def note(self, text: str) -> None:
        """A line of its own (e.g. a cache hit), recorded as a finished zero-length phase."""
        self.records.append(PhaseRecord(text, time.monotonic(), duration=0.0))
        self._emit(text)

    def _emit(self, line: str) -> None:
        logger.info("%s", line)
        if not self.quiet:
            try:
                print(self.prefix + line, file=self.stream, flush=True)
            except (OSError, ValueError):  # a closed stream must not break a cluster
                pass

    def lines(self) -> list[str]:
        return [r.describe() for r in self.records]

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><td style='text-align:left'>{html.escape(r.describe())}</td></tr>"
                       for r in self.records)
        return f"<table><tr><th style='text-align:left'>Start-up phases</th></tr>{rows}</table>"


#: What library code reports into when no cluster gave it a Progress.
SILENT = Progress(quiet=True)


def for_cluster(quiet: bool | None = None, silence_logs=None) -> Progress:
    """The Progress of a new cluster: ``quiet`` (else ``lithops.cluster.quiet``), and quiet
    when ``silence_logs`` asks for errors only."""
    from dask_lithops import config

    if quiet is None:
        quiet = bool(config.get("cluster.quiet"))
    if isinstance(silence_logs, str):
        silence_logs = logging.getLevelName(silence_logs.upper())
    if isinstance(silence_logs, int) and not isinstance(silence_logs, bool) \
            and silence_logs >= logging.ERROR:
        quiet = True
    return Progress(quiet=quiet)
