"""``dask-lithops emulator ...``: run the Lambda or Cloud Run functions emulator in the foreground."""

from __future__ import annotations

import logging
import signal
import threading

import click


@click.group(name="emulator")
def emulator():
    """Offline AWS Lambda (real awslambdaric) and Cloud Run functions (real functions-framework)."""


@emulator.command()
@click.option("--cloud", type=click.Choice(["aws", "gcp"]), default="aws", show_default=True,
              help="aws: the Lambda emulator; gcp: the Cloud Run functions emulator.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address the API listens on.")
@click.option("--port", default=0, show_default=True, type=int,
              help="Port of the Lambda API (0: any free port).")
@click.option("--sandbox/--no-sandbox", default=None,
              help="Run environments in outbound-only network namespaces "
                   "(default: when root with ip/nft available).")
@click.option("--host-reachable/--no-host-reachable", default=True, show_default=True,
              help="--no-host-reachable keeps functions from reaching any address of this "
                   "host (aws: but Lambda's own endpoints and --aws-endpoint-url) -- a client "
                   "behind NAT, as seen from the cloud.  Needs the sandbox.")
@click.option("--aws-endpoint-url", default=None,
              help="aws: the test world's AWS endpoint (moto): functions get their execution "
                   "role's credentials from its STS and reach it as AWS_ENDPOINT_URL.")
@click.option("--account-concurrency", default=100, show_default=True, type=int,
              help="Account concurrent-executions limit.")
@click.option("--idle-timeout", default=300.0, show_default=True, type=float,
              help="Seconds before an idle warm environment is reaped.")
@click.option("--log-dir", default=None, type=click.Path(file_okay=False),
              help="Directory for log streams (kept after exit).")
@click.option("--region", default=None,
              help="Region (default: us-east-1 for aws, us-central1 for gcp).")
@click.option("--project", default="test-project", show_default=True,
              help="gcp: the project the emulator serves.")
@click.option("-v", "--verbose", is_flag=True, help="Log the emulator's activity.")
def start(cloud, host, port, sandbox, host_reachable, aws_endpoint_url, account_concurrency,
          idle_timeout, log_dir, region, project, verbose):
    """Start the emulator and serve until SIGINT/SIGTERM, then clean up everything."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set())
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if cloud == "gcp":
            _serve_gcp(stop, host, port, sandbox, idle_timeout, log_dir,
                       region or "us-central1", project, host_reachable)
        else:
            _serve_aws(stop, host, port, sandbox, account_concurrency, idle_timeout, log_dir,
                       region or "us-east-1", host_reachable, aws_endpoint_url)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _serve_gcp(stop, host, port, sandbox, idle_timeout, log_dir, region, project,
               host_reachable):
    from ..gcp_functions_emulator import CloudFunctionsEmulator

    emu = CloudFunctionsEmulator(project, region, sandbox=sandbox, idle_timeout=idle_timeout,
                                 host=host, port=port, log_dir=log_dir,
                                 host_reachable=host_reachable)
    _serve(stop, emu, [f"project / region: {project} / {region}"], lambda: [
        f"host address seen from functions: {emu.host_address}"
        + ("" if emu.host_reachable else " (unreachable: --no-host-reachable)"),
        f"instance logs: {emu.log_dir}",
        f"export GOOGLE_APPLICATION_CREDENTIALS={emu.credentials_file}",
        f"API base: {emu.endpoint_url}/v2/projects/{project}/locations/{region}"])


def _serve_aws(stop, host, port, sandbox, account_concurrency, idle_timeout, log_dir, region,
               host_reachable, aws_endpoint_url):
    from . import LambdaEmulator

    emu = LambdaEmulator(sandbox=sandbox, account_concurrency=account_concurrency,
                         log_dir=log_dir, idle_timeout=idle_timeout, host=host, port=port,
                         region=region, host_reachable=host_reachable,
                         aws_endpoint_url=aws_endpoint_url)

    def details():
        lines = [f"host address seen from functions: {emu.host_address}"
                 + ("" if emu.host_reachable else " (unreachable: --no-host-reachable)"),
                 f"own filesystem (/var/task, /opt, private /tmp): {emu.filesystem_isolated}"]
        if emu.aws_endpoint_url:
            lines.append(f"AWS endpoint seen from functions: {emu.sandbox_aws_endpoint_url} "
                         f"(role credentials from its STS)")
        return lines + [f"log streams: {emu.log_dir}",
                        f"export AWS_ENDPOINT_URL_LAMBDA={emu.endpoint_url}"]

    _serve(stop, emu, [], details)


def _serve(stop, emu, before: list[str], after) -> None:
    """Start ``emu``, describe it (``before``, its sandbox, ``after()``), serve until ``stop``
    is set, then stop it (also when starting fails)."""
    try:
        emu.start()
        click.echo(f"{emu.display_name} listening at {emu.endpoint_url}")
        lines = [*before,
                 f"sandboxed: {emu.sandboxed}"
                 + ("" if emu.sandboxed else f" ({emu.sandbox_reason})"),
                 f"memory limit: {emu.memory_limit_mode}",
                 *after()]
        for line in lines:
            click.echo(f"  {line}")
        click.echo("Press Ctrl+C to stop.", err=True)
        while not stop.wait(0.5):
            pass
    finally:
        emu.stop()
        click.echo(f"{emu.display_name} stopped.", err=True)


@emulator.command()
@click.option("--endpoint-url", required=True, help="The running emulator's endpoint.")
def status(endpoint_url):
    """Show a running emulator's environments and counters."""
    import json
    import urllib.request

    with urllib.request.urlopen(endpoint_url.rstrip("/") + "/_emulator/status") as r:
        click.echo(json.dumps(json.load(r), indent=2))


def main():  # pragma: no cover - `python -m dask_lithops.testing.lambda_emulator.cli`
    emulator()


if __name__ == "__main__":  # pragma: no cover
    main()
