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
    with pytest.raises(RuntimeBuildError, match=r"MB unzipped .* Lambda allows .* container image"
                       ) as info:
        build_runtime("toobig", extra_packages=["numpy"], cache_dir=tmp_path,
                      unzipped_limit=20 * 2**20)
    assert "before anything was built" in str(info.value)  # its files' sizes said so at once
    assert not list(tmp_path.glob("**/*.zip"))
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


# --------------------------------------------------------------------- contents (package sync)


def test_show_lists_what_a_runtime_contains_and_why():
    cli = CliRunner()
    r = cli.invoke(runtime, ["build", "--show", "-e", "requests"])
    assert r.exit_code == 0, r.output
    rows = {line.split()[0]: line for line in r.output.splitlines()[2:]}
    assert rows["pandas"].endswith("dask optional dependency")
    assert md.version("pandas") in rows["pandas"]
    assert rows["dask"].endswith("dask-lithops dependency")
    assert rows["requests"].endswith("extra_packages")
    assert rows["idna"].endswith("extra_packages (requests)")
    assert "boto3" not in rows and "bokeh" not in rows  # Lambda has boto3; bokeh is the dashboard

    r = cli.invoke(runtime, ["build", "--show", "--no-package-sync"])
    assert "pandas" not in r.output and "package sync off" in r.output

    r = cli.invoke(runtime, ["build", "--show", "--hosts"])
    assert r.exit_code == 0, r.output
    rows = {line.split()[0]: line for line in r.output.splitlines()[2:]}
    assert rows["pytest"].endswith("client package")
    assert rows["boto3"].endswith("client package")
    assert "dask-lithops" not in rows  # travels as code, not as a wheel
    assert len(rows) == len({d.metadata["Name"] for d in md.distributions()}) - 2  # - pip, itself

    r = cli.invoke(runtime, ["build", "--show", "-e", "surely-not-a-package-xyz"])
    assert r.exit_code != 0 and "not installed on this client" in r.output


def _fake_local_install(tmp_path, version="0.1"):
    """A project directory and a .dist-info saying it was installed from there (PEP 610)."""
    project = tmp_path / "proj"
    (project / "dl_localproj").mkdir(parents=True, exist_ok=True)
    (project / "dl_localproj" / "__init__.py").write_text(f"VERSION = {version!r}\n")
    (project / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        f'[project]\nname = "dl-localproj"\nversion = "{version}"\n')
    info = tmp_path / "site" / f"dl_localproj-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: dl-localproj\nVersion: {version}\n")
    (info / "direct_url.json").write_text(
        '{"url": "file://%s", "dir_info": {"editable": true}}' % project)
    return project, md.PathDistribution(info)


def test_local_and_editable_installs_become_wheels(tmp_path):
    import dask

    from dask_lithops.runtime import contents, wheels
    from dask_lithops.standalone.remote_runtime import RuntimeSpec

    project, dist = _fake_local_install(tmp_path)
    dists = {**contents.installed(), "dl-localproj": dist}
    entries = contents.host_contents(package_sync=True, dists=dists)
    (entry,) = [e for e in entries if e.name == "dl-localproj"]
    assert (entry.source, entry.path, entry.reason) == ("editable", str(project),
                                                        contents.CLIENT)
    with dask.config.set({"lithops.runtime.wheel_cache": str(tmp_path / "cache")}):
        built = wheels.build_local_wheels([entry])
        path, digest = built["dl-localproj"]
        assert path.name.startswith("dl_localproj-0.1-") and path.suffix == ".whl"
        names = zipfile.ZipFile(path).namelist()
        assert "dl_localproj/__init__.py" in names
        assert wheels.build_local_wheels([entry])["dl-localproj"][1] == digest  # reproducible
        spec = RuntimeSpec("3.11", {}, [entry], local_wheels=built)
        key = spec.key
        (project / "dl_localproj" / "__init__.py").write_text("VERSION = 'edited'\n")
        spec.local_wheels = wheels.build_local_wheels([entry])
        assert spec.key != key  # changed code -> a new venv


