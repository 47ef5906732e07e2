"""Configuration: dask config namespace ``lithops``, plus Lithops' own config file.

Precedence, highest first: keyword argument > dask config (files, ``DASK_LITHOPS__*``
env vars, ``dask.config.set``) > Lithops config file > package defaults
(``lithops.yaml``).  Every key is described in ``lithops-schema.yaml``; a bad
value fails with :class:`ConfigError` naming the key and the allowed values.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from functools import lru_cache
from typing import Any

import dask.config
import yaml

_HERE = os.path.dirname(__file__)
DEFAULTS_FILE = os.path.join(_HERE, "lithops.yaml")
SCHEMA_FILE = os.path.join(_HERE, "lithops-schema.yaml")
NAMESPACE = "lithops"

# Sections of ours that Lithops' config file does not have; every other section
# maps one to one onto a Lithops section (same key names).
OWN_SECTIONS = ("cluster", "relay", "serverless")


def _serverless_backends() -> tuple[str, ...]:
    from dask_lithops.serverless.backends import BACKENDS  # a plain registry: no imports

    return tuple(BACKENDS)


MODE_OF_BACKEND = {
    "localhost": "localhost",
    **{name: "serverless" for name in _serverless_backends()},
    "ssh": "standalone",
    "vm": "standalone",
    "aws_ec2": "standalone",
}
DEFAULT_BACKEND = {"localhost": "localhost", "serverless": "aws_lambda", "standalone": "ssh"}
_MISSING = object()


class ConfigError(ValueError):
    """A configuration value (keyword, dask config or Lithops file) is invalid."""


def _load_yaml(path: str) -> dict:
    with open(path) as f:
        return yaml.safe_load(f) or {}


PACKAGE_DEFAULTS: dict = _load_yaml(DEFAULTS_FILE)
dask.config.update_defaults(PACKAGE_DEFAULTS)
LITHOPS_SECTIONS = tuple(k for k, v in PACKAGE_DEFAULTS[NAMESPACE].items()
                         if isinstance(v, dict) and k not in OWN_SECTIONS)


@lru_cache(maxsize=1)
def schema() -> dict:
    return _load_yaml(SCHEMA_FILE)


# --------------------------------------------------------------------------- Lithops file


def lithops_config_file() -> str | None:
    """The Lithops config file in effect, searched in Lithops' own order."""
    if os.environ.get("LITHOPS_CONFIG_FILE"):
        return os.environ["LITHOPS_CONFIG_FILE"]
    for candidate in (
        os.path.abspath(".lithops_config"),
        os.path.expanduser("~/.lithops/config"),
        "/etc/lithops/config",
    ):
        if os.path.exists(candidate):
            return candidate
    return None


