#!/usr/bin/env bash
# Build the local cluster's binaries from the Go module proxy, once, into a cache outside the repo.
#   kube-apiserver, kube-controller-manager, kube-scheduler, kubectl  (k8s.io/kubernetes, wrapper module)
#   etcd                                                               (go.etcd.io/etcd/server/v3, wrapper module)
#   kwok, kwokctl, helm                                                (plain go install)
# Unless AGENTBOX_REAL_NODE=0, also what the real node beside the kwok nodes runs (hack/real-node.sh):
#   kubelet, kube-proxy                (the same wrapper module: most of their packages are already compiled)
#   coredns, kube-router               (plain go install)
# With AGENTBOX_CLUSTER_KIND=kind (no real node then), only the clients the tests and scripts use: kubectl
# and helm (kind runs its own control plane).
# Prints nothing but progress; the last line names the bin directory. Safe to re-run: each tool is
# skipped when its versioned binary exists, and a half-written one is never left in place.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
. "$here/versions.env"
cache=${AGENTBOX_CACHE:-$HOME/.cache/agentbox}
bin_root="$cache/bin"
mkdir -p "$bin_root"

die() { echo "build-binaries: $*" >&2; exit 1; }
# Go is needed only when something is missing, so a machine with a warm cache builds nothing and needs none.
need_go() {
  command -v go >/dev/null 2>&1 \
    || die "no Go toolchain on PATH: install Go >= 1.25 (https://go.dev/doc/install or apt-get install golang) and re-run"
}

export CGO_ENABLED=0 GOFLAGS="${GOFLAGS:--buildvcs=false}"
# Parallel package builds; lower it (AGENTBOX_BUILD_JOBS=1) if the link steps run out of memory.
jobs=${AGENTBOX_BUILD_JOBS:-2}
started=$SECONDS

# install_into DIR NAME SRC_BINARY: atomically place a built binary.
install_into() {
  mkdir -p "$1"
  mv -f "$3" "$1/$2.tmp" && mv -f "$1/$2.tmp" "$1/$2"
}

real_node=${AGENTBOX_REAL_NODE:-1}
[[ $real_node =~ ^[01]$ ]] || die "AGENTBOX_REAL_NODE='$real_node' must be 0 or 1"
cluster_kind=${AGENTBOX_CLUSTER_KIND:-kwok}
if [ "$cluster_kind" = kind ]; then real_node=0; fi
# Not minutes of building for a node this machine cannot run.
if [ "$real_node" = 1 ]; then "$here/real-node.sh" check-host; fi

