#!/usr/bin/env bash
# Set up (ci/setup.sh, no system packages needed) and run the quickstart on LocalhostCluster.
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_SYSTEM=0 bash ci/setup.sh
.venv/bin/python examples/quickstart.py "$@"
