#!/usr/bin/env bash
# The local Kubernetes cluster for development and tests.
#
#   hack/cluster.sh up          create, restart or reuse the cluster; the last line printed is its kubeconfig
#   hack/cluster.sh down        delete the cluster and stop its storage provisioner
#   hack/cluster.sh stop        stop the cluster's processes and keep its state (`up` starts it again)
#   hack/cluster.sh kubeconfig  print the kubeconfig path of a cluster that exists
#   hack/cluster.sh status      say whether the cluster, its nodes and its provisioner are up
#
# Environment:
#   AGENTBOX_CLUSTER_NAME   cluster name (default agentbox)
#   AGENTBOX_CLUSTER_KIND   kwok (default: real control plane, fake nodes, no Docker) or kind (needs Docker)
#   AGENTBOX_CACHE          where binaries and cluster state live (default ~/.cache/agentbox)
#   AGENTBOX_CLUSTER_NODES  fake nodes on kwok (default 2)
#   AGENTBOX_NODE_PODS      pods each fake node admits (default 1000: two nodes hold 1,000 sessions twice over)
#   AGENTBOX_REAL_NODE      1 (default): also a real node (kubelet, containerd) on this machine that runs
#                           pods as containers (hack/real-node.sh; root, Debian or Ubuntu); 0: kwok nodes alone
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
# shellcheck source=versions.env
. "$here/versions.env"

name=${AGENTBOX_CLUSTER_NAME:-agentbox}
kind=${AGENTBOX_CLUSTER_KIND:-kwok}
cache=${AGENTBOX_CACHE:-$HOME/.cache/agentbox}
nodes=${AGENTBOX_CLUSTER_NODES:-2}
node_pods=${AGENTBOX_NODE_PODS:-1000}
storage_class=standard

bin_root="$cache/bin"
kube_bin="$bin_root/kubernetes-$K8S_VERSION"
kwokctl="$bin_root/kwokctl-$KWOK_VERSION/kwokctl"
kubectl="$kube_bin/kubectl"

say() { echo "cluster: $*" >&2; }
die() { echo "cluster: $*" >&2; exit 1; }

[[ $name =~ ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$ ]] \
  || die "AGENTBOX_CLUSTER_NAME='$name' is not a DNS label (lowercase letters, digits, '-')"
[[ $nodes =~ ^[1-9][0-9]*$ ]] || die "AGENTBOX_CLUSTER_NODES='$nodes' must be a positive integer"
[[ $node_pods =~ ^[1-9][0-9]*$ ]] || die "AGENTBOX_NODE_PODS='$node_pods' must be a positive integer"
real_node=${AGENTBOX_REAL_NODE:-1}
[[ $real_node =~ ^[01]$ ]] || die "AGENTBOX_REAL_NODE='$real_node' must be 0 or 1"

# ---------------------------------------------------------------------------------------------- kwok

export KWOK_WORKDIR="$cache/kwok"
cluster_dir="$KWOK_WORKDIR/clusters/$name"
kwok_kubeconfig="$cluster_dir/kubeconfig.yaml"
versions_stamp="$cluster_dir/agentbox-versions"
provisioner_pid="$cluster_dir/storage-provisioner.pid"
provisioner_log="$cluster_dir/logs/storage-provisioner.log"
volumes_dir="$cluster_dir/volumes"
# kwok's PortForward resource lets a local process stand in for a pod's port (hack/session_runners.py).
kwok_crds=PortForward
# kwok's default (40 s times a heartbeat factor of 5) is how long a restarted kwok-controller would leave
# the fake nodes unmanaged: 40 s, as a kubelet's.
node_lease_seconds=40
wanted_versions="kubernetes=$K8S_VERSION etcd=$ETCD_VERSION kwok=$KWOK_VERSION crds=$kwok_crds real-node=$real_node"
wanted_versions+=" node-lease=$node_lease_seconds"
if [ "$real_node" = 1 ]; then wanted_versions+=" fake-node-ip=127.0.0.1"; fi

