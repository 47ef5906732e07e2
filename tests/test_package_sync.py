"""Package sync to SSH hosts whose Python has nothing but the standard library.

The hosts run the machine's system Python (``/usr/bin/python3``: no dask, no
pandas); the client's whole environment reaches them as wheels made on the
client, installed into one runtime venv.  The hosts share a filesystem, so the
module's clusters share one ``remote_dir`` and the venv is built once.
"""

from __future__ import annotations

import re
import time

import pytest

pytestmark = [pytest.mark.netns, pytest.mark.timeout(600)]

BARE_PYTHON = "/usr/bin/python3"
DONE = r"done in (?:\d+ min )?[\d.]+ s"  # a phase's end line (dask_lithops.progress)


@pytest.fixture(scope="module")
def hosts():
    from dask_lithops.testing.ssh_hosts import SSHHosts, ssh_hosts_available

    reason = ssh_hosts_available()
    if reason:
        pytest.skip(f"SSH namespace hosts unavailable: {reason}")
    import subprocess

    r = subprocess.run([BARE_PYTHON, "-c", "import dask"], capture_output=True)
    if r.returncode == 0:
        pytest.skip(f"{BARE_PYTHON} has dask installed: not a bare host Python")
    with SSHHosts(2) as world:
        yield world


@pytest.fixture(scope="module")
def world_dirs(tmp_path_factory):
    return {"remote_dir": str(tmp_path_factory.mktemp("remote")),
            "wheel_cache": str(tmp_path_factory.mktemp("wheels"))}


def cluster_kwargs(world, remote_dir, **kw):
    return {**dict(hosts=[f"root@{h}" for h in world.hosts], ssh_key_filename=world.key_filename,
                   known_hosts=world.known_hosts, remote_python=BARE_PYTHON,
                   remote_dir=remote_dir, worker_processes=1, threads_per_worker=2,
                   death_timeout=10, dashboard_address=None), **kw}


def dataframe_p2p_shuffle(client):
    import dask
    import dask.dataframe as dd
    import numpy as np
    import pandas as pd

    pdf = pd.DataFrame({"k": np.arange(6000) % 41, "v": np.arange(6000.0)})
    ddf = dd.from_pandas(pdf, npartitions=8)
    with dask.config.set({"dataframe.shuffle.method": "p2p"}):
        got = ddf.shuffle("k", npartitions=6).groupby("k").v.sum().compute().sort_index()
    pd.testing.assert_series_equal(got, pdf.groupby("k").v.sum(), check_names=False)


def array_reduction(client):
    import dask.array as da
    import numpy as np

    x = da.arange(120_000, chunks=10_000).reshape(300, 400).rechunk((100, 100))
    ref = np.arange(120_000).reshape(300, 400)
    assert int((x.T @ x).sum().compute()) == int((ref.T @ ref).sum())
    assert float(x.std().compute()) == pytest.approx(float(ref.std()))


def test_bare_hosts_get_the_clients_environment(hosts, world_dirs, capsys):
    """First cluster: cold wheel cache, venv built; second: venv reused, a faster start."""
    import dask
    from distributed import Client

    from dask_lithops.standalone import StandaloneCluster

    kw = cluster_kwargs(hosts, world_dirs["remote_dir"])
    with dask.config.set({"lithops.runtime.wheel_cache": world_dirs["wheel_cache"]}):
        t0 = time.monotonic()
        with StandaloneCluster(**kw) as cluster, Client(cluster) as client:
            client.wait_for_workers(2, timeout=60)
            first_start = time.monotonic() - t0
            assert any(h.runtime.installed for h in cluster._host_states.values())
            venv_python = {h.runtime.python for h in cluster._host_states.values()}
            assert venv_python == {f"{world_dirs['remote_dir']}/runtimes/"
                                   f"{cluster._runtime_spec.key}/bin/python"}
            dataframe_p2p_shuffle(client)
            array_reduction(client)
            html = cluster._repr_html_()
            assert "installing the runtime venv" in html
        first = capsys.readouterr().err
        print(first)
        # each phase as it happens, with its duration and sizes
        assert re.search(r"dask-lithops: fetching \d+ wheels for cp3\d+-linux-\w+: " + DONE +
                         r" \(\d+ wheels, [\d.]+ MB", first), first
        assert re.search(r"uploading \d+ wheels: " + DONE + r" \([\d.]+ MB sent", first), first
        assert re.search(r"installing the runtime venv py3\.\d+-\w+: " + DONE + r" "
                         r"\(\d+ distributions, [\d.]+ MB of wheels\)", first), first
        assert re.search(r"preparing 2 hosts: " + DONE + r" \(runtime py3\.\d+-\w+, venv "
                         r"installed by \d hosts\)", first), first

        t0 = time.monotonic()
        with StandaloneCluster(**kw) as cluster, Client(cluster) as client:
            client.wait_for_workers(2, timeout=60)
            second_start = time.monotonic() - t0
            assert not any(h.runtime.installed for h in cluster._host_states.values())
            dataframe_p2p_shuffle(client)
        second = capsys.readouterr().err
        assert "fetching" not in second and "installing" not in second, second
        assert re.search(r"preparing 2 hosts: " + DONE + r" \(runtime py3\.\d+-\w+, venv "
                         r"reused\)", second), second
    print(f"first cluster (wheels + venv) started in {first_start:.1f} s, "
          f"second (venv reused) in {second_start:.1f} s")
    assert second_start < first_start


