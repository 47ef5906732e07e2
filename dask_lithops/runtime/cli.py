"""``dask-lithops runtime build|deploy|list|delete [--backend NAME]`` (verbs after Lithops').

Every verb goes through the serverless backend interface
(:class:`dask_lithops.serverless.backends.base.FaaSBackend`): what a runtime
package is and where it is deployed is the backend's business.
"""

from __future__ import annotations

import click

from dask_lithops.cli import options


def _backend(backend_name, endpoint_url=None, memory=None, timeout=None, *, platform=True,
             **options):
    from dask_lithops import config
    from dask_lithops.serverless.backends import backend_class

    try:
        name = backend_name or config.get("backend")
        if name not in _backend_names():
            name = config.DEFAULT_BACKEND["serverless"]
        cls = backend_class(name)
        options = {k: v for k, v in options.items() if v not in (None, (), [])}
        for k in options:
            if k not in cls.option_names():
                raise config.ConfigError(f"--{k.replace('_', '-')} is not an option of the "
                                         f"{name} backend")
        cfg = cls.resolve_config(endpoint_url=endpoint_url, runtime_memory=memory,
                                 runtime_timeout=timeout, **options)
        return cls(cfg, platform=platform), cfg
    except config.ConfigError as e:
        raise click.ClickException(str(e)) from None


def _backend_names():
    from dask_lithops.serverless.backends import BACKENDS

    return list(BACKENDS)


def _build(backend, name, force, package_sync=None):
    from dask_lithops.progress import Progress
    from dask_lithops.runtime.builder import RuntimeBuildError

    try:
        return backend.build_runtime(name, force=force, log=click.echo,
                                     package_sync=package_sync, progress=Progress())
    except RuntimeBuildError as e:
        raise click.ClickException(str(e)) from None


def show_contents(for_hosts: bool, extra_packages, package_sync) -> None:
    """Print what a runtime will contain, one distribution a line, with why (docs/runtime.md)."""
    from dask_lithops.runtime import contents
    from dask_lithops.runtime.builder import RuntimeBuildError, function_contents

    try:
        if for_hosts:
            entries = contents.host_contents(extra_packages, package_sync)
        else:
            entries = function_contents(extra_packages, package_sync)
    except (RuntimeBuildError, contents.MissingPackageError) as e:
        raise click.ClickException(str(e)) from None
    what = "SSH/EC2 hosts' runtime venv" if for_hosts else "function runtime"
    sync = "on" if package_sync else "off"
    click.echo(f"{what}: {len(entries)} distributions (package sync {sync})")
    click.echo(f"{'distribution':<32} {'version':<16} why")
    for e in entries:
        source = f" [{e.source} {e.path}]" if e.source != "index" else ""
        click.echo(f"{e.name:<32} {e.version:<16} {e.reason}{source}")


_backend_option = click.option(
    "--backend", "backend_name", type=click.Choice(_backend_names()), default=None,
    help="serverless backend (default: lithops.backend, else aws_lambda)")

_with_common = options(
    click.argument("name", required=False),
    _backend_option,
    click.option("--extra-packages", "-e", multiple=True,
                 help="pip names of user libraries to add (repeatable)"),
    click.option("--requirements", "requirements_file", default=None,
                 help="a requirements file of user libraries"),
    click.option("--architecture", type=click.Choice(["x86_64", "arm64"]), default=None,
                 help="aws_lambda only"),
    click.option("--force", is_flag=True, help="rebuild even if cached"),
)


@click.group("runtime")
def runtime():
    """Build and manage function runtimes (serverless mode)."""


def _package_options(extra_packages, requirements_file, architecture) -> dict:
    return {"extra_packages": list(extra_packages), "requirements_file": requirements_file,
            "architecture": architecture}


@runtime.command("build")
@_with_common
@click.option("--show", is_flag=True,
              help="list what the runtime will contain and why; build nothing")
