#!/bin/sh
# Checks the model of the registration protocol (registration.pml beside
# this script) exhaustively with spin, in both directions:
#   - the fixed protocol (-DFIXED) must verify with no error;
#   - today's protocol must fail (issue 11 item 4: unref of a zombie parent
#     does not wait for the timer thread's cancel in flight), and so must
#     the naive fix (-DNAIVE_FIX: waiting on the registration's own word);
#   - every witness point of the fixed model must be reachable, so that its
#     clean result is not the result of a model where nothing happens.
# Prints the states explored for each run.  Exits 0 when all of that holds,
# 1 when something does not, 77 (CTest's skip) when spin is not installed.
#
# Usage: run.sh [C compiler]
# MODEL_KEEP=DIR keeps the generated models and the trails of the
# violations in DIR (replay one with: spin [-DFIXED ...] -t -p registration.pml
# in gen-NAME/, after copying its trail there).
set -u

here=$(cd "$(dirname "$0")" && pwd)
cc=${1:-${CC:-cc}}

if ! command -v spin >/dev/null 2>&1; then
  echo "spin is not installed (Debian package spin): model check skipped"
  exit 77
fi

work=$(mktemp -d)
keep() {
  if [ -n "${MODEL_KEEP:-}" ]; then
    mkdir -p "$MODEL_KEEP" && cp -r "$work"/. "$MODEL_KEEP"/
  fi
  rm -rf "$work"
}
trap keep EXIT INT TERM
cp "$here/registration.pml" "$work/" || exit 1
cd "$work" || exit 1

failed=0

# build NAME SPIN-FLAGS: generates and compiles pan into pan-NAME.
build() {
  name=$1
  shift
  mkdir -p "gen-$name"
  cp registration.pml "gen-$name/"
  if ! (cd "gen-$name" && spin "$@" -a registration.pml) >spin.log 2>&1; then
    echo "model $name: spin -a failed"
    cat spin.log
    failed=1
    return 1
  fi
  # SAFETY: assertions and invalid end states (deadlocks) only; COLLAPSE
  # compresses the state vector losslessly (the search stays exhaustive).
  # -O0: pan.c is large, and gcc -O1 takes minutes over it for a search
  # that runs about as fast.
  if ! "$cc" -O0 -w -DSAFETY -DCOLLAPSE -DMEMLIM=4096 -o "pan-$name" \
      "gen-$name/pan.c" 2>cc.log; then
    echo "model $name: compiling pan failed"
    cat cc.log
    failed=1
    return 1
  fi
}

# check NAME BINARY EXPECT [WITNESS] SPIN-FLAGS: EXPECT is "clean" (no
# error, the whole state space searched) or "error" (a violation found).
check() {
  name=$1 bin=$2 expect=$3 witness=$4
  shift 4
  rm -f registration.pml.trail
  WITNESS=$witness "./pan-$bin" -m200000 >pan.log 2>&1
  [ -f registration.pml.trail ] && mv registration.pml.trail "$name.trail"
  errors=$(sed -n 's/.*errors: \([0-9][0-9]*\).*/\1/p' pan.log | head -n 1)
  states=$(sed -n 's/^ *\([0-9][0-9]*\) states, stored.*/\1/p' pan.log | head -n 1)
  depth=$(sed -n 's/.*depth reached \([0-9][0-9]*\).*/\1/p' pan.log | head -n 1)
  if [ -z "$errors" ] || [ -z "$states" ]; then
    echo "model $name: pan printed no result"
    cat pan.log
    failed=1
    return
  fi
  what=""
  if [ "$errors" -gt 0 ]; then
    what=$(grep -m1 -E 'assertion violated|invalid end state' pan.log)
  fi
  case $expect in
  clean)
    if [ "$errors" -ne 0 ]; then
      echo "model $name: FAILED: $errors error(s): $what"
      # The trail, replayed: the interleaving that breaks the property.
      cp "$name.trail" "gen-$bin/registration.pml.trail" 2>/dev/null
      (cd "gen-$bin" && WITNESS=$witness spin "$@" -t -p registration.pml) 2>&1 | tail -n 80
      failed=1
    elif grep -q 'max search depth too small' pan.log; then
      echo "model $name: FAILED: search depth too small, not exhaustive"
      failed=1
    else
      echo "model $name: verified, errors: 0, $states states explored, depth $depth"
    fi
    ;;
  error)
    if [ "$errors" -eq 0 ]; then
      echo "model $name: FAILED: expected a violation, got errors: 0 ($states states)"
      failed=1
    else
      echo "model $name: violation found as expected after $states states: $what"
    fi
    ;;
  esac
}

# The fixed protocol, with the witness points compiled in (inactive unless
# WITNESS is set): the full check, then one run per witness.
if build fixed -DFIXED -DWITNESS; then
  check fixed fixed clean 0 -DFIXED -DWITNESS
  # 1 unregister waits for a running callback, 2 a child's teardown waits
  # for the link callback, 3 a callback removes itself, 4 unref meets a
  # cancel in flight on a zombie (item 4's window), 5 the canceller
  # finishes a teardown (SF_PENDING), 6 the fix's wait, 7 register on a
  # cancelled source, 8 a zombie freed with its last child, 9 a timer
  # disarm waits for the timer thread, 10 a second cancel loses.
  for w in 1 2 3 4 5 6 7 8 9 10; do
    check "fixed-witness-$w" fixed error $w -DFIXED -DWITNESS
  done
fi
if build today; then
  check today today error 0
fi
if build naive -DNAIVE_FIX; then
  check naive-fix naive error 0 -DNAIVE_FIX
fi

if [ $failed -ne 0 ]; then
  echo "model check FAILED"
  exit 1
fi
echo "model check passed"
exit 0
