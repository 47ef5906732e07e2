"""``FunctionExecutor.plot``: timeline and histogram of calls (needs matplotlib)."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402


def _paths(dst, kind):
    if dst is None:
        return os.path.join(os.getcwd(), f"{kind}.png")
    dst = os.path.expanduser(dst)
    if os.path.isdir(dst):
        return os.path.join(dst, f"{kind}.png")
    base = dst[:-4] if dst.endswith(".png") else dst
    return f"{base}_{kind}.png"


def create_timeline(fs, dst, figsize=(10, 6)):
    stats = [f.stats for f in fs]
    t0 = min(s["host_job_create_tstamp"] for s in stats)
    fields = [("host submit", "host_submit_tstamp"), ("function start", "worker_func_start_tstamp"),
              ("function done", "worker_func_end_tstamp"), ("status fetched", "host_status_done_tstamp"),
              ("results fetched", "host_result_done_tstamp")]
    fig, ax = plt.subplots(figsize=figsize)
    y = list(range(len(stats)))
    for label, key in fields:
        xs = [s[key] - t0 for s in stats if key in s]
        if xs:
            ax.scatter(xs, y[:len(xs)], s=8, label=label)
    ax.set_xlabel("Execution Time (sec)")
    ax.set_ylabel("Function Call")
    ax.legend(loc="lower right")
    ax.set_title("Execution timeline")
    path = _paths(dst, "timeline")
    fig.savefig(path)
    plt.close(fig)
    return path


def create_histogram(fs, dst, figsize=(10, 6)):
    stats = [f.stats for f in fs]
    t0 = min(s["host_job_create_tstamp"] for s in stats)
    segments = [[[s["worker_start_tstamp"] - t0, i], [s["worker_end_tstamp"] - t0, i]]
                for i, s in enumerate(stats)]
    fig, ax = plt.subplots(figsize=figsize)
    ax.add_collection(LineCollection(segments, linewidths=2))
    end = max(s["worker_end_tstamp"] - t0 for s in stats)
    ax.set_xlim(0, end * 1.1 + 1e-3)
    ax.set_ylim(-1, len(stats))
    ax.set_xlabel("Execution Time (sec)")
    ax.set_ylabel("Function Call")
    ax.set_title("Calls running over time")
    path = _paths(dst, "histogram")
    fig.savefig(path)
    plt.close(fig)
    return path
