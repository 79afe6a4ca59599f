#!/usr/bin/env bash
# The whole system on this machine, for trying it out (`make dev` / `make dev-down`).
#
#   hack/dev.sh up      create or reuse: cluster, PostgreSQL, migrations, CRDs, the chart's RBAC, the
#                       operator and the API as local processes, session stand-ins, a demo org and user
#   hack/dev.sh down    stop and remove all of it (the cluster, the database, .dev/)
#   hack/dev.sh status  what is running
#
# The operator and the API run as local processes, not as the chart's Deployments. They authenticate as
# the chart's own ServiceAccounts (token kubeconfigs from hack/chart_identity.py), so dev has exactly the
# permissions a real install has. The API reaches session runners as it would from outside any cluster:
# port-forward through the Kubernetes API. Session pods run as containers on the real node (the operator
# places every session there); with AGENTBOX_REAL_NODE=0 they land on kwok nodes, which run no containers,
# and hack/session_runners.py stands in for each (the real runner and gateway, started locally per pod,
# with a kwok PortForward leading the pod's port to them).
#
# Environment: AGENTBOX_DEV_API_PORT (8000), AGENTBOX_DEV_OPERATOR_PORT (8081, liveness),
#   AGENTBOX_CLUSTER_NAME (agentbox), AGENTBOX_REAL_NODE (1), AGENTBOX_CACHE.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
# shellcheck source=versions.env
. "$here/versions.env"

export AGENTBOX_CLUSTER_NAME=${AGENTBOX_CLUSTER_NAME:-agentbox}
export AGENTBOX_CLUSTER_KIND=${AGENTBOX_CLUSTER_KIND:-kwok}
real_node=${AGENTBOX_REAL_NODE:-1}
cache=${AGENTBOX_CACHE:-$HOME/.cache/agentbox}
dev="$repo/.dev"
py="$repo/.venv/bin/python"
kubectl="$cache/bin/kubernetes-$K8S_VERSION/kubectl"
helm="$cache/bin/helm-$HELM_VERSION/helm"
api_port=${AGENTBOX_DEV_API_PORT:-8000}
api_url="http://127.0.0.1:$api_port"
system_namespace=agentbox-system
release=agentbox
issuer="https://auth.agentbox.localhost/auth/v1"
demo_org=demo
demo_user=ada@example.com

started=$SECONDS
say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'dev: %s\n' "$*" >&2; exit 1; }

# Run a slow command with its output in a log, printing the elapsed time until it ends.
with_progress() { # LOG MESSAGE COMMAND...
  local log=$1 message=$2 pid rc=0 t0=$SECONDS
  shift 2
  "$@" >"$log" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    if [ -t 2 ]; then printf '\r    %s ... %ds ' "$message" $((SECONDS - t0)) >&2
    elif [ $(((SECONDS - t0) % 15)) -eq 0 ]; then printf '    %s ... %ds\n' "$message" $((SECONDS - t0)) >&2; fi
    sleep 1
  done
  wait "$pid" || rc=$?
  [ -t 2 ] && printf '\r\033[K' >&2
  if [ $rc -ne 0 ]; then tail -n 20 "$log" >&2; die "$message failed (full output: $log)"; fi
  printf '    %s: done in %ds\n' "$message" $((SECONDS - t0)) >&2
}

kube() { "$kubectl" --kubeconfig "$kubeconfig" "$@"; }

