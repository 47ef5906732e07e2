"""The scheduler every dask-lithops cluster runs: distributed's, with failures explained."""

from __future__ import annotations

import logging

from distributed.core import Status
from distributed.scheduler import Scheduler

from dask_lithops.failures import PLUGIN_NAME, FailureMonitor

logger = logging.getLogger(__name__)


class LithopsScheduler(Scheduler):
    """``distributed.Scheduler`` whose ``KilledWorker`` errors say why the workers died.

    distributed builds a task's ``KilledWorker`` inside ``remove_worker``, before any plugin
    hook runs; the cluster's :class:`~dask_lithops.failures.FailureMonitor` fails such a
    task itself just before, with a
    :class:`~dask_lithops.failures.TaskKilledWorkersError` (a ``KilledWorker``) carrying
    the reason and the fix. Everything else is distributed's.
    """

    async def remove_worker(self, address: str, *, stimulus_id: str, expected: bool = False,
                            close: bool = True):
        monitor = self.plugins.get(PLUGIN_NAME)
        if not expected and isinstance(monitor, FailureMonitor) and self.status != Status.closed:
            try:
                await monitor.fail_tasks_killing(self.coerce_address(address), stimulus_id)
            except Exception:
                logger.exception("explaining the tasks of removed worker %s failed", address)
        return await super().remove_worker(address, stimulus_id=stimulus_id, expected=expected,
                                           close=close)
