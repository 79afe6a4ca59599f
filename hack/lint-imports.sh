#!/usr/bin/env bash
# Run the import-linter contracts. grimp finds modules on the file system, but our packages live in
# top-level folders that setuptools maps to agentbox.* at import time, so give it a real agentbox/ tree
# of symlinks to those folders.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
view=$(mktemp -d)
trap 'rm -rf "$view"' EXIT
mkdir -p "$view/agentbox"
for package in crds operator api sandbox; do ln -s "$root/$package" "$view/agentbox/$package"; done
cd "$root"
PYTHONPATH="$view${PYTHONPATH:+:$PYTHONPATH}" "${VENV:-.venv}/bin/lint-imports" --no-cache "$@"
