"""Configuration: defaults, dask config, env, Lithops file, precedence and errors."""

import os
import subprocess
import sys
import textwrap

import dask
import pytest

from dask_lithops import Cluster, LocalhostCluster, config
from dask_lithops.config import ConfigError


@pytest.fixture
def lithops_file(tmp_path, monkeypatch):
    def write(text):
        path = tmp_path / "lithops_config"
        path.write_text(textwrap.dedent(text))
        monkeypatch.setenv("LITHOPS_CONFIG_FILE", str(path))
        return path
    return write


@pytest.fixture(autouse=True)
def no_ambient_lithops_file(monkeypatch, tmp_path):
    # Tests must not see a developer's ~/.lithops/config or ./.lithops_config.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LITHOPS_CONFIG_FILE", raising=False)


def test_package_defaults_loaded_into_dask_config():
    assert dask.config.get("lithops.localhost.memory_limit") == "auto"
    assert dask.config.get("lithops.cluster.death_timeout") == "60s"
    assert config.get_with_source("localhost.nanny") == (True, "default")


def test_every_default_key_is_in_the_schema():
    config.validate(config.PACKAGE_DEFAULTS)  # additionalProperties: false everywhere
    for key, _ in config.leaves(config.PACKAGE_DEFAULTS):
        assert config._schema_at(key.split(".")) is not None, key


def test_schema_nodes_use_only_json_schema_keywords():
    """A comma in an unquoted flow-style description splits it into stray keys."""
    vocabulary = {"type", "description", "minimum", "maximum", "exclusiveMinimum",
                  "exclusiveMaximum", "enum", "anyOf", "items", "properties",
                  "additionalProperties", "$ref"}

    def stray(node, path):
        for key, sub in node.get("properties", {}).items():
            yield from ((f"{path}.{key}", k) for k in set(sub) - vocabulary)
            yield from stray(sub, f"{path}.{key}")

    assert list(stray(config.schema(), "")) == []


def test_env_var_is_read_and_named_as_source(monkeypatch):
    monkeypatch.setenv("DASK_LITHOPS__LOCALHOST__WORKER_PROCESSES", "3")
    dask.config.refresh()
    try:
        value, source = config.get_with_source("localhost.worker_processes")
        assert value == 3
        assert source == "env DASK_LITHOPS__LOCALHOST__WORKER_PROCESSES"
    finally:
        monkeypatch.delenv("DASK_LITHOPS__LOCALHOST__WORKER_PROCESSES")
        dask.config.refresh()


def test_precedence_keyword_over_dask_over_lithops_file(lithops_file):
    lithops_file("""
        lithops:
          backend: localhost
        localhost:
          worker_processes: 5
    """)
    assert config.get_with_source("localhost.worker_processes")[0] == 5
    assert config.get_with_source("localhost.worker_processes")[1].startswith("lithops config")
    with dask.config.set({"lithops.localhost.worker_processes": 4}):
        assert config.get("localhost.worker_processes") == 4
        assert config.get("localhost.worker_processes", override_with=2) == 2
    assert config.resolve_mode() == ("localhost", "localhost")


def test_lithops_file_sections_map_to_modes(lithops_file):
    lithops_file("""
        lithops:
          backend: aws_lambda
          storage: aws_s3
        aws_lambda:
          not_a_key_of_ours: 1
    """)
    assert config.resolve_mode() == ("serverless", "aws_lambda")
    lithops_file("""
        lithops:
          mode: standalone
    """)
    assert config.resolve_mode() == ("standalone", "ssh")


def test_nothing_configured_means_localhost():
    assert config.resolve_mode() == ("localhost", "localhost")


def test_lithops_file_is_found_in_cwd(tmp_path):
    (tmp_path / ".lithops_config").write_text("localhost:\n  worker_processes: 7\n")
    assert config.lithops_config_file() == str(tmp_path / ".lithops_config")
    assert config.get("localhost.worker_processes") == 7


@pytest.mark.parametrize("key, value, allowed", [
    ("lithops.localhost.n_workers", "many", "integer/null >= 0"),
    ("lithops.localhost.worker_processes", 0, "integer >= 1"),
    ("lithops.localhost.nanny", "yes", "boolean"),
    ("lithops.cluster.scheduler_port", 70000, "<= 65535"),
    ("lithops.mode", "cloud", "'localhost', 'serverless', 'standalone'"),
])
def test_bad_dask_config_value_names_key_and_allowed(key, value, allowed):
    with dask.config.set({key: value}):
        with pytest.raises(ConfigError) as e:
            LocalhostCluster(n_workers=1)
    assert key in str(e.value)
    assert allowed in str(e.value)


