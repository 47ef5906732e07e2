"""``backend="ssh"``: the hosts given, nothing created or removed."""

from __future__ import annotations

from typing import ClassVar

from dask_lithops import config

from .base import HostProvider, HostSpec


class SSHProvider(HostProvider):
    """``backend="ssh"``: the hosts given (``lithops.ssh.hosts``), nothing created or removed."""

    name: ClassVar[str] = "ssh"
    name_prefix: ClassVar[str] = "ssh"
    keywords: ClassVar[tuple[str, ...]] = ()

    def __init__(self, hosts: list[HostSpec]):
        self.hosts = list(hosts)
        self.free = list(hosts)
        self.initial = self.maximum = len(hosts)

    @classmethod
    def from_keywords(cls, ssh: dict, **keywords) -> SSHProvider:
        if keywords:
            raise config.ConfigError(f"{', '.join(sorted(keywords))}: not options of "
                                     "StandaloneCluster(backend='ssh')")
        if not ssh["hosts"]:
            raise config.ConfigError("lithops.ssh.hosts is empty; give hosts=['user@host:port', "
                                     "...] (at least one)")
        return cls([HostSpec.parse(h, user=ssh["ssh_username"]) for h in ssh["hosts"]])

    async def acquire(self, n: int) -> list[HostSpec]:
        out, self.free = self.free[:n], self.free[n:]
        return out

    async def release(self, hosts: list[HostSpec]) -> None:
        self.free += [h for h in hosts if h not in self.free]
        self.free.sort(key=self.hosts.index)

    async def close(self) -> None:
        self.free = list(self.hosts)

    def summary(self) -> str:
        return f"hosts=[{', '.join(str(h) for h in self.hosts)}]"
