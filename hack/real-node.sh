#!/usr/bin/env bash
# A real node beside the kwok nodes: containerd, kubelet and kube-proxy on this machine, joined to the
# local kwok cluster, with cluster DNS (CoreDNS) and NetworkPolicy enforcement (kube-router) on it, so
# session pods run as containers. `hack/cluster.sh up|down` call this when AGENTBOX_REAL_NODE=1.
#
#   hack/real-node.sh check     fail, saying how to opt out, unless this machine can host the node for
#                               this cluster (root, Debian or Ubuntu, no other cluster holding it)
#   hack/real-node.sh check-host the same, but whatever cluster holds the node
#   hack/real-node.sh up        install what is missing, start (or keep) every part; idempotent
#   hack/real-node.sh down      delete the node's pods through the API, stop every part, clean the host
#   hack/real-node.sh status    say what runs
#   hack/real-node.sh install   only the Debian packages (also what `make images` needs)
#   hack/real-node.sh import ARCHIVE...   load docker-archive images into the node's containerd
#
# One real node per machine (node name `real-node`): kube-proxy's nftables table and kube-router's
# chains are host-wide. Its runtime state lives in $AGENTBOX_CACHE/real-node; its credentials, signed by
# the cluster's own CA, live with the cluster. The node is tainted agentbox.dev/real-node=true:NoSchedule
# and labelled agentbox.dev/real-node=true: only pods that tolerate the taint and select the label run on
# it; everything else stays on the kwok nodes. Pods use images imported here (`make images`), never a
# registry.
#
# Environment: AGENTBOX_CLUSTER_NAME (agentbox), AGENTBOX_CACHE, AGENTBOX_REAL_NODE_POD_CIDR (10.244.0.0/24).
# Root only (it runs containerd and a kubelet); Debian or Ubuntu (apt). The Makefile and hack/cluster.sh
# bring it up unless AGENTBOX_REAL_NODE=0.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
. "$here/versions.env"

name=${AGENTBOX_CLUSTER_NAME:-agentbox}
cache=${AGENTBOX_CACHE:-$HOME/.cache/agentbox}
pod_cidr=${AGENTBOX_REAL_NODE_POD_CIDR:-10.244.0.0/24}
bin_root="$cache/bin"
kube_bin="$bin_root/kubernetes-$K8S_VERSION"
kubectl="$kube_bin/kubectl"
cluster_dir="$cache/kwok/clusters/$name"
admin_kubeconfig="$cluster_dir/kubeconfig.yaml"
pki="$cluster_dir/pki"
creds="$cluster_dir/real-node"  # this cluster's identities for the node's parts: gone with the cluster

node=real-node
node_label=agentbox.dev/real-node
state="$cache/real-node"
run=/run/agentbox-real-node
socket="$run/containerd.sock"
owner_file="$state/cluster"
cni_network=agentbox
bridge=agentbox0
cgroup_root=agentbox
# kube-apiserver's default service range is 10.0.0.0/24: the `kubernetes` Service is .1, cluster DNS .10.
cluster_dns=10.0.0.10
pause_image=localhost/agentbox/pause:catatonit
coredns_image=localhost/agentbox/coredns:$COREDNS_VERSION
packages=(containerd runc containernetworking-plugins iptables ipset nftables conntrack catatonit openssl
  buildah debootstrap)

say() { echo "real-node: $*" >&2; }
die() { echo "real-node: $*" >&2; exit 1; }
opt_out="set AGENTBOX_REAL_NODE=0 for kwok nodes alone (no pod then runs as a container)"

kubectl_() { "$kubectl" --kubeconfig "$admin_kubeconfig" "$@"; }
ctr_() { ctr --address "$socket" --namespace k8s.io "$@"; }

# ---------------------------------------------------------------------------------------------- host

install_packages() {
  local missing=() p
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install them"
  say "installing ${missing[*]} from Debian"
  (
    # The packages' own services are not wanted: this script runs containerd with its own configuration.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      trap 'rm -f /usr/sbin/policy-rc.d' EXIT
      printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    fi
    apt-get update -qq >/dev/null \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  ) || die "apt-get install ${missing[*]} failed (see above)"
}

node_ip() {
  # The address of the default route's interface: a kubelet refuses loopback, and the API server dials it.
  ip -4 route get 1.1.1.1 2>/dev/null | awk '{for (i = 1; i < NF; i++) if ($i == "src") {print $(i + 1); exit}}'
}

