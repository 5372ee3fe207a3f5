#!/usr/bin/env bash
#
# examples/reportd/demo.sh [BUILD_DIR]: what `make demo` shows.  Starts the
# downstream and reportd (SQLite, a fresh file in a temp dir) on free
# ports, plays the five scenarios of the reference service with real
# clients, checks each against reportd's log lines and prints a summary
# table.  Exits 0 only when every scenario behaved; otherwise prints what
# did not and the logs.  BUILD_DIR defaults to build/ at the top of the
# source tree.  Needs curl and perl (make deps-check installs them).
set -u -o pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
build=${1:-$here/../../build}
# shellcheck source=examples/reportd/lib.sh
. "$here/lib.sh"

rd_setup "$build/examples/reportd"
rd_start_downstream

echo "== reportd: cooperative cancellation in a real service"
echo "   downstream on port $DS_PORT; reportd on free ports, SQLite in a temp dir"
echo
rd_play_core ""
echo
echo "== the watchdog: work that ignores its token, found by name"
rd_play_diag
echo
echo "   What the watchdog printed (reportd's log):"
grep 'component=watchdog' "$RD_LOG" | cut -c1-200 | sed 's/^/   /'
echo
rd_table
rd_finish