require_kwok_binaries() {
  local missing=()
  for b in "$kwokctl" "$bin_root/kwok-$KWOK_VERSION/kwok" "$bin_root/etcd-$ETCD_VERSION/etcd" \
    "$kube_bin/kube-apiserver" "$kube_bin/kube-controller-manager" "$kube_bin/kube-scheduler" "$kubectl"; do
    [ -x "$b" ] || missing+=("$(basename "$b")")
  done
  [ ${#missing[@]} -eq 0 ] \
    || die "missing ${missing[*]} under $bin_root: run \`make binaries\` (builds them once from the Go module proxy)"
  # kwokctl looks kubectl up on PATH and downloads one when it finds none: give it ours.
  export PATH="$kube_bin:$PATH"
}

kwokctl_() { "$kwokctl" --name "$name" "$@"; }
kubectl_() { "$kubectl" --kubeconfig "$kwok_kubeconfig" "$@"; }

api_ready() { [ -f "$kwok_kubeconfig" ] && [ "$(kubectl_ --request-timeout=5s get --raw=/readyz 2>/dev/null)" = ok ]; }

wait_api_ready() { # SECONDS
  local deadline=$((SECONDS + $1))
  until api_ready; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 1
  done
}

create_kwok_cluster() {
  local config="$KWOK_WORKDIR/$name.kwokctl.yaml" create_log="$KWOK_WORKDIR/$name.create.log"
  mkdir -p "$KWOK_WORKDIR"
  # bindAddress has no flag or variable in kwokctl: it comes from a configuration document.
  cat >"$config" <<'YAML'
apiVersion: config.kwok.x-k8s.io/v1alpha1
kind: KwokctlConfiguration
options:
  bindAddress: 127.0.0.1
YAML
  # A real node's kubelet and pods need more of the control plane: pods reach the API through the
  # `kubernetes` Service (10.0.0.1, so the serving certificate names it, and the API server listens beyond
  # loopback); the API server reaches the kubelet (logs, exec, port-forward) at its node address with a
  # client certificate; kwok's controller keeps to its fake nodes and leaves the real one to its kubelet.
  # The API server dials nodes at their InternalIP first (the real node's name resolves nowhere): kwok's
  # controller serves the fake nodes' kubelet API on loopback, so that is their InternalIP (else logs,
  # exec and port-forward of their pods would go to a made-up address).
  if [ "$real_node" = 1 ]; then cat >>"$config" <<YAML
  kubeApiserverCertSANs: [10.0.0.1]
componentsPatches:
- name: kube-apiserver
  extraArgs:
  - {key: bind-address, value: 0.0.0.0, override: true}
  - {key: kubelet-preferred-address-types, value: "InternalIP,Hostname"}
  - {key: kubelet-client-certificate, value: $cluster_dir/pki/admin.crt}
  - {key: kubelet-client-key, value: $cluster_dir/pki/admin.key}
- name: kwok-controller
  extraArgs:
  - {key: manage-all-nodes, value: "false", override: true}
  - {key: manage-nodes-with-annotation-selector, value: kwok.x-k8s.io/node=fake}
  - {key: node-ip, value: 127.0.0.1, override: true}
YAML
  fi
  say "creating kwok cluster '$name' (Kubernetes $K8S_VERSION) in $cluster_dir"
  # KWOK_KUBE_VERSION / KWOK_ETCD_VERSION make kwokctl pick the flags that match the binaries we built.
  if ! KWOK_KUBE_VERSION=$K8S_VERSION KWOK_ETCD_VERSION=${ETCD_VERSION#v} \
    "$kwokctl" --name "$name" -c "$config" create cluster \
      --runtime binary \
      --kube-authorization \
      --kubeconfig "" \
      --etcd-binary "$bin_root/etcd-$ETCD_VERSION/etcd" \
      --kube-apiserver-binary "$kube_bin/kube-apiserver" \
      --kube-controller-manager-binary "$kube_bin/kube-controller-manager" \
      --kube-scheduler-binary "$kube_bin/kube-scheduler" \
      --kwok-controller-binary "$bin_root/kwok-$KWOK_VERSION/kwok" \
      --enable-crds "$kwok_crds" \
      --node-lease-duration-seconds "$node_lease_seconds" --heartbeat-factor 1 \
      --wait 120s >"$create_log" 2>&1; then
    tail -n 15 "$create_log" >&2
    delete_kwok_cluster
    die "kwokctl could not create cluster '$name' (its output is in $create_log); re-run \`hack/cluster.sh up\`"
  fi
  echo "$wanted_versions" >"$versions_stamp"
}

stop_provisioner() {
  local pid
  pid=$(cat "$provisioner_pid" 2>/dev/null) || return 0
  if provisioner_running; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$provisioner_pid"
}

provisioner_running() {
  local pid
  pid=$(cat "$provisioner_pid" 2>/dev/null) || return 1
  # The pid must still be our provisioner, not a process that reused the number.
  [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "storage_provisioner.py"
}

# Prints "PORT pid PID" for the first port the stopped cluster needs that another process listens on.
foreign_port_holder() {
  local ours port listener pid
  ours=" $(cat "$cluster_dir"/pids/*.pid 2>/dev/null | tr '\n' ' ') "
  for port in $(sed -n 's/^ *port: \([0-9][0-9]*\)$/\1/p' "$cluster_dir/kwok.yaml" | sort -u); do
    listener=$(ss -Hltnp "sport = :$port" 2>/dev/null) || continue
    [ -n "$listener" ] || continue
    pid=$(grep -o 'pid=[0-9]*' <<<"$listener" | head -n 1 | cut -d= -f2)
    [[ $ours == *" $pid "* ]] && continue
    echo "$port pid ${pid:-unknown}"
    return 0
  done
  return 1
}

delete_kwok_cluster() {
  # First, while the API still answers: the real node's pods leave through its kubelet.
  "$here/real-node.sh" down
  stop_provisioner
  if [ -d "$cluster_dir" ]; then
    "$kwokctl" --name "$name" delete cluster >/dev/null 2>&1 || true
    # A cluster whose configuration never got written is unknown to kwokctl: stop what its pid files
    # name (each one is ours) and remove the rest by hand.
    for pidfile in "$cluster_dir"/pids/*.pid; do
      [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    rm -rf "$cluster_dir"
  fi
}

python_for_provisioner() {
  local py=${AGENTBOX_PYTHON:-$repo/.venv/bin/python}
  [ -x "$py" ] && "$py" -c 'import kubernetes_asyncio' 2>/dev/null \
    || die "no Python with kubernetes_asyncio at $py: run \`make venv\` (or set AGENTBOX_PYTHON)"
  echo "$py"
}

start_provisioner() {
  provisioner_running && return 0
  local py; py=$(python_for_provisioner)
  mkdir -p "$volumes_dir" "$(dirname "$provisioner_log")"
  say "starting the storage provisioner for class '$storage_class' (log $provisioner_log)"
  local ready_mark="$cluster_dir/storage-provisioner.ready"
  rm -f "$ready_mark"
  setsid "$py" "$here/storage_provisioner.py" \
    --kubeconfig "$kwok_kubeconfig" --storage-class "$storage_class" \
    --volumes-dir "$volumes_dir" --ready-file "$ready_mark" \
    >>"$provisioner_log" 2>&1 </dev/null &
  echo $! >"$provisioner_pid"
  local deadline=$((SECONDS + 30))
  until [ -f "$ready_mark" ]; do
    provisioner_running || die "the storage provisioner exited at start: see $provisioner_log"
    [ $SECONDS -lt $deadline ] || die "the storage provisioner did not get ready in 30 s: see $provisioner_log"
    sleep 0.2
  done
}

# The cluster's own contents: fake nodes with room for many pods, and a default StorageClass whose
# claims bind. Both steps are idempotent and cheap, so `up` runs them every time.
furnish_kwok_cluster() {
  # With the real node, no made-up InternalIP: kwok's controller gives the fake nodes its own (loopback).
  local addresses=()
  if [ "$real_node" = 1 ]; then addresses=(--param '.nodeIPs=[]'); fi
  kwokctl_ scale node --replicas "$nodes" "${addresses[@]}" \
    --param ".allocatable.pods=$node_pods" \
    --param '.allocatable.cpu=1000' \
    --param '.allocatable.memory="4Ti"' >/dev/null 2>&1 \
    || die "could not add $nodes fake nodes to cluster '$name': run \`hack/cluster.sh down\` and retry"
  kubectl_ wait --for=condition=Ready node --selector type=kwok --timeout=60s >/dev/null \
    || die "the fake nodes did not become Ready in 60 s: see $cluster_dir/logs/kwok-controller.log"
  kubectl_ apply --server-side --force-conflicts --field-manager=agentbox-cluster -f - >/dev/null <<YAML
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: $storage_class
  annotations:
    storageclass.kubernetes.io/is-default-class: "true"
provisioner: agentbox.dev/hostpath
reclaimPolicy: Delete
volumeBindingMode: Immediate
YAML
  start_provisioner
}

# kwok runs a fake node's pods only while it holds the node's lease. A restarted kwok-controller has a new
# identity and would wait out the leases of the one before it: a lease not renewed since the restart
# belongs to that dead controller, so drop it, and wait until the new one holds every fake node's lease.
take_over_node_leases() { # RESTARTED_AT (UTC, %Y-%m-%dT%H:%M:%S)
  local restarted_at=$1 deadline=$((SECONDS + 60)) node renewed waiting
  while :; do
    waiting=()
    for node in $(kubectl_ get nodes --selector type=kwok -o jsonpath='{.items[*].metadata.name}'); do
      renewed=$(kubectl_ get lease --namespace kube-node-lease "$node" --ignore-not-found \
        -o jsonpath='{.spec.renewTime}')
      [ -n "$renewed" ] && [[ ! ${renewed:0:19} < $restarted_at ]] && continue
      waiting+=("$node")
      [ -z "$renewed" ] || kubectl_ delete lease --namespace kube-node-lease "$node" --ignore-not-found >/dev/null
    done
    [ ${#waiting[@]} -eq 0 ] && return 0
    [ $SECONDS -lt $deadline ] \
      || die "kwok did not take over the leases of ${waiting[*]} in 60 s: see $cluster_dir/logs/kwok-controller.log"
    sleep 1
  done
}

kwok_up() {
  require_kwok_binaries
  # Before the cluster is made for it: a machine that cannot host the node fails here, saying how to opt out.
  if [ "$real_node" = 1 ]; then "$here/real-node.sh" check; fi
  mkdir -p "$KWOK_WORKDIR"
  if [ -d "$cluster_dir" ] && [ "$(cat "$versions_stamp" 2>/dev/null)" != "$wanted_versions" ]; then
    say "cluster '$name' was made by other binaries or options, or never finished; recreating it"
    delete_kwok_cluster
  fi
  if [ -f "$cluster_dir/kwok.yaml" ]; then
    if api_ready; then
      say "reusing running cluster '$name'"
    else
      # Its stale provisioner may hold a client for an apiserver that is gone.
      stop_provisioner
      local holder
      if holder=$(foreign_port_holder); then
        say "port ${holder%% *} of cluster '$name' is taken by ${holder#* }; recreating the cluster on free ports"
        delete_kwok_cluster
        create_kwok_cluster
      else
        say "starting stopped cluster '$name'"
        local restarted_at; restarted_at=$(date -u +%Y-%m-%dT%H:%M:%S)
        if ! kwokctl_ start cluster --timeout 30s --wait 30s >/dev/null 2>&1 || ! wait_api_ready 30; then
          say "cluster '$name' did not come back (state damaged?); recreating it"
          delete_kwok_cluster
          create_kwok_cluster
        else
          take_over_node_leases "$restarted_at"
        fi
      fi
    fi
  else
    delete_kwok_cluster
    create_kwok_cluster
  fi
  furnish_kwok_cluster
  if [ "$real_node" = 1 ]; then "$here/real-node.sh" up; fi
  echo "$kwok_kubeconfig"
}

kwok_down() {
  if [ ! -d "$cluster_dir" ]; then
    say "no cluster '$name'"
    return 0
  fi
  [ -x "$kwokctl" ] || die "missing kwokctl under $bin_root: run \`make binaries\`"
  delete_kwok_cluster
  say "deleted cluster '$name'"
}

kwok_stop() {
  if [ ! -f "$cluster_dir/kwok.yaml" ]; then
    say "no cluster '$name'"
    return 0
  fi
  require_kwok_binaries
  "$here/real-node.sh" down
  stop_provisioner
  kwokctl_ stop cluster >/dev/null 2>&1 || die "kwokctl could not stop cluster '$name'"
  say "stopped cluster '$name'; \`hack/cluster.sh up\` starts it again"
}

kwok_kubeconfig_path() {
  [ -f "$kwok_kubeconfig" ] || die "no cluster '$name': run \`hack/cluster.sh up\`"
  echo "$kwok_kubeconfig"
}

kwok_status() {
  if [ ! -f "$cluster_dir/kwok.yaml" ]; then
    echo "cluster '$name' (kwok): absent"
    return 1
  fi
  require_kwok_binaries
  local state=stopped rc=1
  api_ready && { state=running; rc=0; }
  echo "cluster '$name' (kwok): $state, kubeconfig $kwok_kubeconfig"
  if provisioner_running; then
    echo "storage provisioner: running (pid $(cat "$provisioner_pid"), log $provisioner_log)"
  else
    echo "storage provisioner: stopped"
    rc=1
  fi
  [ "$state" = running ] && kubectl_ get nodes --no-headers 2>/dev/null | sed 's/^/node: /'
  if [ "$real_node" = 1 ]; then "$here/real-node.sh" status || rc=1; fi
  return $rc
}

# ---------------------------------------------------------------------------------------------- kind
# kind ships its own default StorageClass named `standard` (local-path provisioner) and real kubelets,
# so none of kwok's furnishing applies.

kind_kubeconfig="$cache/kind/$name/kubeconfig.yaml"

require_kind() {
  command -v kind >/dev/null 2>&1 || die "AGENTBOX_CLUSTER_KIND=kind needs the kind binary on PATH (https://kind.sigs.k8s.io)"
  docker info >/dev/null 2>&1 || die "AGENTBOX_CLUSTER_KIND=kind needs a running Docker (docker info failed); use the default kwok instead"
}

kind_exists() { kind get clusters 2>/dev/null | grep -qx "$name"; }

kind_up() {
  require_kind
  mkdir -p "$(dirname "$kind_kubeconfig")"
  if kind_exists; then
    say "reusing kind cluster '$name'"
  else
    kind create cluster --name "$name" --kubeconfig "$kind_kubeconfig" --wait 120s >&2 \
      || die "kind could not create cluster '$name' (see above); run \`hack/cluster.sh down\` and retry"
  fi
  kind get kubeconfig --name "$name" >"$kind_kubeconfig"
  echo "$kind_kubeconfig"
}

kind_down() {
  require_kind
  kind delete cluster --name "$name" >&2
  rm -rf "$(dirname "$kind_kubeconfig")"
}

kind_stop() { die "stop is for kwok clusters: stop kind's node containers with docker instead"; }

kind_kubeconfig_path() {
  [ -f "$kind_kubeconfig" ] || die "no kind cluster '$name': run \`hack/cluster.sh up\`"
  echo "$kind_kubeconfig"
}

kind_status() {
  require_kind
  if kind_exists; then echo "cluster '$name' (kind): running, kubeconfig $kind_kubeconfig"; else
    echo "cluster '$name' (kind): absent"; return 1; fi
}

# ---------------------------------------------------------------------------------------------- main

case $kind in kwok | kind) ;; *) die "AGENTBOX_CLUSTER_KIND='$kind' must be kwok or kind" ;; esac
command=${1:-}
case $command in
  up | down | stop)
    # One `up`, `down` or `stop` per cluster at a time: test sessions started together share the cluster.
    # flock -o keeps the lock out of the daemons `up` starts, which would otherwise hold it for life.
    if [ -z "${AGENTBOX_CLUSTER_LOCKED:-}" ]; then
      mkdir -p "$cache/locks"
      rc=0
      AGENTBOX_CLUSTER_LOCKED=1 flock -E 75 -o -w 900 "$cache/locks/$kind-$name.lock" "$0" "$command" || rc=$?
      [ $rc -ne 75 ] || die "another \`hack/cluster.sh up|down|stop\` of '$name' held its lock for 15 minutes; re-run when it ends"
      exit $rc
    fi
    "${kind}_$command"
    ;;
  kubeconfig) "${kind}_kubeconfig_path" ;;
  status) "${kind}_status" ;;
  *) die "usage: hack/cluster.sh up|down|stop|kubeconfig|status" ;;
esac
