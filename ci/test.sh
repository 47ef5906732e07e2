#!/usr/bin/env bash
# Set up (ci/setup.sh) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
.venv/bin/ruff check .
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet  # the docs site (offline)
set +e
.venv/bin/python -m pytest -ra -p no:cacheprovider --durations=15 "$@"
rc=$?
set -e
# pytest's 5 means "no tests collected": a broken suite, not a pass.
exit $rc
