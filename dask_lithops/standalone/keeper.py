"""The dismantle keeper: runs on every VM dask-lithops creates, dismantles it when orphaned.

    python3 keeper.py --config /etc/dask-lithops/keeper.json --dismantle dismantle.py [--root DIR]

Standard library only (it starts at boot from the user data, before any
runtime exists on the VM).  Every ``interval`` seconds it reads the heartbeat
file the cluster refreshes over SSH while it lives; it dismantles its own VM
once the heartbeat is older than ``soft_dismantle_timeout`` -- or, with no
heartbeat since this boot, that long after it started -- and always
``hard_dismantle_timeout`` after it started.  So a client killed with SIGKILL
leaves no VM running past the soft timeout.

The heartbeat file (JSON) may override the timeouts and ``delete_on_dismantle``
for the cluster currently using the VM (a reused VM keeps its first user data).

Dismantling is the cloud's call: ``dismantle(config, delete, root)`` of the
backend's module (``--dismantle``, e.g.
:mod:`dask_lithops.standalone.providers.aws_ec2.dismantle`), with the
``cloud`` section of the config; it is retried until it succeeds (a running
orphan is billed).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import time
from collections.abc import Callable

logger = logging.getLogger("dask_lithops.keeper")

DEFAULTS = {"soft_dismantle_timeout": 300.0, "hard_dismantle_timeout": 3600.0,
            "delete_on_dismantle": False, "interval": 1.0, "heartbeat_file": None, "cloud": {}}


def load_dismantle(path: str) -> Callable[[dict, bool, str], str]:
    """``dismantle(config, delete, root)`` of the backend's module file at ``path``."""
    spec = importlib.util.spec_from_file_location("dask_lithops_dismantle", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.dismantle


# -- the keeper --------------------------------------------------------------------------------
class Keeper:
    def __init__(self, cfg: dict, dismantle: Callable[[dict, bool, str], str], root: str = ""):
        self.cfg = {**DEFAULTS, **cfg}
        self.cloud_dismantle = dismantle
        self.root = root
        self.started_wall = time.time()
        self.started = time.monotonic()
        self.last_alive = self.started

    def effective(self) -> dict:
        """Config, overridden by the current cluster's heartbeat file."""
        out = dict(self.cfg)
        hb = self.cfg.get("heartbeat_file")
        if hb:
            try:
                with open(hb) as f:
                    data = json.load(f)
                for k in ("soft_dismantle_timeout", "hard_dismantle_timeout",
                          "delete_on_dismantle"):
                    if k in data:
                        out[k] = data[k]
            except (OSError, ValueError):
                pass
        return out

    def heartbeat_age(self) -> float | None:
        """Seconds since the last heartbeat of this boot (None: none yet)."""
        hb = self.cfg.get("heartbeat_file")
        if not hb:
            return None
        try:
            mtime = os.stat(hb).st_mtime
        except OSError:
            return None
        if mtime < self.started_wall:
            return None  # from before this boot
        return max(0.0, time.time() - mtime)

    def check(self) -> str | None:
        """Why the VM must go now, or None."""
        eff = self.effective()
        now = time.monotonic()
        age = self.heartbeat_age()
        if age is not None:
            self.last_alive = max(self.last_alive, now - age)
        if now - self.started > float(eff["hard_dismantle_timeout"]):
            return f"hard_dismantle_timeout ({eff['hard_dismantle_timeout']}s) reached"
        idle = now - self.last_alive
        if idle > float(eff["soft_dismantle_timeout"]):
            return (f"no cluster heartbeat for {idle:.0f}s "
                    f"(soft_dismantle_timeout {eff['soft_dismantle_timeout']}s)")
        return None

    def dismantle(self, reason: str) -> None:
        delete = bool(self.effective()["delete_on_dismantle"])
        delay = 1.0
        while True:
            try:
                logger.warning("dismantling (%s): %s", "terminate" if delete else "stop", reason)
                done = self.cloud_dismantle(self.cfg["cloud"], delete, self.root)
                logger.warning("%s requested", done)
                return
            except Exception as e:  # keep trying: a running orphan is billed
                logger.error("dismantle failed (retrying in %.0fs): %s", delay, e)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)

    def run(self) -> None:
        eff = self.effective()
        logger.info("keeper started: soft %ss, hard %ss, %s on dismantle",
                    eff["soft_dismantle_timeout"], eff["hard_dismantle_timeout"],
                    "terminate" if eff["delete_on_dismantle"] else "stop")
        while True:
            reason = self.check()
            if reason:
                self.dismantle(reason)
                return
            time.sleep(float(self.cfg["interval"]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dask-lithops keeper")
    parser.add_argument("--config", required=True)
    parser.add_argument("--dismantle", required=True, help="the backend's dismantle module")
    parser.add_argument("--root", default=os.environ.get("DASK_LITHOPS_VM_ROOT", ""))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s keeper %(levelname)s %(message)s")
    with open(args.config) as f:
        cfg = json.load(f)
    Keeper(cfg, load_dismantle(args.dismantle), root=args.root).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
