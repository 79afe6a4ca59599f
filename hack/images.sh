#!/usr/bin/env bash
# The project's images, built on this machine with no Docker and no registry (`make images`):
#   1. a Debian base made by debootstrap (python3 is 3.11 on bookworm, the project's version), its root
#      filesystem cached under $AGENTBOX_CACHE/images per suite, committed as localhost/agentbox/debian-python;
#   2. buildah builds of Dockerfile (control plane), sandbox/images/Dockerfile (sandbox) and, per runtime
#      that sandbox/images/agents.json pins, sandbox/images/Dockerfile.agent (the runner and that agent,
#      on Node.js and the agent package from the npm registry) FROM that base, tagged with the names the
#      chart and the operator use, so pods find them without pulling;
#   3. docker archives of each under $AGENTBOX_CACHE/images/archives, imported into the real node's
#      containerd (hack/real-node.sh) when it runs, else at its next `up`.
# Unchanged sources rebuild nothing (buildah's layer cache) and import nothing.
#
# Environment: AGENTBOX_CACHE, AGENTBOX_DEBIAN_SUITE (bookworm), AGENTBOX_DEBIAN_MIRROR (apt's own),
#   AGENTBOX_AGENT_RUNTIMES (the runtimes whose agent images to build: every one agents.json pins).
# Root only (debootstrap).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
cache=${AGENTBOX_CACHE:-$HOME/.cache/agentbox}
suite=${AGENTBOX_DEBIAN_SUITE:-bookworm}
images_dir="$cache/images"
archives="$images_dir/archives"
base_image="localhost/agentbox/debian-python:$suite"
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$repo/pyproject.toml")

say() { printf '==> %s\n' "$*" >&2; }
die() { echo "images: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "debootstrap and buildah's storage need root"
[ -n "$version" ] || die "no version in pyproject.toml"

debian_mirror() {
  [ -n "${AGENTBOX_DEBIAN_MIRROR:-}" ] && { echo "$AGENTBOX_DEBIAN_MIRROR"; return; }
  # The mirror apt already uses here (deb822 or one-line sources), so the same network path works.
  local found
  found=$(sed -n 's/^URIs: *\([^ ]*\/debian\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1)
  [ -n "$found" ] || found=$(sed -n 's/^deb  *\(http[^ ]*\/debian\)  *.*/\1/p' /etc/apt/sources.list 2>/dev/null | head -n 1)
  echo "${found:-http://deb.debian.org/debian}"
}

build_base() {
  buildah images --quiet "$base_image" >/dev/null 2>&1 && return 0
  local rootfs="$images_dir/debian-$suite/rootfs" t0=$SECONDS
  if [ ! -d "$rootfs" ]; then
    say "debootstrap $suite (minbase + python3): about a minute, once per suite"
    rm -rf "$rootfs.tmp"
    mkdir -p "$rootfs.tmp"
    debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,python-is-python3,ca-certificates \
      "$suite" "$rootfs.tmp" "$(debian_mirror)" >"$images_dir/debootstrap-$suite.log" 2>&1 \
      || { tail -n 15 "$images_dir/debootstrap-$suite.log" >&2; die "debootstrap $suite failed (log $images_dir/debootstrap-$suite.log)"; }
    rm -rf "$rootfs.tmp"/var/cache/apt/archives/*.deb "$rootfs.tmp"/var/lib/apt/lists/*
    # The account distroless images have, so uid 65532 has a name.
    echo 'nonroot:x:65532:65532:nonroot:/home/nonroot:/usr/sbin/nologin' >>"$rootfs.tmp/etc/passwd"
    echo 'nonroot:x:65532:' >>"$rootfs.tmp/etc/group"
    mv "$rootfs.tmp" "$rootfs"
  fi
  say "base image $base_image"
  local container
  container=$(buildah from scratch)
  buildah copy --quiet "$container" "$rootfs" / >/dev/null
  # This machine's CA bundle: pip inside the builds must trust whatever TLS path leads to PyPI here
  # (some networks re-sign it). Debian's pip reads the system bundle.
  buildah copy --quiet "$container" /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt >/dev/null
  # Debian marks its Python as externally managed; these images own theirs.
  buildah config --env PIP_BREAK_SYSTEM_PACKAGES=1 --env LANG=C.UTF-8 --cmd '["python3"]' "$container"
  buildah commit --quiet --rm "$container" "$base_image" >/dev/null
  echo "    base ready in $((SECONDS - t0)) s" >&2
}

build_image() { # IMAGE DOCKERFILE BUILD-ARG...
  local image=$1 dockerfile=$2 t0=$SECONDS
  shift 2
  say "$image from $dockerfile"
  local args=() arg
  for arg in "$@"; do args+=(--build-arg "$arg"); done
  mkdir -p "$images_dir/logs"
  local log="$images_dir/logs/$(basename "${image%%:*}").log"
  # Docker's image format: the OCI one has no SHELL, which Dockerfile.agent's bash-only steps need.
  buildah bud --format docker --layers --pull-never --network host -f "$repo/$dockerfile" -t "$image" "${args[@]}" "$repo" \
    >"$log" 2>&1 || { tail -n 20 "$log" >&2; die "building $image failed (log $log)"; }
  local id archive stamp
  id=$(buildah images --quiet --no-trunc "$image" | head -n 1)
  archive="$archives/$(basename "${image%%:*}").tar"
  stamp="$archive.id"
  if [ ! -s "$archive" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$id" ]; then
    mkdir -p "$archives"
    rm -f "$archive.tmp"
    buildah push --quiet "$image" "docker-archive:$archive.tmp:$image" >/dev/null
    mv -f "$archive.tmp" "$archive"
    echo "$id" >"$stamp"
  fi
  echo "    built in $((SECONDS - t0)) s" >&2
}

"$here/real-node.sh" install
mkdir -p "$images_dir"
build_base
build_image "ghcr.io/agentbox-dev/agentbox:$version" Dockerfile "PYTHON_IMAGE=$base_image"
build_image "ghcr.io/agentbox-dev/sandbox:$version" sandbox/images/Dockerfile \
  "BUILD_IMAGE=$base_image" "RUNTIME_IMAGE=$base_image"
runtimes=${AGENTBOX_AGENT_RUNTIMES:-$(python3 -c 'import json, sys; print(*json.load(open(sys.argv[1]))["agents"])' \
  "$repo/sandbox/images/agents.json")}
for runtime in $runtimes; do
  build_image "ghcr.io/agentbox-dev/agent-$runtime:$version" sandbox/images/Dockerfile.agent \
    "BASE=$base_image" "RUNTIME=$runtime"
done
"$here/real-node.sh" import "$archives"/*.tar
