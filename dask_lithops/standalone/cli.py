"""``dask-lithops vm list`` and ``dask-lithops clean``: VMs and resources tagged by dask-lithops.

Both act only on resources tagged ``dask-lithops=true`` (and, unless
``--all-users``, ``dask-lithops-user=<you>``).  Options default to the
resolved ``lithops.aws_ec2`` config (region, endpoint_url).
"""

from __future__ import annotations

import click

from dask_lithops.cli import options


def _provider(region, endpoint_url):
    from dask_lithops import config
    from dask_lithops.standalone.providers.aws_ec2 import EC2Provider

    try:
        opts = {**config.section("standalone"),
                **config.section("aws_ec2", region=region, endpoint_url=endpoint_url)}
    except config.ConfigError as e:
        raise click.ClickException(str(e)) from None
    return EC2Provider(opts, cluster_id="cli")


def _tags(resource: dict) -> dict:
    return {t["Key"]: t["Value"] for t in resource.get("Tags", [])}


common = options(
    click.option("--region", default=None, help="AWS region (default: lithops.aws_ec2.region)"),
    click.option("--endpoint-url", default=None, help="EC2 API endpoint (e.g. moto)"),
    click.option("--all-users", is_flag=True, help="not only resources tagged with your user"),
)


@click.group("vm")
def vm():
    """VMs created by dask-lithops (aws_ec2 backend)."""


@vm.command("list")
@common
@click.option("--cluster", default=None, help="only this cluster id")
@click.option("--state", "states", multiple=True,
              help="instance states (default: pending, running, stopping, stopped)")
def vm_list(region, endpoint_url, all_users, cluster, states):
    """List dask-lithops VMs, key pairs and security groups."""
    from dask_lithops.standalone.providers.aws_ec2 import (
        LIVE_STATES,
        TAG_CLUSTER,
        TAG_MODE,
        TAG_USER,
        EC2Error,
    )

    p = _provider(region, endpoint_url)
    try:
        vms = [v for v in p.list(cluster_id=cluster, states=states or LIVE_STATES)
               if all_users or v.tags.get(TAG_USER) == p.user]
        keys = [k for k in p.tagged_key_pairs()
                if all_users or _tags(k).get(TAG_USER) == p.user]
        groups = [g for g in p.tagged_security_groups()
                  if all_users or _tags(g).get(TAG_USER) == p.user]
    except EC2Error as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"# region {p.region}: {len(vms)} VMs, {len(keys)} key pairs, "
               f"{len(groups)} security groups")
    fmt = "{:<21} {:<13} {:<12} {:<15} {:<15} {:<12} {:<8} {}"
    click.echo(fmt.format("INSTANCE", "STATE", "TYPE", "PRIVATE IP", "PUBLIC IP", "CLUSTER",
                          "MODE", "USER"))
    for v in sorted(vms, key=lambda v: (v.tags.get(TAG_CLUSTER, ""), v.instance_id)):
        click.echo(fmt.format(v.instance_id, v.state, v.instance_type or "-",
                              v.private_ip or "-", v.public_ip or "-",
                              v.tags.get(TAG_CLUSTER, "-"), v.tags.get(TAG_MODE, "-"),
                              v.tags.get(TAG_USER, "-")))
    for k in keys:
        click.echo(f"key-pair       {k['KeyName']} ({k.get('KeyPairId', '-')})")
    for g in groups:
        click.echo(f"security-group {g['GroupId']} {g.get('GroupName', '')} ({g.get('VpcId', '')})")


@click.command("clean")
@common
@click.option("--yes", "-y", is_flag=True, help="do not ask for confirmation")
def clean(region, endpoint_url, all_users, yes):
    """Terminate every dask-lithops VM; delete its key pairs and security groups."""
    from dask_lithops.standalone.providers.aws_ec2 import EC2Error

    p = _provider(region, endpoint_url)
    if not yes:
        click.confirm(f"Terminate every dask-lithops VM{' of every user' if all_users else ''} "
                      f"in {p.region} and delete its key pairs and security groups?", abort=True)
    try:
        done = p.clean(all_users=all_users)
    except EC2Error as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"terminated {len(done['instances'])} VMs {done['instances']}; deleted key pairs "
               f"{done['key_pairs']} and security groups {done['security_groups']}")
