"""``dask-lithops emulator ...``: run the Lambda emulator in the foreground."""

from __future__ import annotations

import logging
import signal
import threading

import click


@click.group(name="emulator")
def emulator():
    """Offline AWS Lambda emulator (Lambda API + real awslambdaric environments)."""


@emulator.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address the Lambda API listens on.")
@click.option("--port", default=0, show_default=True, type=int,
              help="Port of the Lambda API (0: any free port).")
@click.option("--sandbox/--no-sandbox", default=None,
              help="Run environments in outbound-only network namespaces "
                   "(default: when root with ip/nft available).")
@click.option("--account-concurrency", default=100, show_default=True, type=int,
              help="Account concurrent-executions limit.")
@click.option("--idle-timeout", default=300.0, show_default=True, type=float,
              help="Seconds before an idle warm environment is reaped.")
@click.option("--log-dir", default=None, type=click.Path(file_okay=False),
              help="Directory for log streams (kept after exit).")
@click.option("--region", default="us-east-1", show_default=True)
@click.option("-v", "--verbose", is_flag=True, help="Log the emulator's activity.")
def start(host, port, sandbox, account_concurrency, idle_timeout, log_dir, region, verbose):
    """Start the emulator and serve until SIGINT/SIGTERM, then clean up everything."""
    from . import LambdaEmulator

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set())
                for s in (signal.SIGINT, signal.SIGTERM)}
    emu = LambdaEmulator(sandbox=sandbox, account_concurrency=account_concurrency,
                         log_dir=log_dir, idle_timeout=idle_timeout, host=host, port=port,
                         region=region)
    try:
        emu.start()
        click.echo(f"Lambda emulator listening at {emu.endpoint_url}")
        click.echo(f"  sandboxed: {emu.sandboxed}"
                   + ("" if emu.sandboxed else f" ({emu.sandbox_reason})"))
        click.echo(f"  memory limit: {emu.memory_limit_mode}")
        click.echo(f"  host address seen from functions: {emu.host_address}")
        click.echo(f"  log streams: {emu.log_dir}")
        click.echo(f"  export AWS_ENDPOINT_URL_LAMBDA={emu.endpoint_url}")
        click.echo("Press Ctrl+C to stop.", err=True)
        while not stop.wait(0.5):
            pass
    finally:
        emu.stop()
        for s, h in previous.items():
            signal.signal(s, h)
        click.echo("Lambda emulator stopped.", err=True)


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
