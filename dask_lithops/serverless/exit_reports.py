"""Workers' exit reports kept on a scheduler that runs on another host.

A worker invocation posts its exit report to the scheduler (``EXIT_REPORT_OP``,
see :mod:`dask_lithops.serverless.handler`).  With the scheduler in the
client's process the cluster handles it directly; with the scheduler on its own
host (``scheduler="aws_ec2"``/``"ssh"``) this plugin, registered there by the
cluster, keeps the reports until the cluster collects them
(``TAKE_OP``, polled over the cluster's scheduler connection).
"""

from __future__ import annotations

from distributed.diagnostics.plugin import SchedulerPlugin

from dask_lithops.serverless.handler import EXIT_REPORT_OP

TAKE_OP = "dask_lithops_take_exit_reports"
MAX_KEPT = 10_000  # a cluster that stopped collecting must not grow the scheduler forever


class ExitReports(SchedulerPlugin):
    name = "dask-lithops-exit-reports"

    def __init__(self):
        self.reports: list[dict] = []

    async def start(self, scheduler) -> None:
        scheduler.handlers[EXIT_REPORT_OP] = self.receive
        scheduler.handlers[TAKE_OP] = self.take

    def receive(self, report: dict | None = None, **kwargs) -> None:
        if isinstance(report, dict) and report.get("name"):
            self.reports = self.reports[-(MAX_KEPT - 1):] + [report]

    def take(self, **kwargs) -> list[dict]:
        out, self.reports = self.reports, []
        return out
