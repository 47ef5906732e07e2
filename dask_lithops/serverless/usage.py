"""What a serverless cluster's workers cost: per invocation duration, memory, GB-seconds and
vCPU-seconds, at the backend's prices (Lambda bills GB-seconds; Cloud Run functions bill
GiB-seconds and vCPU-seconds; both bill requests)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass


@dataclass
class InvocationUsage:
    name: str
    memory_mb: int
    invoked: float  # epoch seconds the invoke was issued
    request_id: str | None = None
    accepted: float | None = None  # the platform accepted the invoke (202)
    registered: float | None = None  # the worker joined the scheduler
    ended: float | None = None  # exit report received (or the worker left)
    duration: float | None = None  # the function's own measurement, when it reported
    max_rss_bytes: int | None = None
    reason: str | None = None

    def seconds(self, now: float | None = None) -> float:
        if self.duration is not None:
            return self.duration
        end = self.ended or now or time.time()
        return max(0.0, end - self.invoked)

    def gb_seconds(self, now: float | None = None) -> float:
        return self.memory_mb / 1024 * self.seconds(now)


class UsageTracker:
    """Records every worker invocation of one cluster."""

    def __init__(self, price_per_gb_second: float, price_per_request: float = 0.0, *,
                 price_per_vcpu_second: float = 0.0, vcpus: float = 0.0):
        self.price_per_gb_second = price_per_gb_second
        self.price_per_request = price_per_request
        self.price_per_vcpu_second = price_per_vcpu_second
        self.vcpus = vcpus
        self.records: dict[str, InvocationUsage] = {}
        self.created = time.time()
        self._open: set[str] = set()  # not ended yet

    @property
    def running(self) -> int:
        """Invocations not known to have ended."""
        return len(self._open)

    def invoked(self, name: str, memory_mb: int, request_id: str | None = None
                ) -> InvocationUsage:
        r = self.records[name] = InvocationUsage(name=name, memory_mb=memory_mb,
                                                 invoked=time.time(), request_id=request_id)
        self._open.add(name)
        return r

    def forget(self, name: str) -> None:
        """The invoke failed: nothing runs, nothing is billed."""
        self.records.pop(name, None)
        self._open.discard(name)

    def registered(self, name: str) -> None:
        r = self.records.get(name)
        if r is not None and r.registered is None:
            r.registered = time.time()

    def ended(self, name: str, report: dict | None = None) -> None:
        r = self.records.get(name)
        if r is None:
            return
        self._open.discard(name)
        if r.ended is None:
            r.ended = time.time()
        if report:
            if report.get("duration") is not None:
                r.duration = float(report["duration"])
            r.max_rss_bytes = report.get("max_rss_bytes", r.max_rss_bytes)
            r.reason = report.get("reason", r.reason)
            r.request_id = report.get("request_id") or r.request_id

    def report(self) -> dict:
        now = time.time()
        gbs = sum(r.gb_seconds(now) for r in self.records.values())
        seconds = sum(r.seconds(now) for r in self.records.values())
        vcpu_s = seconds * self.vcpus
        n = len(self.records)
        return {
            "invocations": n,
            "running": sum(1 for r in self.records.values() if r.ended is None),
            "gb_seconds": gbs,
            "vcpu_seconds": vcpu_s,
            "seconds": seconds,
            "price_per_gb_second": self.price_per_gb_second,
            "price_per_vcpu_second": self.price_per_vcpu_second,
            "price_per_request": self.price_per_request,
            "estimated_cost_usd": (gbs * self.price_per_gb_second + n * self.price_per_request
                                   + vcpu_s * self.price_per_vcpu_second),
            "workers": [asdict(r) for r in self.records.values()],
        }

    def summary(self) -> str:
        r = self.report()
        vcpu = (f", {r['vcpu_seconds']:.1f} vCPU-s" if self.price_per_vcpu_second else "")
        prices = f"${r['price_per_gb_second']} per GB-s"
        if self.price_per_vcpu_second:
            prices += f", ${r['price_per_vcpu_second']} per vCPU-s"
        return (f"{r['invocations']} worker invocations, {r['seconds']:.1f} s, "
                f"{r['gb_seconds']:.1f} GB-s{vcpu}, estimated cost "
                f"${r['estimated_cost_usd']:.6f} (at {prices})")