@lru_cache(maxsize=8)
def _read_lithops_file(path: str, mtime: float) -> dict:
    try:
        data = _load_yaml(path)
    except yaml.YAMLError as e:
        raise ConfigError(f"Lithops config file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"Lithops config file {path} must be a mapping of sections")
    return map_lithops_config(data)


def map_lithops_config(data: Mapping) -> dict:
    """Map a Lithops config (its sections) onto our ``lithops`` namespace.

    Keys we do not know are left out (Lithops has storage and other backends
    that do not concern Dask); known keys are validated like any other value.
    """
    ours: dict[str, Any] = {}
    general = data.get("lithops") or {}
    backend = general.get("backend")
    if backend:
        ours["backend"] = "ssh" if backend == "vm" else backend
        ours["mode"] = MODE_OF_BACKEND.get(backend, general.get("mode"))
    elif general.get("mode"):
        ours["mode"] = general["mode"]
    if general.get("storage"):
        ours["storage"] = general["storage"]
    if general.get("log_level"):
        ours["log_level"] = str(general["log_level"]).lower()
    known = PACKAGE_DEFAULTS[NAMESPACE]
    for section in LITHOPS_SECTIONS:
        values = data.get(section)
        if not isinstance(values, Mapping) or section not in known:
            continue
        ours[section] = {k: v for k, v in values.items() if k in known[section]}
    vm = data.get("vm")
    if isinstance(vm, Mapping) and "ssh" in known:
        # Lithops' "vm" backend (consume one existing host) -> our ssh backend
        mapped = {}
        if vm.get("ip_address"):
            user = vm.get("ssh_username")
            mapped["hosts"] = [f"{user}@{vm['ip_address']}" if user else vm["ip_address"]]
        if vm.get("ssh_key_filename"):
            mapped["ssh_key_filename"] = vm["ssh_key_filename"]
        ours.setdefault("ssh", {}).update({k: v for k, v in mapped.items() if k in known["ssh"]})
    return {NAMESPACE: ours}


# Keys of Lithops' `lithops` section we read, and how its `vm` section maps onto `ssh`.
GENERAL_KEYS = ("mode", "backend", "storage", "log_level")
VM_SECTION_KEYS = {"hosts": ("vm.ip_address", "vm.ssh_username"),
                   "ssh_key_filename": ("vm.ssh_key_filename",)}


def lithops_file_keys(key: str) -> list[str]:
    """The Lithops config-file keys that set ``key`` (as :func:`map_lithops_config` reads them)."""
    parts = _full(key).split(".")[1:]
    if len(parts) == 1:
        return [f"lithops.{parts[0]}"] if parts[0] in GENERAL_KEYS else []
    section, name = parts[0], parts[1]
    out = [f"{section}.{'.'.join(parts[1:])}"] if section in LITHOPS_SECTIONS else []
    if section == "ssh":
        out += list(VM_SECTION_KEYS.get(name, ()))
    return out


def lithops_file_config() -> tuple[str | None, dict]:
    path = lithops_config_file()
    if path is None:
        return None, {}
    if not os.path.exists(path):
        raise ConfigError(f"LITHOPS_CONFIG_FILE={path} does not exist")
    return path, _read_lithops_file(path, os.path.getmtime(path))


# --------------------------------------------------------------------------- lookup


def _lookup(tree: Mapping, dotted: str, default=_MISSING):
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping):
            return default
        # dask treats - and _ alike in keys
        if part in node:
            node = node[part]
        elif part.replace("_", "-") in node:
            node = node[part.replace("_", "-")]
        elif part.replace("-", "_") in node:
            node = node[part.replace("-", "_")]
        else:
            return default
    return node


def _full(key: str) -> str:
    return key if key.startswith(NAMESPACE + ".") else f"{NAMESPACE}.{key}"


def get(key: str, override_with: Any = None) -> Any:
    """Resolved value of ``key`` (``"localhost.n_workers"`` or ``"lithops.localhost.n_workers"``).

    ``override_with`` wins when not None, like ``dask.config.get``'s argument.
    """
    return get_with_source(key, override_with)[0]


def get_with_source(key: str, override_with: Any = None) -> tuple[Any, str]:
    full = _full(key)
    if override_with is not None:
        return override_with, "keyword"
    default = _lookup(PACKAGE_DEFAULTS, full)
    value = dask.config.get(full, default=default if default is not _MISSING else None)
    if default is _MISSING or value != default:
        return value, _dask_source(full)
    path, mapped = lithops_file_config()
    from_file = _lookup(mapped, full)
    if from_file is not _MISSING:
        return from_file, f"lithops config {path}"
    return value, "default"


def _dask_source(full: str) -> str:
    env = dask.config.collect_env()
    if _lookup(env, full) is not _MISSING:
        return "env DASK_" + full.upper().replace(".", "__").replace("-", "_")
    for path in dask.config.paths:
        for p in _yaml_files(path):
            try:
                data = _load_yaml(p)
            except Exception:
                continue
            if _lookup(data, full) is not _MISSING:
                return f"dask config {p}"
    return "dask config"


def _yaml_files(path: str) -> Iterator[str]:
    if os.path.isdir(path):
        for name in sorted(os.listdir(path)):
            if name.endswith((".yaml", ".yml")):
                yield os.path.join(path, name)
    elif os.path.exists(path):
        yield path