def test_unknown_key_is_an_error_listing_known_keys():
    with dask.config.set({"lithops.localhost.n_wrkers": 2}):
        with pytest.raises(ConfigError, match="unknown key lithops.localhost.n_wrkers.*n_workers"):
            config.validate_current()


def test_bad_keyword_fails_before_anything_starts():
    with pytest.raises(ConfigError, match="threads_per_worker.*integer/null >= 1"):
        LocalhostCluster(threads_per_worker=0)
    with pytest.raises(ConfigError, match="worker_processes"):
        LocalhostCluster(worker_processes="lots")


def test_bad_lithops_file_value_names_key(lithops_file):
    lithops_file("""
        localhost:
          worker_processes: -1
    """)
    with pytest.raises(ConfigError, match="lithops.localhost.worker_processes = -1"):
        LocalhostCluster()


def test_cluster_factory_rejects_unknown_backend():
    with pytest.raises(ConfigError, match="lithops.backend = 'gcp_cloudrun'.*allowed.*aws_lambda"):
        Cluster(backend="gcp_cloudrun")
    with pytest.raises(ConfigError, match="belongs to mode 'standalone'"):
        Cluster(mode="serverless", backend="ssh")


def test_config_show_cli_prints_values_and_sources(lithops_file):
    path = lithops_file("""
        localhost:
          worker_processes: 6
    """)
    env = {**os.environ, "DASK_LITHOPS__CLUSTER__DEATH_TIMEOUT": "30s"}
    out = subprocess.run([sys.executable, "-m", "dask_lithops.cli", "config", "show"],
                         capture_output=True, text=True, env=env, check=True).stdout
    assert f"# Lithops config file: {path}" in out
    assert f"lithops.localhost.worker_processes = 6    [lithops config {path}]" in out
    assert ("lithops.cluster.death_timeout = '30s'    "
            "[env DASK_LITHOPS__CLUSTER__DEATH_TIMEOUT]") in out
    assert "lithops.localhost.nanny = True    [default]" in out


def test_config_show_cli_fails_clearly_on_bad_env():
    env = {**os.environ, "DASK_LITHOPS__LOCALHOST__NANNY": "'maybe'"}
    r = subprocess.run([sys.executable, "-m", "dask_lithops.cli", "config", "show"],
                       capture_output=True, text=True, env=env)
    assert r.returncode != 0
    assert "lithops.localhost.nanny = 'maybe' is invalid; allowed: boolean" in r.stderr


def test_standalone_sections_say_what_they_hold(lithops_file):
    """lithops.ssh: SSH logins; lithops.standalone: the cluster on the hosts (and VM keys);
    Lithops' own `standalone` and `vm` sections land there."""
    from dask_lithops import StandaloneCluster

    lithops_file("""
        lithops:
          backend: vm
        vm:
          ip_address: 10.1.2.3
          ssh_username: ubuntu
        standalone:
          exec_mode: reuse
          use_gpu: false
    """)
    assert config.get_with_source("ssh.hosts")[0] == ["ubuntu@10.1.2.3"]
    assert config.get_with_source("standalone.exec_mode")[1].startswith("lithops config")
    assert config.get("standalone.scheduler") == "auto"
    with dask.config.set({"lithops.standalone.scheduler": "far"}):
        with pytest.raises(ConfigError, match="lithops.standalone.scheduler = 'far' is invalid; "
                                              "allowed: one of 'auto', 'local', 'remote'"):
            StandaloneCluster(hosts=["root@10.1.2.3"])
    with pytest.raises(ConfigError, match="lithops.ssh.connect_timeout = 0"):
        StandaloneCluster(hosts=["root@10.1.2.3"], connect_timeout=0)


def test_lithops_file_keys_are_the_keys_the_mapping_reads():
    """The configuration reference's "Lithops config file" column (config.lithops_file_keys)
    names exactly where map_lithops_config reads each key from."""
    general = {"lithops.mode": "serverless", "lithops.backend": "aws_lambda",
               "lithops.storage": "aws_s3", "lithops.log_level": "debug"}
    checked = 0
    for key, default in config.leaves(config.PACKAGE_DEFAULTS):
        for source in config.lithops_file_keys(key):
            if source.startswith("vm."):
                continue
            value = general.get(key, "a value" if default is None else default)
            data: dict = value
            for part in reversed(source.split(".")):
                data = {part: data}
            mapped = config.map_lithops_config(data)
            checked += 1
            assert config._lookup(mapped, key, default="<missing>") == value, (key, source)
    assert checked > 50
    assert config.lithops_file_keys("ssh.hosts") == ["ssh.hosts", "vm.ip_address",
                                                     "vm.ssh_username"]
    assert config.lithops_file_keys("cluster.death_timeout") == []
