#!/usr/bin/env bash
# Installs the official SDKs used as real clients by tests/sdk_compat.rs:
# Python `openai` and `anthropic` into .sdk/venv, Node `openai` into tests/sdk/node_modules.
# Versions are pinned in tests/sdk/requirements.txt and tests/sdk/package-lock.json.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if [ ! -x .sdk/venv/bin/python ]; then
  "$python" -m venv .sdk/venv
fi
.sdk/venv/bin/pip install --quiet --disable-pip-version-check -r tests/sdk/requirements.txt

(cd tests/sdk && npm ci --no-audit --no-fund --loglevel=error)

echo "sdk-setup: $(.sdk/venv/bin/python -c 'import openai; print("python openai", openai.__version__)'), node openai $(node -p 'require("./tests/sdk/node_modules/openai/package.json").version')"
