#!/bin/sh
# install_test: installs a build tree into a scratch prefix and checks that
# an out-of-tree program (hello.c) builds and runs against it, with
# pkg-config (shared and static) and with find_package(cancel).
#
# usage: run.sh BUILD_DIR LIBDIR [CMAKE [CC]]
#   BUILD_DIR  the configured and built libcancel tree
#   LIBDIR     CMAKE_INSTALL_LIBDIR of that tree (e.g. lib)
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

# Prints OK or fails: the program must print exactly OK.
check_ok() {
  out=$("$@")
  if [ "$out" != OK ]; then
    echo "FAIL: $* printed: $out" >&2
    exit 1
  fi
  echo "$1: OK"
}

step "cmake --install into $prefix"
"$cmake" --install "$build" --prefix "$prefix" >"$work/install.log" ||
  { cat "$work/install.log" >&2; exit 1; }

export PKG_CONFIG_PATH="$prefix/$libdir/pkgconfig"
export LD_LIBRARY_PATH="$prefix/$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

step "pkg-config, shared: $(pkg-config --cflags --libs cancel)"
# shellcheck disable=SC2046 # word splitting of the flags is intended
"$cc" -o "$work/hello_pc" "$here/hello.c" $(pkg-config --cflags --libs cancel)
check_ok "$work/hello_pc"
if ! readelf -d "$work/hello_pc" | grep -q 'NEEDED.*libcancel\.so\.0'; then
  echo "FAIL: hello_pc is not linked to libcancel.so.0" >&2
  exit 1
fi

step "pkg-config, static: $(pkg-config --static --cflags --libs cancel)"
# -l:libcancel.a picks the archive where -lcancel would pick the .so.
libs=$(pkg-config --static --libs cancel | sed 's/-lcancel\b/-l:libcancel.a/')
# shellcheck disable=SC2046,SC2086
"$cc" -o "$work/hello_pc_static" "$here/hello.c" \
  $(pkg-config --cflags cancel) $libs
check_ok "$work/hello_pc_static"
if readelf -d "$work/hello_pc_static" | grep -q 'NEEDED.*libcancel'; then
  echo "FAIL: hello_pc_static needs libcancel.so" >&2
  exit 1
fi

step "find_package(cancel) with CMAKE_PREFIX_PATH=$prefix"
"$cmake" -S "$here" -B "$work/cmake-build" -DCMAKE_PREFIX_PATH="$prefix" \
  -DCMAKE_C_COMPILER="$cc" >"$work/cmake.log" ||
  { cat "$work/cmake.log" >&2; exit 1; }
"$cmake" --build "$work/cmake-build" >"$work/build.log" ||
  { cat "$work/build.log" >&2; exit 1; }
check_ok "$work/cmake-build/hello"
check_ok "$work/cmake-build/hello_static"

echo "install test passed"
