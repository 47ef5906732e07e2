"""Where a ServerlessCluster's scheduler and relay run: ``lithops.serverless.scheduler``.

* ``local``: in the client's process (today's behaviour); functions dial the
  client's contact address, so the client must be reachable from them.
* ``aws_ec2``: on a small VM (``lithops.aws_ec2.master_instance_type``)
  created or reused through StandaloneCluster's EC2 host provider; its keeper
  dismantles it when the client disappears.
* ``ssh``: on a host the user has (``scheduler_host="user@host[:port]"``).
* ``auto``: ``local`` when a contact address is known (keyword or config, the
  emulator's, the platform's), else ``aws_ec2``.

For the remote placements the scheduler and the relay run in one process on
the host (:class:`~dask_lithops.standalone.launchers.RemoteScheduler`), tethered
to the client's SSH session; the client and the dashboard reach the scheduler
through SSH tunnels; functions dial the host's address.  Host options are
StandaloneCluster's (``lithops.aws_ec2.*``, ``lithops.standalone.*``,
``lithops.ssh.*``), given as ``scheduler_options={...}``.
"""

from __future__ import annotations

import logging

from dask_lithops import config

logger = logging.getLogger(__name__)

PLACEMENTS = ("auto", "local", "aws_ec2", "ssh")
REMOTE = ("aws_ec2", "ssh")
# On a remote host the scheduler and the relay listen on fixed ports, so a firewall
# (EC2: the security group) can open exactly these two to the functions.
DEFAULT_SCHEDULER_PORT = 8786
DEFAULT_RELAY_PORT = 8788
# how to log in (lithops.ssh) and how to prepare the host's runtime (lithops.standalone)
SSH_KEYS = ("ssh_username", "ssh_key_filename", "known_hosts", "trust_unknown_hosts",
            "connect_timeout")
RUNTIME_KEYS = ("remote_dir", "remote_python", "install_runtime", "extra_python_packages")
# EC2 keys that are about worker VMs, not the scheduler's
_WORKER_VM_KEYS = ("n_vms", "max_workers", "worker_processes", "instance_id",
                   "worker_instance_type")


def resolve(placement: str | None, scheduler_host: str | None,
            scheduler_options: dict | None) -> tuple[str, dict]:
    """Validate the placement and split ``scheduler_options`` (no I/O).

    Returns ``(placement, host_options)``; ``scheduler_options`` keys that are
    not host options stay Scheduler keywords (``local``) -- the caller keeps them.
    """
    placement = config.get("serverless.scheduler", placement) or "auto"
    if placement not in PLACEMENTS:
        raise config.ConfigError(f"lithops.serverless.scheduler = {placement!r} is invalid; "
                                 f"allowed: {', '.join(PLACEMENTS)}")
    if scheduler_host is not None and placement not in ("ssh", "auto"):
        raise config.ConfigError(f"scheduler_host is only for scheduler='ssh' (got "
                                 f"scheduler={placement!r})")
    if scheduler_host is not None:
        placement = "ssh"
    if placement == "ssh" and not scheduler_host:
        raise config.ConfigError("scheduler='ssh' needs scheduler_host='user@host[:port]' (the "
                                 "host that runs the scheduler and the relay)")
    return placement, dict(scheduler_options or {})


def host_option_keys(placement: str) -> tuple[str, ...]:
    if placement == "aws_ec2":
        from dask_lithops.standalone.providers.aws_ec2 import EC2Provider

        return tuple(k for k in dict.fromkeys(EC2Provider.keywords + SSH_KEYS + RUNTIME_KEYS)
                     if k not in _WORKER_VM_KEYS)
    return SSH_KEYS + RUNTIME_KEYS


class SchedulerHost:
    """The host of a remote placement: acquired, prepared, released (provider + setup).

    Built from the options without I/O (bad options fail here); :meth:`acquire`
    gets and prepares the host (blocking parts in threads); :meth:`release`
    gives it back (EC2: terminated, or stopped in ``reuse`` mode).
    """

    def __init__(self, placement: str, options: dict, scheduler_host: str | None = None):
        from dask_lithops.standalone.hosts import HostSetup

        allowed = host_option_keys(placement)
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise config.ConfigError(
                f"scheduler_options {', '.join(unknown)}: not options of scheduler="
                f"{placement!r}; allowed: {', '.join(allowed)}")
        runtime = config.section("standalone", **{k: options[k] for k in RUNTIME_KEYS
                                                  if k in options})
        self.placement = placement
        self.host = None  # PreparedHost, once acquired
        if placement == "aws_ec2":
            from dask_lithops.standalone.providers.aws_ec2 import EC2Provider

            # EC2's own ssh_username/ssh_key_filename (its key pair) win over lithops.ssh's
            ec2_kw = {k: v for k, v in options.items() if k in EC2Provider.keywords}
            ssh = config.section("ssh", **{k: v for k, v in options.items()
                                           if k in SSH_KEYS and k not in ec2_kw})
            self.provider = EC2Provider.from_keywords(ssh, **ec2_kw)
            self.provider.public_ports = (DEFAULT_SCHEDULER_PORT, DEFAULT_RELAY_PORT)
        else:
            from dask_lithops.standalone.providers.ssh import SSHProvider

            ssh = config.section("ssh", hosts=[scheduler_host],
                                 **{k: options[k] for k in SSH_KEYS if k in options})
            self.provider = SSHProvider.from_keywords(ssh)
        self.setup = HostSetup.from_options(ssh, {**runtime, "worker_processes": 1})

    async def acquire(self, cluster_id: str):
        from dask_lithops.standalone.ssh_transport import run_in_ssh_thread

        self.provider.cluster_id = cluster_id
        self.provider.runtime = self.setup.runtime_spec.key
        try:
            spec = await self.provider.acquire_scheduler_host()
            if spec is None:
                specs = await self.provider.acquire(1)
                if not specs:
                    raise config.ConfigError(f"scheduler={self.placement!r}: the provider gave "
                                             "no host")
                spec = specs[0]
            logger.info("scheduler host %s: preparing its runtime", spec)
            self.host = await run_in_ssh_thread(self.setup.prepare, spec)
        except BaseException:
            await self.provider.close()  # nothing acquired outlives a failed start
            raise
        return self.host

    @property
    def address(self) -> str:
        """The host's address as functions dial it: the one the client dialled (EC2: the
        public address; the host itself only sees its private one)."""
        return self.host.spec.host

    async def release(self) -> None:
        from dask_lithops.standalone.ssh_transport import run_in_ssh_thread

        try:
            if self.host is not None:
                await run_in_ssh_thread(self.host.close)
        finally:
            self.host = None
            await self.provider.close()

    def __str__(self) -> str:
        return f"{self.placement}:{self.host or self.provider.summary()}"