# A part we started, by its pid file, still running the same program (not a process that reused the pid).
running() { # NAME
  local pid
  pid=$(cat "$state/pids/$1.pid" 2>/dev/null) || return 1
  [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$1"
}

start() { # NAME COMMAND...: in the background, logging to $state/logs/NAME.log
  local name=$1
  shift
  running "$name" && return 0
  mkdir -p "$state/pids" "$state/logs"
  setsid "$@" >>"$state/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$state/pids/$name.pid"
}

stop() { # NAME
  local pid
  pid=$(cat "$state/pids/$1.pid" 2>/dev/null) || return 0
  if running "$1"; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do running "$1" || break; sleep 0.1; done
    ! running "$1" || kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$state/pids/$1.pid"
}

wait_for() { # SECONDS WHAT LOG COMMAND...
  local seconds=$1 what=$2 log=$3
  local deadline=$((SECONDS + seconds))
  shift 3
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
      tail -n 15 "$log" >&2 2>/dev/null
      die "$what not ready in $seconds s (log $log)"
    fi
    sleep 0.5
  done
}

# ---------------------------------------------------------------------------------------------- containerd

write_containerd_config() {
  mkdir -p "$state/containerd" "$state/cni" "$run"
  # Only what differs from containerd's defaults.
  cat >"$state/containerd.toml" <<TOML
version = 2
root = "$state/containerd/root"
state = "$run/state"
[grpc]
  address = "$socket"
[plugins."io.containerd.internal.v1.opt"]
  path = "$state/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  # Images come from \`ctr import\`, never a registry; the pause container is a local image too.
  sandbox_image = "$pause_image"
  # The kubelet asks oom_score_adj -998 for sandboxes; root without CAP_SYS_RESOURCE (some VMs) cannot
  # lower it, and runc then fails every sandbox ("can't get final child's PID from pipe").
  restrict_oom_score_adj = true
  # CoreDNS binds port 53 as uid 65532.
  enable_unprivileged_ports = true
  enable_unprivileged_icmp = true
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
    SystemdCgroup = false
    Root = "$run/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$state/cni"
TOML
  # A bridge with host-local addresses: one node needs no overlay.
  cat >"$state/cni/10-$cni_network.conflist" <<JSON
{
  "cniVersion": "1.0.0",
  "name": "$cni_network",
  "plugins": [
    {"type": "bridge", "bridge": "$bridge", "isGateway": true, "ipMasq": true, "hairpinMode": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "$pod_cidr"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}},
    {"type": "loopback"}
  ]
}
JSON
}

start_containerd() {
  running containerd && return 0
  write_containerd_config
  start containerd containerd --config "$state/containerd.toml"
  wait_for 30 "containerd" "$state/logs/containerd.log" ctr_ version
}

# Images made here from one static binary each: the pause container and CoreDNS.
binary_image() { # IMAGE BINARY USER ENTRYPOINT-JSON
  local image=$1 binary=$2 user=$3 entrypoint=$4 archive
  archive="$state/images/$(echo "$image" | tr '/:' '__').tar"
  if [ ! -s "$archive" ]; then
    mkdir -p "$state/images"
    local container
    container=$(buildah from scratch)
    buildah copy --quiet "$container" "$binary" "/$(basename "$binary")" >/dev/null
    buildah config --entrypoint "$entrypoint" --user "$user" "$container"
    buildah commit --quiet --rm "$container" "$image" >/dev/null
    buildah push --quiet "$image" "docker-archive:$archive.tmp:$image" && mv -f "$archive.tmp" "$archive"
  fi
  import_archives "$archive"
}

# Each archive once: again only when it was rewritten since, or containerd lost its image.
import_archives() { # ARCHIVE...
  local archive stamp
  mkdir -p "$state/imported"
  for archive in "$@"; do
    stamp="$state/imported/$(basename "$archive")"
    if [ -f "$stamp" ] && ! [ "$archive" -nt "$stamp" ] \
      && ctr_ images ls -q | grep -qxF "$(image_of "$archive")"; then
      continue
    fi
    ctr_ images import "$archive" >/dev/null || die "could not import $archive into the real node's containerd"
    touch "$stamp"
    say "imported $(image_of "$archive")"
  done
}

