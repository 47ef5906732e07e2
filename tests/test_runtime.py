"""The runtime package (dask-lithops runtime build/deploy/list/delete)."""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import zipfile

import pytest
from click.testing import CliRunner

from dask_lithops.runtime.builder import RuntimeBuildError, build_runtime
from dask_lithops.runtime.cli import runtime


@pytest.fixture(scope="module")
def core_package():
    return build_runtime("default")


def test_package_has_the_clients_exact_versions(core_package):
    names = zipfile.ZipFile(core_package.function_zip).namelist()
    for dist in ("dask", "distributed", "cloudpickle", "msgpack", "tornado", "toolz"):
        meta = [n for n in names if n.lower().startswith(dist.replace("-", "_") + "-")
                and n.endswith(".dist-info/METADATA")]
        assert meta, dist
        assert md.version(dist) in meta[0], (dist, meta)
    assert "dask_lithops/serverless/handler.py" in names
    assert any(n.startswith("dask_lithops-") and n.endswith("entry_points.txt") for n in names)
    # what Lambda's runtime provides is never packaged
    assert not [n for n in names if n.startswith(("boto3/", "botocore/", "awslambdaric/"))]
    # compiled for fast cold starts, valid whatever mtime unzipping gives the sources
    assert any(n.startswith("distributed/__pycache__/") for n in names)
    assert not [n for n in names if "/tests/" in n]
    assert core_package.runtime_key["distributed"] == md.version("distributed")


def test_cached_build_is_reused(core_package):
    again = build_runtime("default")
    assert again.version == core_package.version
    assert again.function_zip == core_package.function_zip


def test_too_big_fails_clearly_and_says_what_to_do(tmp_path):
    with pytest.raises(RuntimeBuildError, match=r"MB unzipped .* Lambda allows .* container image"):
        build_runtime("toobig", extra_packages=["numpy"], cache_dir=tmp_path,
                      unzipped_limit=20 * 2**20)
    with pytest.raises(RuntimeBuildError, match=r"not installed on this client"):
        build_runtime("missing", extra_packages=["surely-not-a-package-xyz"], cache_dir=tmp_path)


def test_cli_build_deploy_list_delete(core_package):
    if os.geteuid() != 0:
        pytest.skip("the emulator's sandboxes need root")
    pytest.importorskip("awslambdaric")
    from dask_lithops.testing.lambda_emulator import LambdaEmulator

    cli = CliRunner()
    r = cli.invoke(runtime, ["build"])
    assert r.exit_code == 0, r.output
    version = re.search(r"runtime default version ([0-9a-f]{10})", r.output).group(1)
    with LambdaEmulator(sandbox=True) as emu:
        url = ["--endpoint-url", emu.endpoint_url]
        r = cli.invoke(runtime, ["deploy", "--memory", "512", "--timeout", "60", *url])
        assert r.exit_code == 0, r.output
        fn = f"dask-lithops-default-{version}-512MB"
        assert f"deployed {fn}" in r.output
        r = cli.invoke(runtime, ["list", *url])
        assert fn in r.output and "total: 1" in r.output
        r = cli.invoke(runtime, ["delete", "default", *url])
        assert f"deleted {fn}" in r.output
        r = cli.invoke(runtime, ["list", *url])
        assert "total: 0" in r.output
