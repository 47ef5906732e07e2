"""The client side of the keeper (:mod:`dask_lithops.standalone.keeper`): heartbeats over SSH.

While a cluster lives it rewrites ``~/.dask-lithops/keeper/heartbeat`` on each
of its VMs over a dedicated SSH connection, every ``soft_dismantle_timeout / 5``
seconds (0.5 s .. 30 s).  The file carries the current cluster's timeouts, so a
reused VM obeys the cluster using it now.  A keeper whose heartbeat goes stale
dismantles its VM.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

logger = logging.getLogger(__name__)

HEARTBEAT = '"$HOME/.dask-lithops/keeper/heartbeat"'
HEARTBEAT_CMD = (f'mkdir -p "$HOME/.dask-lithops/keeper" && cat > {HEARTBEAT[:-1]}.tmp" && '
                 f'mv -f {HEARTBEAT[:-1]}.tmp" {HEARTBEAT}')


class Heartbeat:
    """Heartbeats to a set of VMs (``id -> SSHConnection``) from one thread (blocking API).

    ``reconnect(id)`` opens a new connection when one dropped.
    """

    def __init__(self, cluster_id: str, soft: float, hard: float, delete_on_dismantle: bool,
                 reconnect: Callable[[str], object]):
        self.cluster_id = cluster_id
        self.soft, self.hard = float(soft), float(hard)
        self.delete_on_dismantle = delete_on_dismantle
        self.reconnect = reconnect
        self.conns: dict[str, object] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def interval(self) -> float:
        return max(0.5, min(30.0, self.soft / 5))

    def payload(self) -> str:
        return json.dumps({"cluster": self.cluster_id, "time": time.time(),
                           "soft_dismantle_timeout": self.soft,
                           "hard_dismantle_timeout": self.hard,
                           "delete_on_dismantle": self.delete_on_dismantle})

    def beat(self, conn) -> None:
        conn.run(HEARTBEAT_CMD, input=self.payload(), timeout=10)

    def add(self, vm_id: str, conn) -> None:
        """Beat once now (raises if that fails), then keep beating to ``vm_id``."""
        self.beat(conn)
        self.conns[vm_id] = conn

    def remove(self, ids) -> None:
        for i in ids:
            conn = self.conns.pop(i, None)
            if conn is not None:
                _close(conn)

    def start(self) -> None:
        if self._thread is not None:
            return

        def loop():
            with ThreadPoolExecutor(8, thread_name_prefix="dask-lithops-heartbeat") as ex:
                while not self._stop.wait(self.interval):
                    list(ex.map(self._beat_one, list(self.conns.items())))

        self._thread = threading.Thread(target=loop, daemon=True,
                                        name=f"dask-lithops-heartbeat-{self.cluster_id}")
        self._thread.start()

    def _beat_one(self, item) -> None:
        vm_id, conn = item
        try:
            if not conn.is_active():
                conn = self.reconnect(vm_id)
                if vm_id not in self.conns:  # removed meanwhile
                    _close(conn)
                    return
                self.conns[vm_id] = conn
            self.beat(conn)
        except Exception as e:  # the keeper acts if this persists
            logger.debug("heartbeat to %s failed: %s", vm_id, e)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self.remove(list(self.conns))


def _close(conn) -> None:
    try:
        conn.close()
    except Exception:
        pass