@click.option("--hosts", "for_hosts", is_flag=True,
              help="with --show: the runtime venv of SSH/EC2 hosts instead of a function's")
@click.option("--package-sync/--no-package-sync", default=None,
              help="the client's packages in the runtime (default: lithops.runtime.package_sync)")
def build(name, backend_name, extra_packages, requirements_file, architecture, force, show,
          for_hosts, package_sync):
    """Build the deployment package: dask-lithops + the client's exact versions."""
    from dask_lithops import config

    package_sync = config.get("runtime.package_sync", package_sync)
    if show:
        extras = list(extra_packages)
        if requirements_file:
            from dask_lithops.runtime.builder import _read_requirements

            extras += _read_requirements(requirements_file)
        return show_contents(for_hosts, extras, package_sync)
    backend, _ = _backend(backend_name, platform=False,
                          **_package_options(extra_packages, requirements_file, architecture))
    pkg = _build(backend, name, force, package_sync)
    for line in pkg.describe():
        click.echo(line)


@runtime.command("deploy")
@_with_common
@click.option("--memory", type=int, default=None, help="runtime_memory in MB")
@click.option("--timeout", type=int, default=None, help="runtime_timeout in seconds")
@click.option("--endpoint-url", default=None, help="the platform's API endpoint (e.g. an emulator)")
def deploy(name, backend_name, extra_packages, requirements_file, architecture, force, memory,
           timeout, endpoint_url):
    """Build (if needed) and deploy a runtime as a function (one per runtime and memory)."""
    backend, cfg = _backend(backend_name, endpoint_url, memory, timeout,
                            **_package_options(extra_packages, requirements_file, architecture))
    pkg = _build(backend, name, force)
    fn = backend.get_runtime_key(pkg.name, cfg["runtime_memory"], pkg.version)
    if backend.get_runtime_info(fn) is not None:
        if not force:
            click.echo(f"{fn} already deployed")
            return
        backend.delete_runtime(fn)
    info = backend.deploy_runtime(pkg, cfg["runtime_memory"], cfg["runtime_timeout"])
    click.echo(f"deployed {info.function_name} ({info.memory} MB, timeout {info.timeout}s)")


@runtime.command("list")
@click.argument("name", required=False)
@_backend_option
@click.option("--endpoint-url", default=None)
def list_(name, backend_name, endpoint_url):
    """Deployed dask-lithops runtimes."""
    backend, _ = _backend(backend_name, endpoint_url)
    rows = backend.list_runtimes(name)
    click.echo(f"{'runtime':<20} {'version':<11} {'memory':>7} {'timeout':>7}  function")
    for r in rows:
        click.echo(f"{r.runtime_name:<20} {r.version:<11} {r.memory:>6}M {r.timeout or '':>6}s  "
                   f"{r.function_name}")
    click.echo(f"total: {len(rows)}")


@runtime.command("delete")
@click.argument("name")
@click.option("--memory", type=int, default=None, help="only this memory size")
@_backend_option
@click.option("--endpoint-url", default=None)
def delete(name, memory, backend_name, endpoint_url):
    """Delete a runtime's functions (all memory sizes and versions unless --memory)."""
    backend, _ = _backend(backend_name, endpoint_url)
    from dask_lithops.serverless.backends.base import sanitize_runtime_name

    n = 0
    for r in backend.list_runtimes(sanitize_runtime_name(name)):
        if memory is None or r.memory == memory:
            backend.delete_runtime(r.function_name)
            click.echo(f"deleted {r.function_name}")
            n += 1
    if not n:
        click.echo(f"no deployed runtime {name!r}")


@runtime.command("clean")
@_backend_option
@click.option("--endpoint-url", default=None)
@click.confirmation_option(prompt="Delete every dask-lithops function (and its artefacts)?")
def clean(backend_name, endpoint_url):
    """Delete every dask-lithops function and what it uses (layers), nothing else."""
    backend, _ = _backend(backend_name, endpoint_url)
    for x in backend.clean():
        click.echo(f"deleted {x}")