import_command() { # ARCHIVE...
  if ! running containerd; then
    say "the real node is not running: its next \`up\` imports the images"
    return 0
  fi
  import_archives "$@"
}

# ---------------------------------------------------------------------------------------------- identities

# A client certificate signed by the cluster's CA, in a kubeconfig: the node's parts authenticate as
# themselves, not as the cluster admin (the kubelet as system:node:real-node, which the Node authorizer
# admits).
identity_kubeconfig() { # NAME COMMON-NAME ORGANIZATION
  local out="$creds/$1.kubeconfig"
  [ -s "$out" ] && return 0
  mkdir -p "$creds"
  local key="$creds/$1.key" cert="$creds/$1.crt" subject="/CN=$2"
  [ -n "$3" ] && subject="/O=$3$subject"
  openssl req -new -newkey rsa:2048 -nodes -keyout "$key" -subj "$subject" -out "$creds/$1.csr" 2>/dev/null
  printf 'keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' >"$creds/$1.ext"
  openssl x509 -req -in "$creds/$1.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -days 365 \
    -set_serial "0x$(openssl rand -hex 16)" -extfile "$creds/$1.ext" -out "$cert" 2>/dev/null \
    || die "could not sign a certificate for $2 with $pki/ca.key"
  local server
  server=$(kubectl_ config view --minify -o jsonpath='{.clusters[0].cluster.server}')
  local k=("$kubectl" --kubeconfig "$out.tmp")
  "${k[@]}" config set-cluster local --server "$server" --certificate-authority "$pki/ca.crt" --embed-certs >/dev/null
  "${k[@]}" config set-credentials "$1" --client-certificate "$cert" --client-key "$key" --embed-certs >/dev/null
  "${k[@]}" config set-context local --cluster local --user "$1" >/dev/null
  "${k[@]}" config use-context local >/dev/null
  rm -f "$creds/$1.csr" "$creds/$1.ext" "$key" "$cert"
  mv -f "$out.tmp" "$out"
}

# ---------------------------------------------------------------------------------------------- kubelet

write_kubelet_config() {
  local ip=$1
  cat >"$state/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $ip
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $pki/ca.crt}
authorization: {mode: Webhook}
containerRuntimeEndpoint: unix://$socket
cgroupDriver: cgroupfs
cgroupRoot: /$cgroup_root
# Kubernetes 1.35+ refuses cgroup v1 unless told; some VMs have nothing else.
failCgroupV1: false
failSwapOn: false
enforceNodeAllocatable: []
clusterDNS: [$cluster_dns]
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
podLogsDir: $state/pod-logs
maxPods: 110
serializeImagePulls: false
# Local images are never pulled again: no garbage collection of them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
registerWithTaints:
- {key: $node_label, value: "true", effect: NoSchedule}
YAML
}

make_cgroup_root() {
  if [ -f /sys/fs/cgroup/cgroup.controllers ]; then  # cgroup v2
    mkdir -p "/sys/fs/cgroup/$cgroup_root"
    return 0
  fi
  local hierarchy
  for hierarchy in /sys/fs/cgroup/*/; do
    case $hierarchy in */unified/) continue ;; esac
    mkdir -p "$hierarchy$cgroup_root"
  done
}

start_kubelet() {
  running kubelet && return 0
  local ip; ip=$(node_ip)
  [ -n "$ip" ] || die "found no address on a default route for the node (the kubelet refuses loopback)"
  write_kubelet_config "$ip"
  make_cgroup_root
  mkdir -p "$state/kubelet" "$state/pod-logs"
  start kubelet "$kube_bin/kubelet" --config "$state/kubelet.yaml" --kubeconfig "$creds/kubelet.kubeconfig" \
    --hostname-override "$node" --node-ip "$ip" --node-labels "$node_label=true" \
    --root-dir "$state/kubelet" --v=1
}

