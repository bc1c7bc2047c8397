#!/usr/bin/env bash
# Installs the system programs the local stack needs, only those missing, with Debian's apt.
# Needs root for apt; without it, prints what to install. Go (>= 1.24) is expected on the
# machine: Debian's own Go is too old to build FerretDB v1.
set -euo pipefail

need=()
command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ] || need+=(redis-server)
command -v kcat >/dev/null 2>&1 || need+=(kcat)
command -v java >/dev/null 2>&1 || need+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || need+=(maven)
# PostgreSQL's server: FerretDB's default storage (STOCKFLOW_FERRETDB_BACKEND=sqlite needs none).
if [ "${STOCKFLOW_FERRETDB_BACKEND:-postgresql}" = "postgresql" ] &&
   ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 && ! command -v postgres >/dev/null 2>&1; then
  need+=(postgresql)
fi

if ! command -v go >/dev/null 2>&1; then
  echo "system-deps: Go 1.24 or newer is needed to build FerretDB (or set MONGODB_URI)." >&2
fi

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: please install: ${need[*]}" >&2
  exit 1
fi
echo "system-deps: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# Debian starts system-wide redis-server and PostgreSQL services where it can (not in
# containers without an init); stockflow runs its own instances on ports of its own.