def leaves(tree: Mapping, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in tree.items():
        dotted = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            yield from leaves(v, dotted)
        else:
            yield dotted, v


def resolved() -> list[tuple[str, Any, str]]:
    """Every key of the namespace with its resolved value and where it came from."""
    keys = {k for k, _ in leaves(PACKAGE_DEFAULTS)}
    keys |= {f"{NAMESPACE}.{k}" for k, _ in leaves(dask.config.get(NAMESPACE, {}) or {})}
    keys |= {k for k, _ in leaves(lithops_file_config()[1])}
    return [(k, *get_with_source(k)) for k in sorted(keys)]


# --------------------------------------------------------------------------- validation


def _describe(node: Mapping) -> str:
    node = _deref(node)
    if "enum" in node:
        return "one of " + ", ".join("null" if v is None else repr(v) for v in node["enum"])
    if "anyOf" in node:
        return " or ".join(_describe(n) for n in node["anyOf"])
    parts = []
    types = node.get("type")
    if types:
        types = [types] if isinstance(types, str) else types
        parts.append("/".join(t for t in types))
    if "minimum" in node:
        parts.append(f">= {node['minimum']}")
    if "exclusiveMinimum" in node:
        parts.append(f"> {node['exclusiveMinimum']}")
    if "maximum" in node:
        parts.append(f"<= {node['maximum']}")
    if "exclusiveMaximum" in node:
        parts.append(f"< {node['exclusiveMaximum']}")
    text = " ".join(parts)
    if node.get("description"):
        text = f"{text} ({node['description']})" if text else node["description"]
    return text or "any value"


def _deref(node: Mapping) -> Mapping:
    ref = node.get("$ref")
    if ref:
        target = schema()
        for part in ref.lstrip("#/").split("/"):
            target = target[part]
        return {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def _schema_at(path: list[str]) -> Mapping | None:
    node: Mapping = schema()
    for part in path:
        props = node.get("properties", {})
        if part not in props:
            return None
        node = props[part]
    return node


def validate(tree: Mapping) -> None:
    """Check a (partial) ``{"lithops": {...}}`` tree against the schema."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(_normalise(tree)), key=lambda e: list(e.path))
    if not errors:
        return
    messages = []
    for err in errors:
        path = [str(p) for p in err.path]
        if err.validator == "additionalProperties":
            node = _schema_at(path) or {}
            unknown = sorted(set(err.instance) - set(node.get("properties", {})))
            for u in unknown:
                messages.append(
                    f"unknown key {'.'.join(path + [u])}; known keys: "
                    + ", ".join(sorted(node.get("properties", {})))
                )
            continue
        key = ".".join(path)
        node = _schema_at(path) or err.schema
        messages.append(f"{key} = {err.instance!r} is invalid; allowed: {_describe(node)}")
    raise ConfigError("Invalid dask-lithops configuration:\n  " + "\n  ".join(messages))


def _normalise(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {str(k).replace("-", "_"): _normalise(v) for k, v in tree.items()}
    return tree


def validate_current(overrides: Mapping[str, Any] | None = None) -> None:
    """Validate the Lithops file, the dask config and keyword overrides ("localhost.n_workers").

    Each is checked on its own, so a bad value is reported even where a higher
    layer overrides it.
    """
    path, mapped = lithops_file_config()
    if mapped:
        try:
            validate(mapped)
        except ConfigError as e:
            raise ConfigError(f"{e}\n(from the Lithops config file {path})") from None
    validate({NAMESPACE: dask.config.get(NAMESPACE, {}) or {}})
    tree: dict = {NAMESPACE: {}}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        node = tree
        parts = _full(key).split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    validate(tree)


def section(section_name: str, /, **overrides: Any) -> dict:
    """Resolved values of one section (e.g. ``"localhost"``), validated, with keyword overrides."""
    validate_current({f"{section_name}.{k}": v for k, v in overrides.items()})
    keys = _lookup(PACKAGE_DEFAULTS, f"{NAMESPACE}.{section_name}")
    if keys is _MISSING:
        raise ConfigError(f"unknown config section lithops.{section_name}")
    return {k: get(f"{section_name}.{k}", overrides.get(k)) for k in keys}


def resolve_mode(mode: str | None = None, backend: str | None = None) -> tuple[str, str]:
    """Mode and backend the way Lithops' ``FunctionExecutor()`` picks them.

    A backend implies its mode; a mode alone takes its default backend; with
    nothing configured anywhere the mode is localhost.
    """
    mode = get("mode", mode)
    backend = get("backend", backend)
    if backend == "vm":
        backend = "ssh"
    if backend:
        if backend not in MODE_OF_BACKEND:
            raise ConfigError(
                f"lithops.backend = {backend!r} is invalid; allowed: "
                + ", ".join(sorted(MODE_OF_BACKEND))
            )
        implied = MODE_OF_BACKEND[backend]
        if mode and mode != implied:
            raise ConfigError(
                f"lithops.backend = {backend!r} belongs to mode {implied!r}, "
                f"but lithops.mode = {mode!r}"
            )
        return implied, backend
    mode = mode or "localhost"
    if mode not in DEFAULT_BACKEND:
        raise ConfigError(
            f"lithops.mode = {mode!r} is invalid; allowed: " + ", ".join(DEFAULT_BACKEND)
        )
    return mode, DEFAULT_BACKEND[mode]
