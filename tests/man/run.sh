#!/bin/sh
# man_test: the manual pages that man/gen_man.py made from the headers.
#   1. mandoc -Tlint -W warning reports nothing on any page;
#   2. the public functions of the headers (every CANCEL_API prototype
#      and every static inline cancel_* function, not the internal
#      cancel__* ones), counted here without the generator's parser, are
#      exactly the names of build/man/man3 (pages and links to them), and
#      every header has its section 7 page;
#   3. after `cmake --install BUILD --component dev` into a scratch prefix,
#      man(1) renders cancel_source_new(3), a page reached through a link,
#      libcancel(7) and cancel_register(3), and every installed page
#      (man -l), without a warning.
#
# usage: run.sh BUILD_DIR SOURCE_DIR MANDIR [CMAKE]
#   MANDIR  CMAKE_INSTALL_MANDIR of that tree (e.g. share/man)
set -eu

build=$1
src=$2
mandir=$3
cmake=${4:-cmake}
pages=$build/man

fail() {
  echo "FAIL: $*" >&2
  exit 1
}
step() { echo "== $*"; }

command -v mandoc >/dev/null ||
  fail "mandoc not found (Debian: mandoc; make deps installs it)"
[ -d "$pages/man3" ] && [ -d "$pages/man7" ] ||
  fail "$pages/man3 or man7 missing: build the cancel_man target first"

work=$(mktemp -d "${TMPDIR:-/tmp}/cancel-man-test.XXXXXX")
trap 'rm -rf "$work"' EXIT

step "mandoc -Tlint -W warning on every page"
n=0
for p in "$pages"/man3/*.3 "$pages"/man7/*.7; do
  [ -L "$p" ] && continue # a link: its target is linted
  n=$((n + 1))
  mandoc -Tlint -W warning "$p" >>"$work/lint" 2>&1 || true
done
[ "$n" -gt 0 ] || fail "no pages in $pages"
if [ -s "$work/lint" ]; then
  cat "$work/lint" >&2
  fail "mandoc -Tlint: $(wc -l <"$work/lint") messages on $n pages"
fi
echo "$n pages, no message"
for p in "$pages"/man3/*.3; do
  [ -e "$p" ] || fail "$p is a dangling link"
done

step "one page per public function, one section 7 page per header"
headers="$src/include/cancel.h $(ls "$src"/include/cancel/*.h)"
# The headers as one line without their comments, so that a prototype
# split over lines reads as one; then the name before each prototype's '('.
for h in $headers; do
  tr '\n' ' ' <"$h" | sed 's:/\*:\n&:g; s:\*/:&\n:g' | grep -v '^/\*' | tr -d '\n' |
    sed 's/__attribute__ *((\([^()]\|([^()]*)\)*))//g'
  echo
done >"$work/flat"
{
  grep -o 'CANCEL_API [^;(#]*(' "$work/flat" || true
  grep -o 'static inline [^;(#]*(' "$work/flat" || true
} | sed 's/[ ]*($//; s/.*[ *]//' | grep '^cancel_' | grep -v '^cancel__' |
  sort >"$work/want"
ls "$pages/man3" | sed 's/\.3$//' | sort >"$work/have"
nwant=$(wc -l <"$work/want")
nhave=$(wc -l <"$work/have")
if ! cmp -s "$work/want" "$work/have"; then
  diff "$work/want" "$work/have" | sed 's/^</no page for:/; s/^>/page for no function:/' >&2
  fail "$nwant public functions, $nhave pages in man3"
fi
echo "$nwant public functions, $nhave pages in man3 (links included)"
[ "$nwant" -ge 100 ] || fail "only $nwant public functions found: the count is broken"
nh=$(echo $headers | wc -w)
n7=$(ls "$pages/man7" | wc -l)
[ "$nh" -eq "$n7" ] || fail "$nh headers, $n7 pages in man7"
echo "$nh headers, $n7 pages in man7"

step "cmake --install --component dev, then man(1)"
prefix=$work/prefix
"$cmake" --install "$build" --prefix "$prefix" --component dev >"$work/install.log" 2>&1 ||
  { cat "$work/install.log" >&2; fail "cmake --install"; }
[ -f "$prefix/$mandir/man3/cancel_source_new.3" ] ||
  fail "cancel_source_new.3 not installed in $prefix/$mandir/man3"
[ -L "$prefix/$mandir/man3/cancel_source_init_timeout.3" ] ||
  fail "cancel_source_init_timeout.3 not installed as a link"
command -v man >/dev/null || fail "man not found (Debian: man-db)"
show() { # show SECTION NAME: man's output in $work/out, its stderr checked
  MANPAGER=cat PAGER=cat MANWIDTH=80 LC_ALL=C.UTF-8 \
    man -M "$prefix/$mandir" "$1" "$2" >"$work/out" 2>"$work/err" ||
    { cat "$work/err" >&2; fail "man -M ... $1 $2"; }
  [ ! -s "$work/err" ] || { cat "$work/err" >&2; fail "man $1 $2 warns"; }
  grep -q "$3" "$work/out" || { cat "$work/out" >&2; fail "man $1 $2: no '$3'"; }
  echo "man $1 $2: $(wc -l <"$work/out") lines"
}
show 3 cancel_source_new 'cancel_source_new(cancel_source \*\*srcp, const char \*name);'
show 3 cancel_source_init_timeout 'cancel_source_init_timeout(cancel_source \*src'
show 3 cancel_register 'EINVAL'
show 7 libcancel 'Conventions used by every function'
# Every installed page through man-db (groff), which warns where mandoc
# does not (a synopsis line it cannot break, say).
n=0
for p in "$prefix/$mandir"/man3/*.3 "$prefix/$mandir"/man7/*.7; do
  MANWIDTH=80 LC_ALL=C.UTF-8 man -l "$p" >/dev/null 2>"$work/err" ||
    fail "man -l $p"
  [ ! -s "$work/err" ] || { cat "$work/err" >&2; fail "man -l $p warns"; }
  n=$((n + 1))
done
echo "man -l: $n installed pages, no warning"
echo "PASS"
