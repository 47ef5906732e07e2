"""What a StandaloneCluster backend provides: hosts ready for SSH.

:class:`~dask_lithops.standalone.cluster.StandaloneCluster` does everything
that happens on a host once it answers SSH (runtime, scheduler, worker groups,
logs, stopping).  A backend only gets hosts and gives them back:

* ``ssh``: the hosts it was given (:class:`~.ssh.SSHProvider`);
* ``aws_ec2``: VMs it creates, reuses or consumes, and terminates or stops
  (:class:`~.aws_ec2.EC2Provider`).

A backend is a :class:`HostProvider` subclass registered in :data:`BACKENDS`.
Its own vocabulary (EC2's create/start/stop/terminate/list) stays inside it.
"""

from __future__ import annotations

from typing import ClassVar

from dask_lithops import config
from dask_lithops.standalone.ssh_transport import HostSpec

__all__ = ["HostProvider", "HostSpec", "BACKENDS", "provider_class"]


class HostProvider:
    """Gets hosts for a StandaloneCluster and gives them back.

    A backend sets the class attributes, builds itself from keywords in
    :meth:`from_keywords` (validating everything, no I/O: bad input fails
    before anything is created or billed) and implements :meth:`acquire`,
    :meth:`release`, :meth:`close` and :meth:`summary`.  The async methods
    must not block the loop (``asyncio.to_thread`` for blocking SDKs).
    """

    name: ClassVar[str] = ""                 # the backend= value
    name_prefix: ClassVar[str] = "host"      # spec keys and worker names: "<prefix>-<i>-<k>"
    keywords: ClassVar[tuple[str, ...]] = ()  # StandaloneCluster keywords this backend takes

    initial: int = 0      # hosts acquired at start
    maximum: int = 0      # most hosts held at once; scale() acquires more up to this
    worker_processes: int | str | None = None  # per host (None: lithops.standalone.worker_processes)
    cluster_id: str = ""  # set by the cluster before the first acquire (tags, heartbeats)
    runtime: str = "default"  # the runtime key, likewise (VMs with the same key are reusable)

    @classmethod
    def from_keywords(cls, ssh: dict, **keywords) -> HostProvider:
        """The provider for resolved ``lithops.ssh`` options and this backend's keywords."""
        raise NotImplementedError

    async def acquire(self, n: int) -> list[HostSpec]:
        """Up to ``n`` more hosts, each answering SSH with the returned options.

        Fewer (or none) when the provider has no more; raises if it cannot get
        the ones it tried to, after releasing what it got in this call.
        """
        raise NotImplementedError

    async def acquire_scheduler_host(self) -> HostSpec | None:
        """A host of its own for a remote scheduler, or None: the first worker host runs it.

        VM backends create one (Lithops' master VM, ``master_instance_type``); it is
        released with everything else by :meth:`close`.
        """
        return None

    async def release(self, hosts: list[HostSpec]) -> None:
        """Give hosts back (their workers are stopped): VMs are terminated or stopped."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release every host still held and stop background work; idempotent."""
        raise NotImplementedError

    def summary(self) -> str:
        """A short description for ``repr``, e.g. ``hosts=[...]``."""
        return ""


BACKENDS = {
    "ssh": "dask_lithops.standalone.providers.ssh.SSHProvider",
    "vm": "dask_lithops.standalone.providers.ssh.SSHProvider",  # Lithops' name for given hosts
    "aws_ec2": "dask_lithops.standalone.providers.aws_ec2.EC2Provider",
}


def provider_class(name: str) -> type[HostProvider]:
    if name not in BACKENDS:
        raise config.ConfigError(f"backend = {name!r} is invalid for StandaloneCluster; "
                                 f"allowed: {', '.join(BACKENDS)}")
    from distributed.utils import import_term

    return import_term(BACKENDS[name])