dns_ready() {  # every CoreDNS pod Ready (the one a deleted node left behind is replaced first)
  local ready
  ready=$(kubectl_ -n kube-system get pods -l k8s-app=kube-dns \
    -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{" "}{end}')
  [ -n "$ready" ] && [[ $ready != *False* ]]
}

node_ready() {
  [ "$(kubectl_ get node "$node" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ]
}

# ---------------------------------------------------------------------------------------------- kube-proxy, kube-router

start_kube_proxy() {
  running kube-proxy && return 0
  cat >"$state/kube-proxy.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $creds/kube-proxy.kubeconfig}
hostnameOverride: $node
mode: nftables
clusterCIDR: $pod_cidr
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
# Leave the host's conntrack sysctls alone.
conntrack: {maxPerCore: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
YAML
  start kube-proxy "$kube_bin/kube-proxy" --config "$state/kube-proxy.yaml"
}

start_kube_router() {
  running kube-router && return 0
  # NetworkPolicy only: the bridge plugin routes, kube-proxy serves Services.
  start kube-router "$bin_root/kube-router-$KUBE_ROUTER_VERSION/kube-router" --run-firewall=true --run-router=false \
    --run-service-proxy=false --enable-cni=false --hostname-override="$node" \
    --kubeconfig="$creds/kube-router.kubeconfig" --health-port=20244 --metrics-port=0
}

apply_cluster_parts() {
  kubectl_ apply --server-side --force-conflicts --field-manager=agentbox-real-node -f - >/dev/null <<YAML
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "agentbox:kube-router"}
rules:
- apiGroups: [""]
  resources: [namespaces, pods, services, nodes, endpoints]
  verbs: [get, list, watch]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [get, list, watch]
- apiGroups: [coordination.k8s.io]
  resources: [leases]
  verbs: [get, create, update]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "agentbox:kube-router"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "agentbox:kube-router"}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: "agentbox:kube-router"}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "agentbox:coredns"}
rules:
- apiGroups: [""]
  resources: [endpoints, services, pods, namespaces]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "agentbox:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "agentbox:coredns"}
subjects:
- {kind: ServiceAccount, name: coredns, namespace: kube-system}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: coredns, namespace: kube-system}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: coredns, namespace: kube-system}
data:
  Corefile: |
    .:53 {
        errors
        health :8080
        ready :8181
        kubernetes cluster.local in-addr.arpa ip6.arpa {
            pods insecure
            fallthrough in-addr.arpa ip6.arpa
        }
        forward . /etc/resolv.conf
        cache 30
        loop
        loadbalance
    }
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  replicas: 1
  selector: {matchLabels: {k8s-app: kube-dns}}
  template:
    metadata: {labels: {k8s-app: kube-dns}}
    spec:
      serviceAccountName: coredns
      dnsPolicy: Default  # the host's resolver is the upstream
      nodeSelector: {$node_label: "true"}
      tolerations: [{key: $node_label, operator: Exists, effect: NoSchedule}]
      securityContext:
        runAsNonRoot: true
        runAsUser: 65532
        runAsGroup: 65532
        seccompProfile: {type: RuntimeDefault}
      containers:
      - name: coredns
        image: $coredns_image
        imagePullPolicy: Never
        args: [-conf, /etc/coredns/Corefile]
        ports:
        - {name: dns, containerPort: 53, protocol: UDP}
        - {name: dns-tcp, containerPort: 53, protocol: TCP}
        securityContext:
          allowPrivilegeEscalation: false
          readOnlyRootFilesystem: true
          capabilities: {drop: [ALL]}
        readinessProbe: {httpGet: {path: /ready, port: 8181}, periodSeconds: 2}
        livenessProbe: {httpGet: {path: /health, port: 8080}, periodSeconds: 10}
        resources: {requests: {cpu: 50m, memory: 64Mi}, limits: {memory: 170Mi}}
        volumeMounts: [{name: config, mountPath: /etc/coredns, readOnly: true}]
      volumes: [{name: config, configMap: {name: coredns}}]
---
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  clusterIP: $cluster_dns
  selector: {k8s-app: kube-dns}
  ports:
  - {name: dns, port: 53, protocol: UDP, targetPort: 53}
  - {name: dns-tcp, port: 53, protocol: TCP, targetPort: 53}
YAML
}

# ---------------------------------------------------------------------------------------------- up, down

# What the machine must offer, checked before anything is built or created for the node.
check_host() {
  [ "$(uname -s)" = Linux ] || die "the real node (on by default) runs a kubelet, so Linux only: $opt_out"
  [ "$(id -u)" = 0 ] || die "the real node (on by default) runs containerd and a kubelet as root: run as root, or $opt_out"
  command -v apt-get >/dev/null 2>&1 && command -v dpkg-query >/dev/null 2>&1 \
    || die "the real node (on by default) needs Debian or Ubuntu (apt installs its containerd, runc and CNI plugins): $opt_out"
  [ -n "$(ls -A /sys/fs/cgroup 2>/dev/null)" ] || die "the real node (on by default) needs cgroups at /sys/fs/cgroup: $opt_out"
}