# A process we started earlier, by its pid file, still running the same program.
running() { # NAME MARK
  local pid
  pid=$(cat "$dev/pids/$1.pid" 2>/dev/null) || return 1
  [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$2"
}

start_process() { # NAME MARK ENV... -- COMMAND...
  local name=$1 mark=$2
  shift 2
  local env=()
  while [ "$1" != -- ]; do env+=("$1"); shift; done
  shift
  if running "$name" "$mark"; then
    echo "    $name: already running (pid $(cat "$dev/pids/$name.pid"))" >&2
    return 0
  fi
  mkdir -p "$dev/pids" "$dev/logs"
  (cd "$repo" && exec setsid env "${env[@]}" "$@" >>"$dev/logs/$name.log" 2>&1 </dev/null) &
  echo $! >"$dev/pids/$name.pid"
  echo "    $name: started (pid $!, log .dev/logs/$name.log)" >&2
}

stop_process() { # NAME MARK
  local pid
  pid=$(cat "$dev/pids/$1.pid" 2>/dev/null) || return 0
  if running "$1" "$2"; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    echo "    stopped $1 (pid $pid)" >&2
  fi
  rm -f "$dev/pids/$1.pid"
}

wait_http() { # URL SECONDS WHAT LOG
  local deadline=$((SECONDS + $2))
  until curl -fsS -o /dev/null "$1" 2>/dev/null; do
    [ $SECONDS -lt "$deadline" ] || { tail -n 20 "$4" >&2; die "$3 did not answer $1 in $2 s (log $4)"; }
    sleep 0.5
  done
}

wait_file() { # PATH SECONDS WHAT LOG
  local deadline=$((SECONDS + $2))
  until [ -f "$1" ]; do
    [ $SECONDS -lt "$deadline" ] || { tail -n 20 "$4" >&2; die "$3 did not get ready in $2 s (log $4)"; }
    sleep 0.2
  done
}

secret_file() { # NAME GENERATOR-PYTHON: create once, keep across runs
  local path="$dev/$1"
  [ -s "$path" ] || (umask 077 && "$py" -c "$2" >"$path")
  echo "$path"
}

mint() { "$py" "$here/mint_token.py" --secret-file "$dev/jwt-secret" --issuer "$issuer" "$@"; }

up() {
  [ -x "$py" ] || die "no virtualenv at .venv: run \`make venv\`"
  [ -x "$kubectl" ] && [ -x "$helm" ] || die "missing kubectl or helm under $cache/bin: run \`make binaries\`"
  mkdir -p "$dev/logs"
  chmod 755 "$dev"  # the PostgreSQL server runs as `postgres` and must reach .dev/postgres

  say "cluster '$AGENTBOX_CLUSTER_NAME' ($AGENTBOX_CLUSTER_KIND)"
  with_progress "$dev/logs/cluster.log" "cluster up (first time ~30 s)" "$here/cluster.sh" up
  kubeconfig=$(tail -n 1 "$dev/logs/cluster.log")

  say "PostgreSQL in .dev/postgres"
  if [ -f "$dev/postgres/port" ] && [ -d "$dev/postgres/data" ]; then
    "$here/postgres.sh" start "$dev/postgres" || die "the database in .dev/postgres does not start: \`make dev-down\` and retry"
    echo "    reusing the server on port $(cat "$dev/postgres/port")" >&2
  else
    with_progress "$dev/logs/postgres.log" "initialise PostgreSQL" "$here/postgres.sh" up "$dev/postgres"
  fi
  local superuser_dsn; superuser_dsn=$("$here/postgres.sh" url "$dev/postgres")
  secret_file db-owner-password 'import secrets; print(secrets.token_urlsafe(24))' >/dev/null
  secret_file db-app-password 'import secrets; print(secrets.token_urlsafe(24))' >/dev/null
  secret_file jwt-secret 'import secrets; print(secrets.token_urlsafe(48))' >/dev/null
  secret_file encryption-keys 'import base64, os; print("dev1:" + base64.b64encode(os.urandom(32)).decode())' >/dev/null
  # Signs the audit checkpoints (an Ed25519 private key, base64 of its 32 bytes); they are kept in .dev.
  secret_file audit-checkpoint-key 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())' >/dev/null

  say "database roles and migrations"
  AGENTBOX_DB_OWNER_PASSWORD=$(cat "$dev/db-owner-password") AGENTBOX_DB_APP_PASSWORD=$(cat "$dev/db-app-password") \
    "$py" -m agentbox.api.migrate provision --dsn "$superuser_dsn" --database agentbox >&2
  local owner_dsn app_dsn
  owner_dsn=$("$py" -c 'import sys, urllib.parse as u; p = u.urlsplit(sys.argv[1]); print(u.urlunsplit((p.scheme, "agentbox_owner:" + u.quote(sys.argv[2], safe="") + "@" + p.netloc.split("@")[1], "/agentbox", "", "")))' "$superuser_dsn" "$(cat "$dev/db-owner-password")")
  app_dsn=$("$py" -c 'import sys, urllib.parse as u; p = u.urlsplit(sys.argv[1]); print(u.urlunsplit((p.scheme, "agentbox_app:" + u.quote(sys.argv[2], safe="") + "@" + p.netloc.split("@")[1], "/agentbox", "", "")))' "$superuser_dsn" "$(cat "$dev/db-app-password")")
  "$py" -m agentbox.api.migrate migrate --dsn "$owner_dsn" >&2

  say "CRDs"
  local crd_args=()
  for f in "$repo"/crds/*.yaml; do crd_args+=(-f "$f"); done
  kube apply --server-side --force-conflicts --field-manager=agentbox-dev "${crd_args[@]}" >/dev/null
  kube wait --for=condition=Established --timeout=60s crd/agentsessions.agentbox.dev crd/mcpservers.agentbox.dev \
    crd/clusterkopfpeerings.kopf.dev >/dev/null
  echo "    agentsessions, mcpservers, kopf peering: established" >&2

  say "the chart's ServiceAccounts and RBAC in namespace $system_namespace"
  "$py" "$here/chart_identity.py" --kubeconfig "$kubeconfig" --kubectl "$kubectl" --helm "$helm" \
    --namespace "$system_namespace" --release "$release" --out "$dev/identity" | sed 's/^/    /' >&2

  # Sessions on the real node (hack/real-node.sh taints and labels it), or on kwok with stand-ins.
  local placement=() stand_ins=0
  if [ "$AGENTBOX_CLUSTER_KIND" = kwok ] && [ "$real_node" = 1 ]; then
    placement=(AGENTBOX_SESSION_NODE_SELECTOR='{"agentbox.dev/real-node": "true"}'
      AGENTBOX_SESSION_TOLERATIONS='[{"key": "agentbox.dev/real-node", "operator": "Exists", "effect": "NoSchedule"}]')
  elif [ "$AGENTBOX_CLUSTER_KIND" = kwok ]; then
    stand_ins=1
  fi
  if [ $stand_ins = 1 ]; then say "operator, session stand-ins (kwok) and API (local processes)"
  else say "operator and API (local processes); session pods run as containers"; fi
  # Processes from an earlier run talk to the cluster they started with: a recreated one needs new ones.
  local server; server=$(kube config view --minify -o jsonpath='{.clusters[0].cluster.server}')
  if [ "$(cat "$dev/cluster-server" 2>/dev/null)" != "$server" ]; then
    stop_process api "agentbox.api"
    stop_process session-runners "session_runners.py"
    stop_process operator "agentbox.operator"
    echo "$server" >"$dev/cluster-server"
  fi
  # The chart's operator environment (its Deployment's), then what differs for a local process.
  local operator_env; mapfile -t operator_env <"$dev/identity/operator.env"
  # An operator started with the other placement would put sessions where nothing runs them.
  if [ "$(cat "$dev/session-placement" 2>/dev/null)" != "${placement[*]}" ]; then
    stop_process operator "agentbox.operator"
    printf '%s' "${placement[*]}" >"$dev/session-placement"
  fi
  start_process operator "agentbox.operator" \
    "${operator_env[@]}" "${placement[@]}" KUBECONFIG="$dev/identity/operator.kubeconfig" AGENTBOX_METRICS_PORT=0 \
    -- "$py" -m agentbox.operator --peering agentbox --liveness "http://127.0.0.1:${AGENTBOX_DEV_OPERATOR_PORT:-8081}/healthz"
  if [ $stand_ins = 1 ]; then  # the real node and kind run session pods for real
    running session-runners "session_runners.py" || rm -f "$dev/session-runners.ready"
    start_process session-runners "session_runners.py" \
      -- "$py" "$here/session_runners.py" --kubeconfig "$kubeconfig" --state-dir "$dev/pods" \
      --ready-file "$dev/session-runners.ready"
    wait_file "$dev/session-runners.ready" 30 "the session stand-ins" "$dev/logs/session-runners.log"
  else
    stop_process session-runners "session_runners.py"
  fi
  start_process api "agentbox.api" \
    KUBECONFIG="$dev/identity/api.kubeconfig" AGENTBOX_PORT="$api_port" AGENTBOX_DATABASE_URL="$app_dsn" \
    AGENTBOX_JWT_ISSUER="$issuer" AGENTBOX_JWT_HS256_SECRET="$(cat "$dev/jwt-secret")" \
    AGENTBOX_ENCRYPTION_KEYS="$(cat "$dev/encryption-keys")" AGENTBOX_RUNNER_TRANSPORT=port-forward \
    AGENTBOX_AUDIT_CHECKPOINT_SIGNING_KEY="$(cat "$dev/audit-checkpoint-key")" \
    AGENTBOX_AUDIT_CHECKPOINT_DIR="$dev/audit-checkpoints" \
    -- "$py" -m agentbox.api
  wait_http "$api_url/readyz" 60 "the API" "$dev/logs/api.log"
  echo "    API ready at $api_url" >&2

  say "demo org '$demo_org' and user '$demo_user'"
  local platform_token code
  platform_token=$(mint --service-role --sub dev-platform --ttl 600)
  code=$(curl -sS -o "$dev/logs/org.json" -w '%{http_code}' -X POST "$api_url/api/v1/orgs" \
    -H "Authorization: Bearer $platform_token" -H 'Content-Type: application/json' \
    -d "{\"id\": \"$demo_org\", \"name\": \"Demo\"}")
  case $code in
    201) echo "    created org $demo_org (namespace tenant-$demo_org)" >&2 ;;
    409) echo "    org $demo_org already exists" >&2 ;;
    *) cat "$dev/logs/org.json" >&2; die "creating the demo org answered HTTP $code" ;;
  esac
  "$py" - "$superuser_dsn" "$demo_org" "$demo_user" <<'PY'
import asyncio, sys
import asyncpg

async def main(dsn, org, user):
    conn = await asyncpg.connect(dsn.rsplit("/", 1)[0] + "/agentbox")
    try:
        await conn.execute("INSERT INTO users (id, email, display_name) VALUES ($1, $1, 'Ada') "
                           "ON CONFLICT (id) DO NOTHING", user)
        await conn.execute("INSERT INTO memberships (org_id, user_id, role) VALUES ($1, $2, 'admin') "
                           "ON CONFLICT DO NOTHING", org, user)
    finally:
        await conn.close()

asyncio.run(main(*sys.argv[1:]))
PY
  (umask 077 && mint --sub "$demo_user" --org "$demo_org" --role admin >"$dev/token")

  say "demo MCP server 'demo' (stdio; each session's gateway starts it: python -m agentbox.sandbox.demo_tools)"
  code=$(curl -sS -o "$dev/logs/mcp.json" -w '%{http_code}' -X POST "$api_url/api/v1/mcp/configurations" \
    -H "Authorization: Bearer $(cat "$dev/token")" -H 'Content-Type: application/json' \
    -d '{"name": "demo", "transport": "stdio", "stdio": {"command": "python", "args": ["-m", "agentbox.sandbox.demo_tools"]}}')
  case $code in
    201) echo "    created (tools demo_echo, demo_shout, demo_read_file)" >&2 ;;
    409) echo "    already configured" >&2 ;;
    *) cat "$dev/logs/mcp.json" >&2; die "creating the demo MCP configuration answered HTTP $code" ;;
  esac

  cat <<EOF

agentbox is up in $((SECONDS - started)) s. Logs in .dev/logs/; \`make dev-down\` removes everything.
  cluster     $kubeconfig
  API         $api_url   (operator and API run as the chart's ServiceAccounts in $system_namespace)
  demo user   $demo_user, admin of org '$demo_org'; a 12-hour token is in .dev/token

Try:
  export KUBECONFIG=$kubeconfig TOKEN=\$(cat .dev/token) PATH=$(dirname "$kubectl"):\$PATH
  kubectl get ags -A
  curl -s -X POST $api_url/api/v1/sessions -H "Authorization: Bearer \$TOKEN" -H 'Content-Type: application/json' -d '{"name": "hello", "agent": {"runtime": "scripted"}, "mcpServers": [{"name": "demo"}]}'
  kubectl wait -n tenant-$demo_org ags/hello --for=condition=Ready --timeout=90s   # a few seconds
  curl -s -X POST $api_url/api/v1/sessions/hello/message -H "Authorization: Bearer \$TOKEN" -H 'Content-Type: application/json' -d '{"content": "hi there"}'
Then read the conversation, and have the (scripted) agent call a tool through the session's MCP gateway:
  curl -s $api_url/api/v1/sessions/hello/messages -H "Authorization: Bearer \$TOKEN"
  curl -s -X POST $api_url/api/v1/sessions/hello/message -H "Authorization: Bearer \$TOKEN" -H 'Content-Type: application/json' -d '{"content": "tool demo_shout {\"text\": \"hi there\"}"}'
EOF
}

down() {
  say "stopping the local processes"
  stop_process api "agentbox.api"
  stop_process session-runners "session_runners.py"
  stop_process operator "agentbox.operator"
  if [ -d "$dev/postgres" ]; then
    say "removing the database"
    "$here/postgres.sh" down "$dev/postgres"
  fi
  say "removing the cluster"
  "$here/cluster.sh" down
  rm -rf "${dev:?}"/*
  echo "dev: everything \`make dev\` made is gone" >&2
}

status() {
  local name mark
  for pair in operator:agentbox.operator session-runners:session_runners.py api:agentbox.api; do
    name=${pair%%:*} mark=${pair#*:}
    if running "$name" "$mark"; then echo "$name: running (pid $(cat "$dev/pids/$name.pid"))"; else echo "$name: stopped"; fi
  done
  "$here/cluster.sh" status || true
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) status ;;
  *) die "usage: hack/dev.sh up|down|status" ;;
esac
