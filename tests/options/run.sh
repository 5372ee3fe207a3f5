#!/bin/sh
# options_test: the CANCEL_WITH_<NAME> switches of the optional libraries.
# Configures the source tree into scratch directories (tests and examples
# off) with pkg-config pointed at an empty directory, so that no adapted
# library is found, and checks that
#   - CANCEL_WITH_CURL=ON fails configure, naming the option, the missing
#     module and its Debian package;
#   - a value other than AUTO, ON or OFF fails configure;
#   - AUTO (the default) configures without the adapters, says so in the
#     summary, and builds the rest;
#   - OFF leaves libcancel-curl out even when libcurl is found, and says so.
#
# usage: run.sh SOURCE_DIR [CMAKE [CC]]
set -eu

src=$1
cmake=${2:-cmake}
cc=${3:-cc}

work=$(mktemp -d "${TMPDIR:-/tmp}/cancel-options-test.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir "$work/no-pc"

step() { echo "== $*"; }

fail() {
  echo "FAIL: $*" >&2
  exit 1
}

# configure DIR ARGS...: configures SOURCE_DIR into DIR, output in DIR.log;
# returns cmake's status.
configure() {
  cf_dir=$1
  shift
  "$cmake" -S "$src" -B "$cf_dir" -DCMAKE_C_COMPILER="$cc" \
    -DCANCEL_BUILD_TESTS=OFF -DCANCEL_BUILD_EXAMPLES=OFF "$@" \
    >"$cf_dir.log" 2>&1
}

# no_pc CMD...: runs CMD with pkg-config seeing no module at all.
no_pc() (
  unset PKG_CONFIG_PATH
  PKG_CONFIG_LIBDIR=$work/no-pc
  export PKG_CONFIG_LIBDIR
  "$@"
)

# expect LOG TEXT: fails unless LOG contains TEXT (a fixed string; CMake
# wraps its messages, so any run of white space matches one space).
expect() {
  tr -s ' \n' '  ' <"$1" | grep -qF -- "$2" ||
    { cat "$1" >&2; fail "$1 does not say: $2"; }
}

step "CANCEL_WITH_CURL=ON, libcurl not found: configure fails"
if no_pc configure "$work/on" -DCANCEL_WITH_CURL=ON; then
  cat "$work/on.log" >&2
  fail "configure succeeded with CANCEL_WITH_CURL=ON and no libcurl"
fi
expect "$work/on.log" "CANCEL_WITH_CURL is ON but libcancel-curl cannot be built"
expect "$work/on.log" "pkg-config finds no libcurl (Debian: libcurl4-openssl-dev)"
grep -A3 "CMake Error" "$work/on.log"

step "CANCEL_WITH_SQLITE=maybe: configure fails"
if configure "$work/bad" -DCANCEL_WITH_SQLITE=maybe; then
  fail "configure accepted CANCEL_WITH_SQLITE=maybe"
fi
expect "$work/bad.log" "CANCEL_WITH_SQLITE is 'maybe': it must be AUTO, ON or OFF"

step "AUTO, nothing found: configures, the summary says why, the rest builds"
no_pc configure "$work/auto" || { cat "$work/auto.log" >&2; fail "configure failed"; }
sed -n '/what is built/,/^-- $/p' "$work/auto.log"
for a in sqlite:sqlite3:libsqlite3-dev curl:libcurl:libcurl4-openssl-dev \
  pq:libpq:libpq-dev http:libmicrohttpd:libmicrohttpd-dev; do
  IFS=: read -r name module deb <<EOT
$a
EOT
  expect "$work/auto.log" "libcancel-$name"
  grep -qE -- "libcancel-$name +no: pkg-config finds no $module \(Debian: $deb\)" \
    "$work/auto.log" || { cat "$work/auto.log" >&2; fail "summary of libcancel-$name"; }
done
grep -qE -- "libcancel-host +yes" "$work/auto.log" || fail "summary of libcancel-host"
[ "$(cat "$work/auto/cancel-adapters.txt")" = host ] ||
  fail "cancel-adapters.txt: $(cat "$work/auto/cancel-adapters.txt")"
"$cmake" --build "$work/auto" -j2 >"$work/auto-build.log" 2>&1 ||
  { cat "$work/auto-build.log" >&2; fail "the build without adapters failed"; }
for lib in libcancel.so libcancel-host.so; do
  [ -e "$work/auto/$lib" ] || fail "$lib was not built"
done
[ ! -e "$work/auto/libcancel-curl.so" ] || fail "libcancel-curl.so was built"
echo "built: $(cd "$work/auto" && echo libcancel*.so libcancel*.a)"

step "CANCEL_WITH_CURL=OFF: not built though libcurl may be found"
configure "$work/off" -DCANCEL_WITH_CURL=OFF ||
  { cat "$work/off.log" >&2; fail "configure failed"; }
grep -qE -- "libcancel-curl +no: CANCEL_WITH_CURL=OFF" "$work/off.log" ||
  { cat "$work/off.log" >&2; fail "summary of libcancel-curl"; }
if grep -qx curl "$work/off/cancel-adapters.txt"; then
  fail "cancel-adapters.txt lists curl"
fi

echo "options test passed"
