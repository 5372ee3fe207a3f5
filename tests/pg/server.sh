#!/bin/sh
# tests/pg/server.sh: a throwaway PostgreSQL server for the tests.
#
#   server.sh start DIR   initdb DIR/data, start a server listening only on
#                         a Unix socket in DIR, print its conninfo on stdout
#   server.sh stop DIR    stop it (immediate mode) and remove DIR
#
# DIR must exist and be empty.  PostgreSQL refuses to run as root: when
# run as root (CI), the cluster belongs to the `postgres` user that
# Debian's postgresql package creates (or `nobody` without it).  The
# binaries come from /usr/lib/postgresql/<newest>/bin (Debian's layout),
# else from PATH.  Nothing is written outside DIR.
set -eu

cmd=${1:?usage: server.sh start|stop DIR}
dir=${2:?usage: server.sh start|stop DIR}

# The newest version's binaries (a glob sorts 10 before 9: sort by number).
bindir=""
for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k4,4n); do
  [ -x "$d/initdb" ] && bindir=$d
done
pgbin() { if [ -n "$bindir" ]; then echo "$bindir/$1"; else command -v "$1"; fi; }

as_owner() {
  if [ "$(id -u)" = 0 ]; then
    owner=postgres
    id "$owner" >/dev/null 2>&1 || owner=nobody
    # setpriv (util-linux) keeps the environment and needs no PAM session.
    setpriv --reuid="$owner" --regid="$(id -g "$owner")" --clear-groups "$@"
  else
    "$@"
  fi
}

case $cmd in
start)
  initdb=$(pgbin initdb) || { echo "server.sh: initdb not found (Debian: postgresql)" >&2; exit 1; }
  pg_ctl=$(pgbin pg_ctl)
  if [ "$(id -u)" = 0 ]; then
    owner=postgres
    id "$owner" >/dev/null 2>&1 || owner=nobody
    chown "$owner" "$dir"
  fi
  chmod 700 "$dir"
  as_owner "$initdb" -D "$dir/data" -U postgres -A trust -E UTF8 \
    --locale=C --no-sync >"$dir/initdb.log" 2>&1 ||
    { cat "$dir/initdb.log" >&2; exit 1; }
  # Unix socket only (no TCP port to collide with), no fsync: the data is
  # thrown away with DIR.
  as_owner "$pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
    -o "-k $dir -c listen_addresses= -c fsync=off -c full_page_writes=off" \
    start >"$dir/pg_ctl.log" 2>&1 ||
    { cat "$dir/pg_ctl.log" "$dir/server.log" >&2; exit 1; }
  echo "host=$dir user=postgres dbname=postgres"
  ;;
stop)
  if [ -f "$dir/data/postmaster.pid" ]; then
    as_owner "$(pgbin pg_ctl)" -D "$dir/data" -m immediate -w stop \
      >/dev/null 2>&1 || true
  fi
  rm -rf "$dir"
  ;;
*)
  echo "usage: server.sh start|stop DIR" >&2
  exit 2
  ;;
esac
