#!/usr/bin/env bash
# A throwaway PostgreSQL 15 for tests and local development.
#
#   hack/postgres.sh up DIR [PORT]   init a fresh cluster in DIR, start it on 127.0.0.1 (PORT or a free
#                                    one), print the superuser DSN as the last line
#   hack/postgres.sh url DIR         print the superuser DSN of the server in DIR
#   hack/postgres.sh stop DIR        stop the server, keep its data (to provoke an outage)
#   hack/postgres.sh start DIR       start a stopped server again on the same port
#   hack/postgres.sh restart DIR     fast restart (pg_ctl restart -m fast): every connection is cut, the
#                                    server is back within a moment on the same port
#   hack/postgres.sh down DIR        stop the server and remove DIR
#
# Durability is off (fsync, synchronous_commit, full_page_writes): the data is disposable by design.
# Run as root, the server runs as the unprivileged `postgres` system user (PostgreSQL refuses root).
set -euo pipefail

PG_VERSION=15
PG_BIN=/usr/lib/postgresql/${PG_VERSION}/bin

die() { echo "postgres.sh: $*" >&2; exit 1; }

usage() { die "usage: $0 up DIR [PORT] | url DIR | stop DIR | start DIR | restart DIR | down DIR"; }

# Run a command as the server's user: `postgres` when we are root, else ourselves.
as_server_user() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

install_postgres() {
  [ -x "$PG_BIN/initdb" ] && return 0
  [ "$(id -u)" -eq 0 ] || die "PostgreSQL ${PG_VERSION} is missing and installing it needs root"
  echo "postgres.sh: installing postgresql-${PG_VERSION} from Debian" >&2
  # Debian would otherwise create and start a system-wide cluster we do not want.
  mkdir -p /etc/postgresql-common
  [ -f /etc/postgresql-common/createcluster.conf ] \
    || echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq "postgresql-${PG_VERSION}" >/dev/null
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

is_running() { [ -f "$1/data/postmaster.pid" ] && as_server_user "$PG_BIN/pg_ctl" -D "$1/data" status >/dev/null 2>&1; }

stop_server() {
  local dir=$1
  if is_running "$dir"; then
    as_server_user "$PG_BIN/pg_ctl" -D "$dir/data" -m fast -w -t 30 stop >/dev/null 2>&1 \
      || as_server_user "$PG_BIN/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
  fi
}

start_server() {
  local dir=$1 port
  port=$(cat "$dir/port")
  port_in_use "$port" && die "port $port on 127.0.0.1 is already in use"
  if ! as_server_user "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 start >/dev/null; then
    die "server in $dir failed to start: $(tail -n 1 "$dir/postgres.log" 2>/dev/null)"
  fi
  for _ in $(seq 1 100); do
    "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$port" && return 0
    sleep 0.1
  done
  die "server in $dir did not become ready: $(tail -n 1 "$dir/postgres.log" 2>/dev/null)"
}

restart_server() {
  local dir=$1
  as_server_user "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -m fast -w -t 60 restart >/dev/null \
    || die "server in $dir failed to restart: $(tail -n 1 "$dir/postgres.log" 2>/dev/null)"
}

print_url() {
  local dir=$1
  [ -f "$dir/port" ] && [ -f "$dir/superuser-password" ] || die "no server was set up in $dir"
  echo "postgresql://postgres:$(cat "$dir/superuser-password")@127.0.0.1:$(cat "$dir/port")/postgres"
}

cmd_up() {
  local dir=$1 port=${2:-}
  install_postgres
  if [ -n "$port" ]; then
    [[ "$port" =~ ^[0-9]+$ ]] && [ "$port" -ge 1024 ] && [ "$port" -le 65535 ] || die "PORT must be 1024-65535"
    port_in_use "$port" && die "port $port on 127.0.0.1 is already in use"
  else
    port=$(free_port)
  fi
  # A DIR left behind by a killed run: stop whatever still runs there and start clean.
  if [ -e "$dir" ]; then
    [ -d "$dir/data" ] && stop_server "$dir"
    rm -rf "${dir:?}"
  fi
  mkdir -p "$dir"
  chmod 700 "$dir"
  [ "$(id -u)" -eq 0 ] && chown postgres:postgres "$dir"
  as_server_user test -x "$dir" || die "the postgres user cannot reach $dir (a parent folder is private)"

  echo "$port" > "$dir/port"
  python3 -c 'import secrets; print(secrets.token_urlsafe(24))' > "$dir/superuser-password"
  chmod 600 "$dir/port" "$dir/superuser-password"
  [ "$(id -u)" -eq 0 ] && chown postgres:postgres "$dir/port" "$dir/superuser-password"

  as_server_user "$PG_BIN/initdb" -D "$dir/data" -U postgres --pwfile="$dir/superuser-password" \
    --auth-local=trust --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 --no-sync \
    >"$dir/initdb.log" 2>&1 || die "initdb failed: $(tail -n 1 "$dir/initdb.log")"
  cat >> "$dir/data/postgresql.conf" <<EOF

# hack/postgres.sh: loopback only, socket beside the data, durability off (throwaway data)
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir'
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 300
log_min_messages = warning
log_min_error_statement = panic
EOF
  # Only loopback TCP with a password, plus the private socket inside DIR.
  cat > "$dir/data/pg_hba.conf" <<EOF
local all all trust
host  all all 127.0.0.1/32 scram-sha-256
EOF
  start_server "$dir"
  print_url "$dir"
}

[ $# -ge 2 ] || usage
command=$1
dir=$(realpath -m "$2")
case "$command" in
  up)    cmd_up "$dir" "${3:-}" ;;
  url)   print_url "$dir" ;;
  stop)  [ -d "$dir/data" ] || die "no server in $dir"; stop_server "$dir" ;;
  start) [ -d "$dir/data" ] || die "no server in $dir"; is_running "$dir" || start_server "$dir" ;;
  restart) [ -d "$dir/data" ] || die "no server in $dir"; restart_server "$dir" ;;
  down)  [ -d "$dir/data" ] && stop_server "$dir"; rm -rf "${dir:?}" ;;
  *)     usage ;;
esac
