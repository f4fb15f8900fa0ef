#!/usr/bin/env bash
# A throwaway PostgreSQL cluster on loopback for MLflow's backend store (development and tests;
# a team uses its managed PostgreSQL and only sets MLFLOW_BACKEND_STORE_URI).
#
#   mlflow/postgres-dev.sh start DIR PORT   create (first time) and start a cluster in DIR; prints the URI
#   mlflow/postgres-dev.sh stop DIR
#
# Debian's server binaries (package postgresql). initdb refuses to run as root, so as root the
# cluster belongs to the `postgres` user.
set -euo pipefail
action="$1"; dir="$2"; port="${3:-5432}"
bin="$(dirname "$(readlink -f "$(command -v initdb || echo /usr/lib/postgresql/15/bin/initdb)")")"
as_owner() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
case "$action" in
  start)
    mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown postgres: "$dir"
    if [ ! -f "$dir/PG_VERSION" ]; then
      as_owner "$bin/initdb" -D "$dir" -U mlflow --auth=trust >/dev/null
    fi
    as_owner "$bin/pg_ctl" -D "$dir" -l "$dir/server.log" -w \
      -o "-p $port -k $dir -c listen_addresses=127.0.0.1" start >/dev/null
    as_owner "$bin/psql" -h 127.0.0.1 -p "$port" -U mlflow -d postgres -tAc \
      "SELECT 1 FROM pg_database WHERE datname='mlflow'" | grep -q 1 \
      || as_owner "$bin/createdb" -h 127.0.0.1 -p "$port" -U mlflow mlflow
    # +psycopg2: SQLAlchemy 2.1 otherwise picks psycopg 3, which we do not install
    echo "postgresql+psycopg2://mlflow@127.0.0.1:$port/mlflow"
    ;;
  stop)
    as_owner "$bin/pg_ctl" -D "$dir" -m fast -w stop >/dev/null
    ;;
  *) echo "usage: $0 start DIR PORT | stop DIR" >&2; exit 2 ;;
esac