build_kubernetes() (
  local dir="$bin_root/kubernetes-$K8S_VERSION"
  local want=(kubectl)
  [ "$cluster_kind" = kind ] || want+=(kube-apiserver kube-controller-manager kube-scheduler)
  [ "$real_node" = 1 ] && want+=(kubelet kube-proxy)
  local missing=()
  for b in "${want[@]}"; do [ -x "$dir/$b" ] || missing+=("$b"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "==> building Kubernetes $K8S_VERSION (${missing[*]}): 5-45 minutes on 2 cores, once"
  need_go
  local staging="v0.${K8S_VERSION#v1.}"
  local work; work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
  cd "$work"
  go mod init agentbox.dev/hack/kubernetes >/dev/null 2>&1
  local modjson gomod
  modjson=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION") \
    || die "could not download k8s.io/kubernetes@$K8S_VERSION from the Go module proxy (check GOPROXY and the network), then re-run"
  gomod=$(printf '%s' "$modjson" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",*$/\1/p')
  [ -f "$gomod" ] || die "go mod download gave no go.mod for k8s.io/kubernetes@$K8S_VERSION"
  # Every staging module the kubernetes go.mod requires at v0.0.0 is replaced by its published tag.
  local staged
  staged=$(awk '/^replace|^\)/{inreq=0} /^require \(/{inreq=1;next} inreq && $2=="v0.0.0"{print $1}' "$gomod" | sort -u)
  [ -n "$staged" ] || die "found no staging modules in $gomod: the wrapper module cannot be built"
  go mod edit -require="k8s.io/kubernetes@$K8S_VERSION"
  for m in $staged; do go mod edit -replace="$m=$m@$staging"; done
  local go_line; go_line=$(sed -n 's/^go \(.*\)$/\1/p' "$gomod"); go mod edit -go="$go_line"
  {
    printf '//go:build tools\n\npackage tools\n\nimport (\n'
    for b in "${missing[@]}"; do printf '\t_ "k8s.io/kubernetes/cmd/%s"\n' "$b"; done
    printf ')\n'
  } > tools.go
  GOFLAGS="$GOFLAGS -mod=mod" go mod tidy -e >/dev/null 2>&1 || true
  GOFLAGS="$GOFLAGS -mod=mod" go get "k8s.io/kubernetes@$K8S_VERSION" >/dev/null \
    || die "resolving k8s.io/kubernetes@$K8S_VERSION failed (module proxy unreachable?): re-run when it answers"
  local minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  local date; date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  local ld="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld="$ld -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ld="$ld -X $pkg.gitTreeState=clean -X $pkg.buildDate=$date"
  done
  for b in "${missing[@]}"; do
    echo "    go build $b"
    GOFLAGS="$GOFLAGS -mod=mod" go build -p "$jobs" -trimpath -tags selinux,notest -ldflags "$ld" \
      -o "$work/$b" "k8s.io/kubernetes/cmd/$b" || die "building $b failed (see above); re-run to resume"
    install_into "$dir" "$b" "$work/$b"
  done
)

build_etcd() (
  local dir="$bin_root/etcd-$ETCD_VERSION"
  [ -x "$dir/etcd" ] && return 0
  echo "==> building etcd $ETCD_VERSION"
  need_go
  local work; work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
  cd "$work"
  go mod init agentbox.dev/hack/etcd >/dev/null 2>&1
  GOFLAGS="$GOFLAGS -mod=mod" go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >/dev/null \
    || die "could not fetch go.etcd.io/etcd/server/v3@$ETCD_VERSION from the module proxy; re-run when it answers"
  GOFLAGS="$GOFLAGS -mod=mod" go build -p "$jobs" -trimpath -ldflags "-s -w" -o "$work/etcd" go.etcd.io/etcd/server/v3 \
    || die "building etcd failed (see above)"
  install_into "$dir" etcd "$work/etcd"
)

build_plain() ( # NAME VERSION PACKAGE [LDFLAGS]
  local name=$1 version=$2 pkg=$3 ld=${4:-}
  local dir="$bin_root/$name-$version"
  [ -x "$dir/$name" ] && return 0
  echo "==> building $name $version"
  need_go
  local work; work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
  GOBIN="$work" go install -trimpath -ldflags "-s -w $ld" "$pkg@$version" \
    || die "go install $pkg@$version failed (module proxy unreachable?); re-run when it answers"
  install_into "$dir" "$name" "$work/$name"
)

if [ "$cluster_kind" != kind ]; then
  build_etcd
  build_plain kwok "$KWOK_VERSION" sigs.k8s.io/kwok/cmd/kwok
  build_plain kwokctl "$KWOK_VERSION" sigs.k8s.io/kwok/cmd/kwokctl
fi
build_plain helm "$HELM_VERSION" helm.sh/helm/v3/cmd/helm "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
build_kubernetes
if [ "$real_node" = 1 ]; then
  build_plain coredns "$COREDNS_VERSION" github.com/coredns/coredns
  build_plain kube-router "$KUBE_ROUTER_VERSION" github.com/cloudnativelabs/kube-router/v2/cmd/kube-router \
    "-X github.com/cloudnativelabs/kube-router/v2/pkg/version.Version=$KUBE_ROUTER_VERSION"
fi
echo "==> binaries ready in $bin_root ($((SECONDS - started)) s)"