def test_no_package_sync_is_the_minimal_runtime(hosts, world_dirs):
    """package_sync=False: the venv holds dask-lithops' dependencies only (no pandas)."""
    from distributed import Client

    from dask_lithops.standalone import StandaloneCluster
    from dask_lithops.standalone.remote_runtime import client_runtime

    full = client_runtime(package_sync=True)
    minimal = client_runtime(package_sync=False)
    assert {"pandas", "pyarrow", "numpy"} <= {e.name for e in full.entries}
    assert not {"pandas", "pyarrow", "numpy"} & {e.name for e in minimal.entries}
    assert {"dask", "distributed", "cloudpickle", "msgpack", "tornado"} <= \
        {e.name for e in minimal.entries}
    assert minimal.key != full.key
    with StandaloneCluster(**cluster_kwargs(hosts, world_dirs["remote_dir"]),
                           package_sync=False, quiet=True) as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=60)

        def has(name):
            import importlib.util

            return importlib.util.find_spec(name) is not None

        assert client.submit(has, "pandas").result() is False
        assert client.submit(has, "distributed").result() is True


# -- Lambda ------------------------------------------------------------------------------------
from lambda_world import emulator  # noqa: E402,F401  (fixture)


def test_lambda_runtime_carries_dask_optional_dependencies(emulator, capsys):
    """No extra_packages: the function still has pandas/pyarrow/numpy (dask[complete] set)."""
    from distributed import Client

    from dask_lithops.runtime.builder import function_roots
    from dask_lithops.serverless import ServerlessCluster

    assert {"numpy", "pandas", "pyarrow"} <= set(function_roots())
    assert function_roots(package_sync=False) == {}
    with ServerlessCluster(n_workers=2, endpoint_url=emulator.endpoint_url,
                           contact_address=emulator.host_address, runtime_memory=1024,
                           runtime_timeout=120, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        assert not cluster.backend_config.get("extra_packages")
        client.wait_for_workers(2, timeout=90)
        dataframe_p2p_shuffle(client)
        assert {"numpy", "pandas", "pyarrow"} <= set(cluster.runtime_package.distributions)
    err = capsys.readouterr().err
    assert re.search(r"dask-lithops: (building runtime default .*: " + DONE + r" \([\d.]+ MB "
                     r"zipped|runtime default \(\w+\) from the cache: [\d.]+ MB zipped)", err), err
    assert re.search(r"deploying function \S+: " + DONE + r" \([\d.]+ MB zipped", err), err
    assert re.search(r"starting 2 workers: " + DONE + r" \(2 of 2 registered\)", err), err


# -- local code --------------------------------------------------------------------------------
HELPER = '''
def scale(x):
    return x * {factor}
'''


def test_local_modules_reach_the_workers(hosts, tmp_path, monkeypatch):
    """A helper module next to the 'script' (the working directory) is shipped; changes too;
    with lithops.runtime.local_code false it is not."""
    import importlib
    import sys

    import dask
    from distributed import Client

    from dask_lithops.runtime.local_code import local_modules
    from dask_lithops.standalone import StandaloneCluster

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "dl_helpers_mod.py").write_text(HELPER.format(factor=3))
    (tmp_path / "dl_helpers_pkg").mkdir()
    (tmp_path / "dl_helpers_pkg" / "__init__.py").write_text("from .inner import plus\n")
    (tmp_path / "dl_helpers_pkg" / "inner.py").write_text("def plus(x):\n    return x + 100\n")
    import dl_helpers_mod
    import dl_helpers_pkg

    try:
        found = local_modules()
        assert found["dl_helpers_mod"] == tmp_path / "dl_helpers_mod.py"
        assert found["dl_helpers_pkg"] == tmp_path / "dl_helpers_pkg"
        assert "dask" not in found and "dask_lithops" not in found and "pytest" not in found
        # the client's own environment on the hosts (no venv to build): only local code differs
        kw = cluster_kwargs(hosts, str(tmp_path / "remote"), remote_python=sys.executable,
                            quiet=True)
        with StandaloneCluster(**kw) as cluster, Client(cluster) as client:
            client.wait_for_workers(2, timeout=60)
            assert client.submit(dl_helpers_mod.scale, 7).result(timeout=30) == 21
            assert client.submit(dl_helpers_pkg.plus, 1).result(timeout=30) == 101
            # edited and reloaded on the client: the workers follow within the rescan period
            (tmp_path / "dl_helpers_mod.py").write_text(HELPER.format(factor=5))
            importlib.reload(dl_helpers_mod)
            deadline = time.monotonic() + 20
            while client.submit(dl_helpers_mod.scale, 7, pure=False).result(timeout=30) != 35:
                assert time.monotonic() < deadline
                time.sleep(0.5)

        with dask.config.set({"lithops.runtime.local_code": False}), \
                StandaloneCluster(**kw) as cluster, Client(cluster) as client:
            client.wait_for_workers(2, timeout=60)

            def importable(name):
                import importlib.util

                return importlib.util.find_spec(name) is not None

            assert client.submit(importable, "dl_helpers_mod").result(timeout=30) is False
    finally:
        sys.modules.pop("dl_helpers_mod", None)
        sys.modules.pop("dl_helpers_pkg", None)
        sys.modules.pop("dl_helpers_pkg.inner", None)
