"""mkdocs hooks: pages generated at build time, so they can never go stale.

* ``index.md`` -- the README, its links rewritten for the site;
* ``configuration.md`` -- every key of ``lithops-schema.yaml``: its default
  (``lithops.yaml``), allowed values (the words the config errors use), the
  Lithops config-file key it is read from, and its description (the schema's,
  else the comment beside it in ``lithops.yaml``);
* ``api/<package>.md`` -- the API reference (mkdocstrings) of every module of
  ``dask_lithops`` except the test world's: the top-level modules, then one page
  per subpackage; the nav entry "API reference" lists them (:func:`on_config`).

And a check: a page of docs/ missing from the nav of ``mkdocs.yml`` is a warning,
so ``mkdocs build --strict`` (ci/test.sh) fails until it is added.
"""

from __future__ import annotations

import logging
import os
import re

from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.dask_lithops")  # a warning fails `mkdocs build --strict`

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "dask_lithops")
SKIP = {"testing"}  # the test world has its own pages (docs/*-emulator.md)


def subpackages() -> list[str]:
    return sorted(d for d in os.listdir(PACKAGE) if d not in SKIP
                  and os.path.exists(os.path.join(PACKAGE, d, "__init__.py")))


def api_nav() -> list[dict]:
    return [{"Core": "api/core.md"}] + [{name: f"api/{name}.md"} for name in subpackages()]


def on_config(config):
    for item in config["nav"] or []:
        if isinstance(item, dict) and "API reference" in item:
            item["API reference"] = api_nav()
    return config


def on_files(files, config):
    pages = {"index.md": index_page(), "configuration.md": configuration_page()}
    pages.update(api_pages())
    for uri, content in pages.items():
        if files.get_file_from_path(uri) is None:
            files.append(File.generated(config, uri, content=content))
    return files


def on_nav(nav, config, files):
    in_nav = {page.file.src_uri for page in nav.pages}
    for f in files.documentation_pages():
        if f.src_uri not in in_nav:
            log.warning("docs/%s is not in the nav of mkdocs.yml: add it there", f.src_uri)
    return nav


# -- index ---------------------------------------------------------------------------------------
def index_page() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    text = re.sub(r"\]\(docs/", "](", text)
    return re.sub(r"\]\(dask_lithops/lithops(-schema)?\.yaml\)", "](configuration.md)", text)


# -- configuration reference -----------------------------------------------------------------------
def yaml_comments(path: str) -> dict[str, str]:
    """``{dotted key: the comment beside it}`` of a block-style YAML file."""
    out, stack = {}, []
    with open(path) as f:
        for line in f:
            m = re.match(r"^(\s*)([A-Za-z0-9_]+):(.*)$", line)
            if not m:
                continue
            indent, key, rest = len(m.group(1)), m.group(2), m.group(3)
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, key))
            if "#" in rest:
                out[".".join(k for _, k in stack)] = rest.split("#", 1)[1].strip()
    return out


def configuration_page() -> str:
    from dask_lithops import config

    comments = yaml_comments(config.DEFAULTS_FILE)
    root = config.schema()["properties"][config.NAMESPACE]
    lines = [
        "# Configuration reference",
        "",
        "Generated from `dask_lithops/lithops-schema.yaml` (the allowed values) and",
        "`dask_lithops/lithops.yaml` (the defaults) when the site is built.",
        "",
        "Every key lives in the dask config namespace `lithops`: set it in a dask config",
        "file, as `DASK_LITHOPS__<SECTION>__<KEY>`, with `dask.config.set`, as a keyword",
        "argument of the cluster, or in Lithops' own config file (`~/.lithops/config`,",
        "`$LITHOPS_CONFIG_FILE`) under the key in the *Lithops config file* column.",
        "Precedence, highest first: keyword > dask config > Lithops config file > default.",
        "`dask-lithops config show` prints every resolved value and where it came from.",
        "",
    ]
    top = [(k, v) for k, v in root["properties"].items() if v.get("type") != "object"]
    sections = [(k, v) for k, v in root["properties"].items() if v.get("type") == "object"]
    lines += ["## lithops", ""] + table(config, comments, "lithops", top)
    for name, node in sections:
        lines += [f"## lithops.{name}", ""]
        comment = comments.get(f"lithops.{name}") or node.get("description")
        if comment:
            lines += [comment[0].upper() + comment[1:], ""]
        lines += table(config, comments, f"lithops.{name}", list(node["properties"].items()))
    return "\n".join(lines) + "\n"


def table(config, comments, prefix, items) -> list[str]:
    rows = ["| Key | Default | Allowed | Lithops config file | Description |",
            "|---|---|---|---|---|"]
    for key, node in items:
        dotted = f"{prefix}.{key}"
        default = config._lookup(config.PACKAGE_DEFAULTS, dotted)
        own = node.get("description")  # the key's own, before a shared $defs one
        node = config._deref(node)
        allowed = config._describe({k: v for k, v in node.items()  # a $defs text explains
                                    if not (k == "description" and v == own)})  # the format
        if node.get("type") == "object" and "properties" in node:
            allowed = "mapping of " + ", ".join(node["properties"])
        description = own or comments.get(dotted) or node.get("description", "")
        lithops = ", ".join(f"`{k}`" for k in config.lithops_file_keys(dotted)) or "-"
        rows.append(f"| `{key}` | `{as_yaml(default)}` | {cell(allowed)} | {lithops} | "
                    f"{cell(description)} |")
    return rows + [""]


def as_yaml(value) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


# -- API reference ---------------------------------------------------------------------------------
def modules(subpackage: str | None) -> list[str]:
    """Dotted names of the top-level modules of ``dask_lithops``, or of one subpackage's."""
    base = PACKAGE if subpackage is None else os.path.join(PACKAGE, subpackage)
    out = []
    for dirpath, dirnames, filenames in os.walk(base):
        rel = os.path.relpath(dirpath, PACKAGE)
        dirnames[:] = [] if subpackage is None else sorted(d for d in dirnames
                                                           if d != "__pycache__")
        for fn in sorted(filenames):
            if not fn.endswith(".py") or fn == "__main__.py":
                continue
            parts = [] if rel == "." else rel.split(os.sep)
            if fn != "__init__.py":
                parts.append(fn[:-3])
            out.append(".".join(["dask_lithops", *parts]))
    return out


def api_page(title: str, subpackage: str | None) -> str:
    lines = [f"# API: {title}", ""]
    for module in modules(subpackage):
        lines += [f"## `{module}`", "", f"::: {module}", "    options:",
                  "      show_root_heading: false", "      heading_level: 3", ""]
    return "\n".join(lines)


def api_pages() -> dict[str, str]:
    pages = {"api/core.md": api_page("core (clusters, payloads, config, worker)", None)}
    pages.update({f"api/{name}.md": api_page(name, name) for name in subpackages()})
    return pages