# One real node per machine: another cluster that still exists keeps it.
check_owner() {
  local owner; owner=$(cat "$owner_file" 2>/dev/null || true)
  [ -n "$owner" ] && [ "$owner" != "$name" ] && any_running && [ -d "$cache/kwok/clusters/$owner" ] \
    && die "the one real node of this machine serves cluster '$owner': \`AGENTBOX_CLUSTER_NAME=$owner hack/cluster.sh down\` first, or $opt_out"
  return 0
}

require() {
  check_host
  local missing=() b
  for b in "$kube_bin/kubelet" "$kube_bin/kube-proxy" "$bin_root/coredns-$COREDNS_VERSION/coredns" \
    "$bin_root/kube-router-$KUBE_ROUTER_VERSION/kube-router" "$kubectl"; do
    [ -x "$b" ] || missing+=("$(basename "$b")")
  done
  [ ${#missing[@]} -eq 0 ] \
    || die "missing ${missing[*]} under $bin_root: run \`make binaries\`"
  [ -f "$admin_kubeconfig" ] && [ -f "$pki/ca.key" ] \
    || die "no cluster '$name' to join: run \`hack/cluster.sh up\`"
}

up() {
  require
  local owner; owner=$(cat "$owner_file" 2>/dev/null || true)
  check_owner
  if [ -n "$owner" ] && [ "$owner" != "$name" ] && any_running; then
    say "cluster '$owner' is gone: stopping the node it left running"
    stop_parts
  fi
  install_packages
  mkdir -p "$state"
  echo "$name" >"$owner_file"
  local t0=$SECONDS
  identity_kubeconfig kubelet "system:node:$node" system:nodes
  identity_kubeconfig kube-proxy system:kube-proxy ""
  identity_kubeconfig kube-router "agentbox:kube-router" ""
  start_containerd
  binary_image "$pause_image" /usr/bin/catatonit 65532:65532 '["/catatonit", "-P"]'
  binary_image "$coredns_image" "$bin_root/coredns-$COREDNS_VERSION/coredns" 65532:65532 '["/coredns"]'
  # What `make images` built while the node was down, or what this containerd lost.
  local built=("$cache/images/archives"/*.tar)
  if [ -f "${built[0]}" ]; then
    import_archives "${built[@]}"
  else
    say "no images of the project yet: session pods need \`make images\` (nothing is pulled)"
  fi
  start_kubelet
  wait_for 60 "the kubelet's node '$node'" "$state/logs/kubelet.log" node_ready
  kubectl_ uncordon "$node" >/dev/null
  start_kube_proxy
  start_kube_router
  apply_cluster_parts
  wait_for 90 "CoreDNS (kubectl -n kube-system describe pod -l k8s-app=kube-dns)" "$state/logs/kubelet.log" dns_ready
  say "node '$node' ready in $((SECONDS - t0)) s (pods on $pod_cidr, DNS $cluster_dns, logs in $state/logs)"
}

image_of() { # ARCHIVE: the name a docker-archive carries
  tar -xOf "$1" manifest.json | sed -n 's/.*"RepoTags":\["\([^"]*\)".*/\1/p'
}

any_running() {
  local part
  for part in containerd kubelet kube-proxy kube-router; do running "$part" && return 0; done
  return 1
}

# Pods leave through the kubelet, which tears their sandboxes down through CRI and so through CNI:
# killing containers directly would leak their network namespaces, addresses and NAT rules.
drain_through_api() {
  [ -f "$admin_kubeconfig" ] && kubectl_ --request-timeout=5s get node "$node" >/dev/null 2>&1 || return 0
  running kubelet || return 0
  kubectl_ cordon "$node" >/dev/null 2>&1 || true
  kubectl_ delete pods --all-namespaces --field-selector "spec.nodeName=$node" --grace-period=1 --wait=false \
    >/dev/null 2>&1 || true
  local deadline=$((SECONDS + 90))
  while [ -n "$(ctr_ tasks ls -q 2>/dev/null)" ] && [ $SECONDS -lt $deadline ]; do sleep 1; done
}

stop_parts() {
  stop kube-router
  clean_kube_router
  stop kube-proxy
  nft delete table ip kube-proxy 2>/dev/null || true
  nft delete table ip6 kube-proxy 2>/dev/null || true
  stop kubelet
  if running containerd; then
    local task
    for task in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks kill -s KILL "$task" >/dev/null 2>&1 || true; done
    sleep 1
    for task in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks delete -f "$task" >/dev/null 2>&1 || true; done
    for task in $(ctr_ containers ls -q 2>/dev/null); do ctr_ containers delete "$task" >/dev/null 2>&1 || true; done
  fi
  stop containerd
  local pid
  for pid in $(pgrep -f "containerd-shim-runc-v2 .*-address $socket" || true); do kill "$pid" 2>/dev/null || true; done
  clean_host
}

# Rules of an iptables table whose text has PATTERN, deleted one by one; then the chains named by
# CHAIN-REGEX (sed), emptied and removed. iptables-save quotes its rules as a shell would, hence eval.
delete_iptables() { # TABLE PATTERN CHAIN-REGEX
  local table=$1 pattern=$2 chains=$3 rule chain
  iptables-save -t "$table" 2>/dev/null | grep '^-A ' | grep -F -- "$pattern" | while read -r rule; do
    eval "iptables -t $table ${rule/#-A/-D}" 2>/dev/null || true
  done || true
  for chain in $(iptables-save -t "$table" 2>/dev/null | sed -n "s/^:\($chains\) .*/\1/p"); do
    iptables -t "$table" -F "$chain" 2>/dev/null || true
  done
  for chain in $(iptables-save -t "$table" 2>/dev/null | sed -n "s/^:\($chains\) .*/\1/p"); do
    iptables -t "$table" -X "$chain" 2>/dev/null || true
  done
}

# kube-router's own --cleanup-config crashes on kernels without IPVS: its chains and sets go here.
clean_kube_router() {
  local table
  for table in filter nat mangle; do
    delete_iptables "$table" "kube-router" 'KUBE-\(ROUTER\|NWPLCY\|POD-FW\)-[A-Z0-9-]*'
  done
  ipset list -n 2>/dev/null | grep '^KUBE-\(SRC\|DST\)-' | xargs -r -n1 ipset destroy 2>/dev/null || true
}

# What pods left on the host if they were not torn down through CNI: mounts, the bridge, NAT chains of
# our network (the bridge plugin's masquerade rules carry `name: "<network>"`), address leases, cgroups.
clean_host() {
  awk -v state="$state" -v run="$run" '$2 ~ "^(" state "/(kubelet|containerd)|" run ")(/|$)" {print $2}' /proc/mounts \
    | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  ip link del "$bridge" 2>/dev/null || true
  delete_iptables nat "name: \\\"$cni_network\\\"" 'CNI-[0-9a-f]*'
  rm -rf "/var/lib/cni/networks/$cni_network"
  local d
  for d in /sys/fs/cgroup/*/"$cgroup_root" /sys/fs/cgroup/"$cgroup_root"; do
    [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  done
}

down() {
  local owner; owner=$(cat "$owner_file" 2>/dev/null || true)
  if [ -n "$owner" ] && [ "$owner" != "$name" ]; then
    say "the real node belongs to cluster '$owner', not '$name': left alone"
    return 0
  fi
  [ -n "$owner" ] || any_running || return 0
  drain_through_api
  stop_parts
  # After the kubelet stopped: a running one would register the node again.
  [ -f "$admin_kubeconfig" ] && kubectl_ --request-timeout=5s delete node "$node" --wait=false >/dev/null 2>&1 || true
  rm -rf "$state/kubelet" "$state/pod-logs" "$owner_file"
  say "node '$node' stopped and cleaned"
}

status() {
  local part rc=0
  echo "real node: serves cluster '$(cat "$owner_file" 2>/dev/null || echo none)', state in $state"
  for part in containerd kubelet kube-proxy kube-router; do
    if running "$part"; then echo "$part: running (pid $(cat "$state/pids/$part.pid"))"
    else echo "$part: stopped"; rc=1; fi
  done
  return $rc
}

case ${1:-} in
  check) check_host; check_owner ;;
  check-host) check_host ;;
  up) up ;;
  down) down ;;
  status) status ;;
  install) install_packages ;;
  import) shift; import_command "$@" ;;
  *) die "usage: hack/real-node.sh check|check-host|up|down|status|install|import ARCHIVE..." ;;
esac
