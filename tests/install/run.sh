#!/bin/sh
# install_test: installs a build tree into a scratch prefix and checks that
# out-of-tree programs build and run against it, with pkg-config (shared
# and static) and with find_package(cancel): hello.c for the core, and
# hello_<adapter>.c for each optional library the build made (listed one a
# line in BUILD_DIR/cancel-adapters.txt: the adapters, and the host, which
# adapts no library).  An adapter without a hello_<adapter>.c
# is checked for its cancel-<adapter>.pc and its CMake targets, and its
# header is compiled with the flags of each.
#
# usage: run.sh BUILD_DIR LIBDIR [CMAKE [CC]]
#   BUILD_DIR  the configured and built libcancel tree
#   LIBDIR     CMAKE_INSTALL_LIBDIR of that tree (e.g. lib)
# With CANCEL_INSTALLED_PREFIX set, nothing is installed: the programs are
# built against the files already there (tests/package/run.sh unpacks the
# Debian packages into it; LIBDIR is then theirs), and
# CANCEL_INSTALLED_ADAPTERS, when set, lists the optional libraries
# installed there, if not all of the build's.
set -eu

build=$1
libdir=$2
cmake=${3:-cmake}
cc=${4:-cc}
here=$(cd "$(dirname "$0")" && pwd)

work=$(mktemp -d "${TMPDIR:-/tmp}/cancel-install-test.XXXXXX")
trap 'rm -rf "$work"' EXIT
prefix=$work/prefix

step() { echo "== $*"; }

fail() {
  echo "FAIL: $*" >&2
  exit 1
}

# Prints OK or fails: the program must print exactly OK.
check_ok() {
  out=$("$@")
  if [ "$out" != OK ]; then
    fail "$* printed: $out"
  fi
  echo "$1: OK"
}

# needs PROGRAM SONAME: fails unless PROGRAM is dynamically linked to the
# library of that SONAME (e.g. libcancel.so.0.1).
needs() {
  readelf -d "$1" | grep NEEDED | grep -qF "[$2]" ||
    fail "$1 is not linked to $2"
}

# soname_of LIBRARY: its SONAME.
soname_of() {
  readelf -d "$1" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p'
}

# needs_not PROGRAM LIB: fails when it is.
needs_not() {
  if readelf -d "$1" | grep -q "NEEDED.*$2"; then
    fail "$1 needs $2"
  fi
}

# static_libs ADAPTER FLAGS...: the flags, with -lcancel and
# -lcancel-ADAPTER naming the archives (-l:libcancel.a), where -lcancel
# would pick the .so.
static_libs() {
  sl_adapter=$1
  shift
  sl_out=""
  for sl_flag in "$@"; do
    case $sl_flag in
    -lcancel) sl_flag=-l:libcancel.a ;;
    -lcancel-"$sl_adapter") sl_flag=-l:libcancel-$sl_adapter.a ;;
    esac
    sl_out="$sl_out $sl_flag"
  done
  echo "$sl_out"
}

[ -f "$build/cancel-adapters.txt" ] ||
  fail "$build/cancel-adapters.txt does not exist: configure the build again"
adapters=$(grep -v '^$' "$build/cancel-adapters.txt" | tr '\n' ' ')
adapters=${adapters% }
# Fewer when the packages of some were not installed (tests/package).
adapters=${CANCEL_INSTALLED_ADAPTERS-$adapters}

if [ -n "${CANCEL_INSTALLED_PREFIX:-}" ]; then
  # tests/package/run.sh: the files come from the Debian packages.
  prefix=$CANCEL_INSTALLED_PREFIX
  step "installed in $prefix (adapters: ${adapters:-none})"
else
  step "cmake --install into $prefix (adapters: ${adapters:-none})"
  "$cmake" --install "$build" --prefix "$prefix" >"$work/install.log" ||
    { cat "$work/install.log" >&2; exit 1; }
fi

