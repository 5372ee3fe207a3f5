#!/bin/sh
# package_test: the Debian packages of a build tree (cmake/packaging.cmake)
# install and build programs.
#   1. Every installed file belongs to a packaged component.
#   2. cpack -G DEB makes exactly libcancel<so>, libcancel-dev and, for each
#      optional library <name> of the build, libcancel-<name><so> and
#      libcancel-<name>-dev (<so> is the SOVERSION, docs/abi.md).
#   3. Their control fields: the core's packages depend on the C library
#      and on each other only; an adapter's runtime package depends on the
#      packages of the libraries it is linked to (dpkg-shlibdeps); its -dev
#      package on libcancel-dev and the adapted library's -dev package;
#      each runtime package ships a shlibs file naming its SONAME.
#   4. dpkg -i installs them into a scratch root (dpkg --root, with a copy of
#      this machine's package database; the maintainer scripts run
#      chrootless): with every adapted library's packages removed from
#      that database, the core's packages still install and an adapter's
#      is refused for its dependency.
#   5. tests/install/run.sh builds its programs against the installed files
#      (CMAKE_PREFIX_PATH, PKG_CONFIG_PATH and LD_LIBRARY_PATH pointing
#      there) and runs them: find_package(cancel COMPONENTS ...) and
#      pkg-config, shared and static.
#
# usage: run.sh BUILD_DIR [CMAKE [CC]]
#   The packages are made with cpack in a scratch directory, unless
#   CANCEL_PACKAGE_DIR names a directory that holds them already (make
#   package).
set -eu

build=$(cd "$1" && pwd)
cmake=${2:-cmake}
cc=${3:-cc}
here=$(cd "$(dirname "$0")" && pwd)
cpack=$(dirname "$cmake")/cpack
[ -x "$cpack" ] || cpack=cpack

work=$(mktemp -d "${TMPDIR:-/tmp}/cancel-package-test.XXXXXX")
trap 'rm -rf "$work"' EXIT

step() { echo "== $*"; }

fail() {
  echo "FAIL: $*" >&2
  exit 1
}

for tool in dpkg dpkg-deb dpkg-shlibdeps readelf; do
  command -v "$tool" >/dev/null || { echo "$tool not found: skipped"; exit 77; }
done

adapters=$(grep -v '^$' "$build/cancel-adapters.txt" | tr '\n' ' ')
adapters=${adapters% }
version=$(sed -n 's/^Version: //p' "$build/cancel.pc")
soversion=$(readelf -d "$build/libcancel.so" |
  sed -n 's/.*(SONAME).*\[libcancel\.so\.\(.*\)\]/\1/p')
[ -n "$soversion" ] || fail "no SONAME in $build/libcancel.so"

step "1. every installed file is in a packaged component"
"$cmake" --install "$build" --component Unspecified --prefix "$work/unspecified" \
  >/dev/null
if [ -d "$work/unspecified" ] && [ -n "$(find "$work/unspecified" ! -type d)" ]; then
  find "$work/unspecified" ! -type d >&2
  fail "files installed without a COMPONENT (give them one: dev, runtime, <adapter>...)"
fi

if [ -n "${CANCEL_PACKAGE_DIR:-}" ]; then
  debs=$(cd "$CANCEL_PACKAGE_DIR" && pwd)
  step "2. packages of $debs"
else
  debs=$work/debs
  step "2. cpack -G DEB (adapters: ${adapters:-none})"
  (cd "$build" && "$cpack" -G DEB -B "$debs") >"$work/cpack.log" 2>&1 ||
    { cat "$work/cpack.log" >&2; fail "cpack failed"; }
fi

expected="libcancel$soversion libcancel-dev"
for a in $adapters; do
  expected="$expected libcancel-$a$soversion libcancel-$a-dev"
done
made=$(for d in "$debs"/*.deb; do dpkg-deb -f "$d" Package; done | sort | tr '\n' ' ')
want=$(echo "$expected" | tr ' ' '\n' | sort | tr '\n' ' ')
[ "$made" = "$want" ] || fail "packages made: $made; expected: $want"
echo "made: $made"

deb() { echo "$debs/$1_$version-"*.deb; }

# depends PACKAGE: its Depends, one package name a line (alternatives and
# versions dropped).
depends() {
  dpkg-deb -f "$(deb "$1")" Depends | tr ',' '\n' |
    sed 's/|.*//; s/(.*)//; s/ //g' | grep -v '^$' || true
}

# has_dep PACKAGE DEP: fails unless PACKAGE depends on DEP.
has_dep() {
  depends "$1" | grep -qx "$2" ||
    fail "$1 does not depend on $2: $(dpkg-deb -f "$(deb "$1")" Depends)"
}

# owner FILE-GLOB: the package of this machine that holds the file.
owner() {
  dpkg -S "$1" 2>/dev/null | head -n 1 | sed 's/[:,].*//'
}

step "3. control fields"
core=libcancel$soversion
for p in $core libcancel-dev; do
  extra=$(depends "$p" | grep -vx "libc6\|$core" || true)
  [ -z "$extra" ] || fail "$p depends on $(echo "$extra" | tr '\n' ' '): the core must bring none"
  echo "$p: Depends: $(dpkg-deb -f "$(deb "$p")" Depends)"
done
has_dep libcancel-dev "$core"
dpkg-deb --ctrl-tarfile "$(deb "$core")" | tar -xO ./shlibs |
  grep -qx "libcancel $soversion $core (>= $version-1)" ||
  fail "$core: no shlibs line for libcancel.so.$soversion"