def test_what_cannot_be_reproduced_is_a_warning_naming_it(tmp_path):
    import dask

    from dask_lithops.runtime import contents, wheels
    from dask_lithops.standalone.remote_runtime import MissingDistributionsWarning, RuntimeSpec

    entries = [contents.Entry("toolz", md.version("toolz"), contents.CORE),
               contents.Entry("dl-surely-not-on-any-index", "1.0", contents.CLIENT)]
    with dask.config.set({"lithops.runtime.wheel_cache": str(tmp_path / "cache")}):
        spec = RuntimeSpec("3.11", {}, entries)
        with pytest.warns(MissingDistributionsWarning,
                          match=r"1 distributions .* left out .*dl-surely-not-on-any-index \("):
            house = spec.wheelhouse(wheels.Target.client())
        assert set(house.wheels) == {"toolz"} and set(house.missing) == {
            "dl-surely-not-on-any-index"}
        # cached: a second runtime needing toolz downloads nothing
        from dask_lithops.progress import Progress

        progress = Progress(quiet=True)
        again = wheels.fetch(entries[:1], wheels.Target.client(), {}, progress)
        assert again.wheels["toolz"] == house.wheels["toolz"]
        assert progress.records == []  # no "fetching" phase


def test_a_wheel_whose_requires_python_excludes_the_hosts_python_is_left_out_by_name(tmp_path):
    """pip download targets major.minor only: a wheel needing a later micro release must not
    reach a host whose Python it refuses (it would fail the whole venv install there)."""
    import zipfile

    from dask_lithops.runtime import contents, wheels

    def make_wheel(name: str, requires_python: str):
        path = tmp_path / f"{name}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr(f"{name}-1.0.dist-info/METADATA",
                       f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n"
                       f"Requires-Python: {requires_python}\n")
        return path

    entries = [contents.Entry("dl-new-micro", "1.0", contents.CLIENT, source="local", path="x"),
               contents.Entry("dl-any", "1.0", contents.CLIENT, source="local", path="y")]
    local = {"dl-new-micro": (make_wheel("dl_new_micro", ">=3.11.5"), "h1"),
             "dl-any": (make_wheel("dl_any", ">=3.8"), "h2")}
    host = wheels.Target("3.11", "Linux", "x86_64", "3.11.2")
    house = wheels.fetch(entries, host, local)
    assert set(house.wheels) == {"dl-any"}
    assert house.missing == {"dl-new-micro": "requires Python >=3.11.5; the host has 3.11.2"}
    c = wheels.Target.client()
    assert host.is_client == ((c.python, c.system, c.machine) == ("3.11", "Linux", "x86_64"))
    newer = wheels.fetch(entries, wheels.Target("3.11", "Linux", "x86_64", "3.11.7"), local)
    assert set(newer.wheels) == {"dl-new-micro", "dl-any"} and not newer.missing


def test_the_main_script_and_its_multiprocessing_alias_are_not_shipped_as_local_code(
        tmp_path, monkeypatch):
    """A worker has a __main__/__mp_main__ of its own (awslambdaric's, the nanny's): shipping
    the client's would make every worker fail to reload it."""
    import sys
    import types

    from dask_lithops.runtime import local_code

    monkeypatch.chdir(tmp_path)
    (tmp_path / "script.py").write_text("x = 1\n")
    (tmp_path / "helper_mod_dl.py").write_text("y = 2\n")
    for name, file in (("__mp_main__", "script.py"), ("helper_mod_dl", "helper_mod_dl.py")):
        module = types.ModuleType(name)
        module.__file__ = str(tmp_path / file)
        monkeypatch.setitem(sys.modules, name, module)
    found = local_code.local_modules()
    assert "helper_mod_dl" in found and "__mp_main__" not in found
