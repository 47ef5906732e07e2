"""The ``dask-lithops`` command (verbs after Lithops': hello, runtime, clean, ...)."""

from __future__ import annotations

import importlib
import sys
import time

import click

# Subcommands that live with their feature, imported only when used.
LAZY_COMMANDS = {
    "relay": "dask_lithops.relay.cli:relay",
    "emulator": "dask_lithops.testing.lambda_emulator.cli:emulator",
    "runtime": "dask_lithops.runtime.cli:runtime",
    "vm": "dask_lithops.standalone.cli:vm",
    "clean": "dask_lithops.standalone.cli:clean",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx, name):
        if name in LAZY_COMMANDS:
            module, _, attr = LAZY_COMMANDS[name].partition(":")
            try:
                return getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as e:
                return _unavailable(name, e)
        return super().get_command(ctx, name)


def options(*decorators):
    """One decorator applying several click options/arguments, in the order given."""
    def apply(f):
        for deco in reversed(decorators):
            f = deco(f)
        return f

    return apply


def _unavailable(name: str, error: Exception) -> click.Command:
    @click.command(name, help=f"(unavailable: {error})")
    def cmd():
        raise click.ClickException(f"'dask-lithops {name}' is unavailable here: {error}")

    return cmd


@click.group(cls=LazyGroup)
@click.version_option(package_name="dask-lithops")
def main():
    """Dask clusters on Lithops' execution modes: localhost, serverless, standalone."""


@main.group("config")
def config_group():
    """Show the resolved configuration."""


@config_group.command("show")
@click.option("--section", default=None, help="only keys of this section, e.g. localhost")
def config_show(section):
    """Every lithops.* key, its resolved value, and where it came from."""
    from dask_lithops import config

    try:
        config.validate_current()
        rows = config.resolved()
    except config.ConfigError as e:
        raise click.ClickException(str(e)) from None
    path = config.lithops_config_file()
    click.echo(f"# Lithops config file: {path or 'none'}")
    for key, value, source in rows:
        if section and not key.startswith(f"lithops.{section}."):
            continue
        if _is_secret(key):
            value = "<set>" if value else value
        click.echo(f"{key} = {value!r}    [{source}]")


def _is_secret(key: str) -> bool:
    return any(s in key for s in ("secret", "token", "password", "access_key"))


@main.command()
@click.option("--mode", default=None, help="localhost, serverless or standalone")
@click.option("--backend", "-b", default=None, help="aws_lambda, ssh, aws_ec2, ...")
@click.option("--workers", "-n", default=None, type=int, help="number of workers")
@click.option("--tasks", default=100, show_default=True, help="size of the map")
@click.option("--usage", is_flag=True, help="print the GB-seconds usage report on close "
              "(serverless)")
def hello(mode, backend, workers, tasks, usage):
    """Start the configured cluster, run a small map, print the result and timings."""
    from distributed import Client

    from dask_lithops import Cluster, config

    try:
        mode, backend = config.resolve_mode(mode, backend)
    except config.ConfigError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"Starting a {mode} cluster (backend {backend}) ...")
    t0 = time.perf_counter()
    kwargs = {"n_workers": workers} if workers is not None else {}
    try:
        cluster = Cluster(mode=mode, backend=backend if mode != "localhost" else None, **kwargs)
    except config.ConfigError as e:
        raise click.ClickException(str(e)) from None
    with cluster, Client(cluster) as client:
        n = workers if workers is not None else len(cluster.worker_spec)
        if n:
            client.wait_for_workers(n)
        t1 = time.perf_counter()
        click.echo(f"Cluster ready in {t1 - t0:.2f}s: {len(client.scheduler_info()['workers'])} "
                   f"workers, dashboard {cluster.dashboard_link}")
        futures = client.map(_hello_task, range(tasks))
        results = client.gather(futures)
        t2 = time.perf_counter()
        hosts = sorted({r[1] for r in results})
        total = sum(r[0] for r in results)
        click.echo(f"Hello World! sum(i*i for i < {tasks}) = {total} "
                   f"(expected {sum(i * i for i in range(tasks))}), computed on {len(hosts)} "
                   f"worker(s) in {t2 - t1:.2f}s")
    click.echo(f"Closed in {time.perf_counter() - t2:.2f}s; total {time.perf_counter() - t0:.2f}s")
    if usage and hasattr(cluster, "usage_tracker"):
        click.echo(f"Usage: {cluster.usage_tracker.summary()}")
    if total != sum(i * i for i in range(tasks)):
        sys.exit(1)


def _hello_task(i: int):
    from distributed import get_worker

    return i * i, get_worker().name


if __name__ == "__main__":
    main()
