#!/usr/bin/env bash
# Set up a fresh machine (Python 3.11 + pip): system packages the tests need,
# a virtualenv in .venv with dask-lithops and its extras. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WITH_SYSTEM=${WITH_SYSTEM:-1}

if [ "$WITH_SYSTEM" = 1 ]; then
  need=()
  command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ] || need+=(openssh-server)
  command -v ssh-keygen >/dev/null 2>&1 || need+=(openssh-client)
  command -v nft >/dev/null 2>&1 || [ -x /usr/sbin/nft ] || need+=(nftables)
  command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || need+=(iproute2)
  # the SSH test hosts' bare system Python builds its runtime venv with venv/ensurepip
  [ -x /usr/bin/python3 ] || need+=(python3)
  /usr/bin/python3 -c "import ensurepip, venv" >/dev/null 2>&1 || need+=(python3-venv)
  if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "ci/setup.sh: installing ${need[*]}"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    else
      echo "ci/setup.sh: ${need[*]} missing and not root with apt-get: the tests that need them will skip" >&2
    fi
  fi
fi

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
log=$(mktemp)
if ! { .venv/bin/python -m pip install -q --upgrade pip && \
       .venv/bin/python -m pip install -q -e ".[all,test,docs]"; } >"$log" 2>&1; then
  cat "$log" >&2; rm -f "$log"
  echo "ci/setup.sh: pip install failed" >&2; exit 1
fi
rm -f "$log"
.venv/bin/python -c "import dask_lithops, distributed, boto3, paramiko, awslambdaric" \
  || { echo "ci/setup.sh: installation failed" >&2; exit 1; }