# The runtime package holds the library and its SONAME link only.
files=$(dpkg-deb -c "$(deb "$core")" | awk '$1 !~ /^d/ { print $6 }' |
  sed 's|.*/||' | sort | tr '\n' ' ')
[ "$files" = "libcancel.so.$soversion libcancel.so.$version " ] ||
  fail "$core holds: $files"

for a in $adapters; do
  rt=libcancel-$a$soversion
  dev=libcancel-$a-dev
  has_dep "$rt" "$core"
  has_dep "$dev" "$rt"
  has_dep "$dev" libcancel-dev
  dpkg-deb --ctrl-tarfile "$(deb "$rt")" | tar -xO ./shlibs |
    grep -q "^libcancel-$a $soversion $rt " || fail "$rt: no shlibs line"
  # The libraries the adapter is linked to (other than the C library and
  # the core): their runtime packages are in Depends.
  dpkg-deb -x "$(deb "$rt")" "$work/x-$a"
  so=$(find "$work/x-$a" -name "libcancel-$a.so.$soversion")
  for needed in $(readelf -d "$so" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
    case $needed in libc.so.* | libcancel.so.*) continue ;; esac
    pkg=$(owner "*/$needed")
    [ -n "$pkg" ] || fail "no package of this machine holds $needed"
    has_dep "$rt" "$pkg"
  done
  # The adapted library's development package (the one holding its .pc).
  module=$(sed -n 's/^adapts=//p' "$build/cancel-$a.pc")
  if [ -n "$module" ]; then
    pkg=$(owner "*/pkgconfig/$module.pc")
    [ -n "$pkg" ] || fail "no package of this machine holds $module.pc"
    has_dep "$dev" "$pkg"
  fi
  echo "$rt: Depends: $(dpkg-deb -f "$(deb "$rt")" Depends)"
  echo "$dev: Depends: $(dpkg-deb -f "$(deb "$dev")" Depends)"
done

# scratch_root DIR [PACKAGE-REGEX]: a root for dpkg --root whose package
# database is this machine's, less the packages matching the regex.
scratch_root() {
  mkdir -p "$1/var/lib/dpkg/info" "$1/var/lib/dpkg/updates" \
    "$1/var/lib/dpkg/triggers"
  awk -v RS= -v ORS='\n\n' -v drop="${2:-^$}" '
    { split($0, l, "\n"); sub(/^Package: /, "", l[1]) }
    l[1] !~ drop' /var/lib/dpkg/status >"$1/var/lib/dpkg/status"
}

step "4. dpkg -i into scratch roots, the dependencies checked"
# dpkg --root installs into the scratch root against its copy of the
# package database; --force-script-chrootless runs the maintainer scripts
# (ldconfig) without a chroot, since the root has no shell of its own.
install_debs() { # ROOT LOG PACKAGE...
  r=$1 log=$2
  shift 2
  # shellcheck disable=SC2046 # one argument per package
  dpkg --root="$r" --force-script-chrootless -i $(for p in "$@"; do deb "$p"; done) >"$log" 2>&1
}
# Without the adapted libraries (and what needs them): the core installs
# alone, an adapter does not.
adapted='^(libcurl|libsqlite3|libpq|libmicrohttpd)'
scratch_root "$work/bare" "$adapted"
install_debs "$work/bare" "$work/bare.log" "$core" libcancel-dev ||
  { cat "$work/bare.log" >&2; fail "the core's packages do not install without an adapted library"; }
echo "$core and libcancel-dev: installed without libcurl, sqlite, libpq, libmicrohttpd"
for a in $adapters; do
  module=$(sed -n 's/^adapts=//p' "$build/cancel-$a.pc")
  [ -n "$module" ] || continue
  scratch_root "$work/bare-$a" "$adapted"
  if install_debs "$work/bare-$a" "$work/bare-$a.log" "$core" "libcancel-$a$soversion"; then
    fail "libcancel-$a$soversion installs without $module's package"
  fi
  grep -A1 "libcancel-$a$soversion depends on" "$work/bare-$a.log" | grep -v "^--" | head -n 2
  rm -rf "$work/bare-$a"
done

root=$work/root
scratch_root "$root"
# shellcheck disable=SC2086 # one argument per package
install_debs "$root" "$work/install.log" $expected ||
  { cat "$work/install.log" >&2; fail "dpkg -i of every package"; }
dpkg --root="$root" -s $expected >/dev/null 2>&1 ||
  fail "dpkg does not list every package as installed"
echo "all packages: installed (dpkg -i)"

pc=$(cd "$root" && find usr -name cancel.pc)
libdir=$(dirname "$(dirname "$pc")")
libdir=${libdir#usr/}

step "5. tests/install against $work/bare/usr: the core's packages alone"
# find_package(cancel) and pkg-config work with no adapter's -dev package
# installed: each adapter's CMake targets are in its own package.
CANCEL_INSTALLED_PREFIX=$work/bare/usr CANCEL_INSTALLED_ADAPTERS="" \
  sh "$here/../install/run.sh" "$build" "$libdir" "$cmake" "$cc"

step "5. tests/install against $root/usr: every package"
CANCEL_INSTALLED_PREFIX=$root/usr \
  sh "$here/../install/run.sh" "$build" "$libdir" "$cmake" "$cc"

echo "package test passed"