export PKG_CONFIG_PATH="$prefix/$libdir/pkgconfig"
export LD_LIBRARY_PATH="$prefix/$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# The SONAME follows the ABI policy (docs/abi.md): while 0.x it carries
# the minor version, since a minor release may break the ABI; from 1.0 the
# major version alone.
version=$(pkg-config --modversion cancel)
major=${version%%.*}
minor=${version#*.}
minor=${minor%%.*}
if [ "$major" = 0 ]; then soversion=0.$minor; else soversion=$major; fi
for lib in "$prefix/$libdir"/libcancel*.so; do
  name=$(basename "$lib" .so)
  [ "$(soname_of "$lib")" = "$name.so.$soversion" ] ||
    fail "$lib has SONAME '$(soname_of "$lib")', not $name.so.$soversion"
done
echo "SONAMEs: *.so.$soversion (version $version)"

step "pkg-config, shared: $(pkg-config --cflags --libs cancel)"
# shellcheck disable=SC2046 # word splitting of the flags is intended
"$cc" -o "$work/hello_pc" "$here/hello.c" $(pkg-config --cflags --libs cancel)
check_ok "$work/hello_pc"
needs "$work/hello_pc" "libcancel.so.$soversion"

step "pkg-config, static: $(pkg-config --static --cflags --libs cancel)"
# shellcheck disable=SC2046
"$cc" -o "$work/hello_pc_static" "$here/hello.c" \
  $(pkg-config --cflags cancel) \
  $(static_libs none $(pkg-config --static --libs cancel))
check_ok "$work/hello_pc_static"
needs_not "$work/hello_pc_static" libcancel

echo 'int main(void) { return 0; }' >"$work/empty.c"
includedir=$(pkg-config --variable=includedir cancel)
for a in $adapters; do
  pc=cancel-$a
  [ -f "$prefix/$libdir/pkgconfig/$pc.pc" ] || fail "$pc.pc was not installed"
  [ -f "$includedir/cancel/$a.h" ] || fail "cancel/$a.h was not installed"
  # Requires: this very cancel, and the library the adapter adapts: in
  # Requires when its header includes that library's and takes its types
  # (every user calls it: curl, sqlite, pq), in Requires.private when the
  # header names none of them (http: only a static link needs it).  A
  # library built on libcancel alone (cancel-host) requires cancel only.
  requires=$(pkg-config --print-requires "$pc")
  echo "$requires" | grep -qx "cancel = $(pkg-config --modversion cancel)" ||
    fail "$pc.pc requires '$requires', not this very cancel"
  case $a in
  http) field=--print-requires-private ;;
  *) field=--print-requires ;;
  esac
  # The adapted module, e.g. libcurl (a version constraint, if any,
  # dropped), named there and by the .pc's `adapts` variable.
  module=$(pkg-config "$field" "$pc" | grep -v '^cancel ' | head -n 1)
  module=${module%% *}
  adapts=$(pkg-config --variable=adapts "$pc")
  [ "$module" = "$adapts" ] ||
    fail "$pc.pc: $field gives module '$module' but it says it adapts '$adapts'"
  if [ ! -f "$here/hello_$a.c" ]; then
    step "$pc: no hello_$a.c, compiling cancel/$a.h only: $(pkg-config --cflags "$pc")"
    printf '#include <cancel/%s.h>\nint main(void) { return 0; }\n' "$a" \
      >"$work/include_$a.c"
    # shellcheck disable=SC2046
    "$cc" -c -o "$work/include_$a.o" "$work/include_$a.c" \
      $(pkg-config --cflags "$pc")
    continue
  fi

  # The program calls the adapted library itself: the adapter's .pc
  # brings it (public Requires), nothing else is named.
  step "pkg-config, shared: $(pkg-config --cflags --libs "$pc")"
  # shellcheck disable=SC2046
  "$cc" -o "$work/hello_${a}_pc" "$here/hello_$a.c" \
    $(pkg-config --cflags --libs "$pc")
  check_ok "$work/hello_${a}_pc"
  needs "$work/hello_${a}_pc" "libcancel-$a.so.$soversion"

  step "pkg-config, static: $(pkg-config --static --libs "$pc")"
  # shellcheck disable=SC2046
  libs=$(static_libs "$a" $(pkg-config --static --libs "$pc"))
  # shellcheck disable=SC2046,SC2086
  if ! "$cc" -o "$work/hello_${a}_pc_static" "$here/hello_$a.c" \
    $(pkg-config --cflags "$pc") $libs 2>"$work/static.err"; then
    # Distributions ship a module's .pc listing the private libraries of
    # a static build without those libraries' development files (Debian's
    # libcurl: -lrtmp, -lssh2...).  When the module alone cannot be
    # linked statically, that is the system's business: link our archives
    # with the shared module instead.  Otherwise the fault is ours.
    # shellcheck disable=SC2046
    if "$cc" -o "$work/empty" "$work/empty.c" \
      $(pkg-config --static --libs "$module") 2>"$work/probe.err"; then
      cat "$work/static.err" >&2
      fail "hello_$a.c does not link with pkg-config --static $pc"
    fi
    echo "note: $module cannot be linked statically on this system" \
      "($(grep -m1 -o 'cannot find -l[^: ]*' "$work/probe.err" || echo 'see its .pc')):" \
      "libcancel-$a.a with the shared $module instead"
    # shellcheck disable=SC2046
    libs="$(static_libs "$a" -lcancel-"$a" $(pkg-config --static --libs cancel)) \
$(pkg-config --libs "$module")"
    # shellcheck disable=SC2046,SC2086
    "$cc" -o "$work/hello_${a}_pc_static" "$here/hello_$a.c" \
      $(pkg-config --cflags "$pc") $libs
  fi
  check_ok "$work/hello_${a}_pc_static"
  needs_not "$work/hello_${a}_pc_static" libcancel
done

step "find_package(cancel COMPONENTS $adapters) with CMAKE_PREFIX_PATH=$prefix"
# shellcheck disable=SC2086 # word splitting of the list is intended
"$cmake" -S "$here" -B "$work/cmake-build" -DCMAKE_PREFIX_PATH="$prefix" \
  -DCMAKE_C_COMPILER="$cc" -DCANCEL_TEST_ADAPTERS="$(echo $adapters | tr ' ' ';')" \
  >"$work/cmake.log" ||
  { cat "$work/cmake.log" >&2; exit 1; }
"$cmake" --build "$work/cmake-build" >"$work/build.log" ||
  { cat "$work/build.log" >&2; exit 1; }
check_ok "$work/cmake-build/hello"
check_ok "$work/cmake-build/hello_static"
for a in $adapters; do
  [ -f "$here/hello_$a.c" ] || continue
  check_ok "$work/cmake-build/hello_$a"
  needs "$work/cmake-build/hello_$a" "libcancel-$a.so.$soversion"
  check_ok "$work/cmake-build/hello_${a}_static"
  needs_not "$work/cmake-build/hello_${a}_static" libcancel
done

echo "install test passed"
