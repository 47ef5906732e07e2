"""ServerlessCluster(backend="gcp_functions") (Cloud Run functions, Cloud Functions v2 API).

The end-to-end tests run against the offline Cloud Run functions emulator
(``dask_lithops.testing.gcp_functions_emulator``): the v2 API, a build step
that pip-installs the uploaded ``requirements.txt``, and a front end that
routes each request to the real ``functions-framework`` in an outbound-only
sandbox.  The tests here without it check what fails before anything runs.
"""

from __future__ import annotations

import json
import zipfile

import pytest

pytest.importorskip("google.auth")
pytest.importorskip("httpx")

from dask_lithops import config  # noqa: E402
from dask_lithops.serverless import ServerlessCluster  # noqa: E402

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def credentials_file(tmp_path):
    """A service-account key as Google issues them (the key is a fresh RSA key)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    path = tmp_path / "key.json"
    path.write_text(json.dumps({
        "type": "service_account", "project_id": "from-the-key", "private_key_id": "k1",
        "private_key": pem, "client_email": "dask@from-the-key.iam.gserviceaccount.com",
        "client_id": "1", "token_uri": "http://127.0.0.1:9/token"}))
    return str(path)


# --------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, message", [
    ({"runtime_memory": 64}, r"gcp_functions.runtime_memory = 64 is invalid; allowed: .*128.*32768"),
    ({"runtime_memory": 40000}, r"runtime_memory = 40000 is invalid"),
    ({"runtime_timeout": 3601}, r"gcp_functions.runtime_timeout = 3601 is invalid; allowed: .*3600"),
    ({"runtime_cpu": 9}, r"runtime_cpu = 9 is invalid"),
    ({"runtime_memory": 8192, "runtime_cpu": 1}, r"runtime_cpu = 1 is invalid with "
                                                 r"runtime_memory = 8192: .* at least 2"),
    ({"ingress": "OPEN"}, r"gcp_functions.ingress = 'OPEN' is invalid; allowed: .*ALLOW_ALL"),
    ({"max_workers": 0}, r"max_workers = 0 is invalid"),
    ({"credentials_path": "/nonexistent/key.json"}, r"credentials_path = .* is not a file"),
    ({"architecture": "arm64"}, r"architecture: not an option of "
                                r"ServerlessCluster\(backend='gcp_functions'\)"),
])
def test_bad_input_fails_before_anything(kwargs, message, credentials_file):
    kwargs.setdefault("credentials_path", credentials_file)
    with pytest.raises(config.ConfigError, match=message):
        ServerlessCluster(backend="gcp_functions", endpoint_url="http://127.0.0.1:9",
                          contact_address="127.0.0.1", **kwargs)


def test_google_cloud_needs_project_region_and_contact_address(monkeypatch, tmp_path):
    for var in ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT",
                "CLOUDSDK_CORE_PROJECT", "LITHOPS_CONFIG_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(config.ConfigError, match=r"lithops.gcp.project_name is required"):
        ServerlessCluster(backend="gcp_functions", contact_address="127.0.0.1")
    with pytest.raises(config.ConfigError, match=r"gcp_functions.region .* is required"):
        ServerlessCluster(backend="gcp_functions", project_name="p", contact_address="127.0.0.1")
    with pytest.raises(config.ConfigError, match=r"contact_address is required"):
        ServerlessCluster(backend="gcp_functions", project_name="p", region="europe-west1")


def test_lithops_config_file_gcp_sections(monkeypatch, tmp_path, credentials_file):
    """Lithops' `gcp` and `gcp_functions` sections, with Lithops' key names."""
    from dask_lithops.serverless.backends import backend_class

    path = tmp_path / "lithops_config"
    path.write_text(
        "lithops:\n  backend: gcp_functions\n"
        "gcp:\n  project_name: my-project\n  region: europe-west4\n"
        f"  credentials_path: {credentials_file}\n  service_account: sa@my-project.iam\n"
        "gcp_functions:\n  runtime_memory: 2048\n  runtime_timeout: 600\n  max_workers: 50\n"
        "  invoke_pool_threads: 8\n  trigger: https\n")  # a Lithops key we have no use for
    monkeypatch.setenv("LITHOPS_CONFIG_FILE", str(path))
    assert config.resolve_mode() == ("serverless", "gcp_functions")
    cls = backend_class("gcp_functions")
    backend = cls(cls.resolve_config())
    assert (backend.project, backend.region) == ("my-project", "europe-west4")
    assert (backend.memory, backend.timeout, backend.config["max_workers"]) == (2048, 600, 50)
    assert backend.config["service_account"] == "sa@my-project.iam"
    assert backend.vcpus == 1.0 and backend.threads_for_memory(2048) == 1
    # the keyword wins over the file
    assert cls(cls.resolve_config(runtime_memory=4096)).vcpus == 2.0


# --------------------------------------------------------------------- the runtime


def test_source_package_pins_the_clients_versions(tmp_path):
    import importlib.metadata as md
    import sys

    from dask_lithops.serverless.backends.gcp_functions.packaging import (
        ENTRY_POINT,
        build_source_package,
    )

    pkg = build_source_package("default", extra_packages=["pandas"], cache_dir=tmp_path)
    z = zipfile.ZipFile(pkg.source_zip)
    names = z.namelist()
    requirements = z.read("requirements.txt").decode().split()
    assert requirements == pkg.requirements
    for dist in ("dask", "distributed", "cloudpickle", "msgpack", "tornado", "pandas", "numpy"):
        assert f"{dist}=={md.version(dist)}" in requirements, dist
    assert not [r for r in requirements if r.startswith(("dask-lithops", "pip=", "jsonschema"))]
    assert f"import handle_request as {ENTRY_POINT}" in z.read("main.py").decode()
    assert "dask_lithops/serverless/backends/gcp_functions/handler.py" in names
    assert any(n.startswith("dask_lithops-") and n.endswith("entry_points.txt") for n in names)
    assert pkg.gcp_runtime == "python%d%d" % sys.version_info[:2]
    again = build_source_package("default", extra_packages=["pandas"], cache_dir=tmp_path)
    assert again.version == pkg.version and again.source_zip == pkg.source_zip


def test_function_resource(credentials_file, tmp_path):
    """What deploy sends: buildConfig and serviceConfig as the v2 API defines them."""
    from dask_lithops.serverless.backends.gcp_functions.backend import GCPFunctionsBackend
    from dask_lithops.serverless.backends.gcp_functions.packaging import build_source_package

    cfg = GCPFunctionsBackend.resolve_config(
        credentials_path=credentials_file, region="us-east1", runtime_memory=1024,
        max_workers=7, vpc_connector="projects/p/locations/us-east1/connectors/c",
        vpc_egress="ALL_TRAFFIC", labels={"Team": "Data Science"}, service_account="sa@x")
    backend = GCPFunctionsBackend(cfg)
    assert backend.project == "from-the-key"  # the key's project_id
    pkg = build_source_package("default", cache_dir=tmp_path)
    body = backend.function_body(pkg, 1024, 600, {"bucket": "b", "object": "o"})
    name = f"dask-lithops-default-{pkg.version}-1024mb"
    assert body["name"] == f"projects/from-the-key/locations/us-east1/functions/{name}"
    assert backend.parse_runtime_key(name) == ("default", pkg.version, 1024)
    assert body["buildConfig"] == {"runtime": pkg.gcp_runtime, "entryPoint": "dask_lithops_handler",
                                   "source": {"storageSource": {"bucket": "b", "object": "o"}}}
    service = body["serviceConfig"]
    assert service["availableMemory"] == "1024Mi" and service["availableCpu"] == "0.583"
    assert service["timeoutSeconds"] == 600 and service["maxInstanceCount"] == 7
    assert service["maxInstanceRequestConcurrency"] == 1
    assert service["serviceAccountEmail"] == "sa@x"
    assert service["vpcConnectorEgressSettings"] == "ALL_TRAFFIC"
    assert service["environmentVariables"]["DASK_LITHOPS_TIMEOUT"] == "600"
    assert body["labels"]["team"] == "data-science" and body["labels"]["dask-lithops"] == "true"
