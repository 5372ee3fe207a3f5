#!/usr/bin/env bash
# bench/run.sh [BUILD_DIR]: runs libcancel's benchmark and its peers in one
# go, collects every row into BUILD_DIR/bench/results.tsv (copied to
# build/bench/results.tsv under the repository root) and prints a table.
#
# BUILD_DIR (default: build under the repository root) is a CMake build
# directory configured with -DCANCEL_BUILD_BENCH=ON and built, so that
# BUILD_DIR/bench/core_bench and wait_bench exist.  The peers are optional:
# a peer whose toolchain is missing, or that fails, is skipped with a
# warning.  The exit status is non-zero only when a required program
# (core_bench, wait_bench) fails.
#
# Every program prints rows `scenario<TAB>impl<TAB>value<TAB>unit` on
# stdout; value is "n/a" when the impl has no such feature.  Lower is
# better, except for the units in HIGHER_IS_BETTER (throughputs).
#
# Environment: BENCH_QUICK=1 (batches ~10x smaller: a smoke test),
# BENCH_ROUNDS=3 (interleaved runs of the whole list; best round kept, or
# for a throughput against its baseline the round of the median ratio),
# BENCH_ONLY=check,chain_100 (run only those scenarios), BENCH_TIMEOUT
# (seconds allowed per program, default 300), CXX (for the C++ fallback),
# BENCH_RESULTS_COPY (where the copy goes instead of build/bench/results.tsv),
# BENCH_INSTR (units per counted batch in the instruction counts below,
# default 10000; 0 skips them).
#
# Instruction counts: after the timed rounds, each program of INSTR_PROGRAMS
# runs once more under valgrind --tool=callgrind (with BENCH_INSTR set, see
# bench/bench.h; address randomisation off, so that runs agree to the
# instruction), and each of its core rows gets a row `<row>_instr` in unit
# instr: the instructions its timed part executes per unit, on the calling
# threads.  Skipped with a warning when valgrind is missing.
#
# Needs bash and awk only (and valgrind for the instruction counts).

set -u

# The programs, one per line:  name  kind  need  source
#   kind exe:  BUILD_DIR/bench/<name>, built by CMake (source is informative)
#   kind cxx:  BUILD_DIR/bench/<name> built by CMake; when missing, compiled
#              here from source with ${CXX:-g++} -O2 -std=c++20 -pthread
#   kind go:   source is a Go main package, built here to BUILD_DIR/bench/<name>
#   kind node: source is an ES module run with node
#   kind mono: source is a C# program, compiled here with mcs (or csc) to
#              BUILD_DIR/bench/<name>.exe and run with mono
#   need:      required (failure fails the run) or optional (skipped on error)
PROGRAMS='
core_bench        exe   required  bench/core_bench.c
wait_bench        exe   required  bench/wait_bench.c
sqlite_bench      exe   optional  bench/sqlite_bench.c
curl_bench        exe   optional  bench/curl_bench.c
pq_bench          exe   optional  bench/pq_bench.c
reportd_bench     exe   optional  bench/reportd_bench.c
stop_token_bench  cxx   optional  bench/peers/stop_token_bench.cpp
glib_bench        exe   optional  bench/peers/glib_bench.c
dotnet_bench      mono  optional  bench/peers/dotnet_bench.cs
ctxbench          go    optional  bench/peers/go
abort_bench       node  optional  bench/peers/abort_bench.mjs
'

# The impl the ratio column is about, and impls shown in the table but not
# counted as peers for the ratio (floors and baselines), space-separated.
# Baselines get their own columns, after the peers, and their own ratio
# column (`base`).
REF_IMPL=libcancel

# The programs counted under callgrind (the C and C++ ones: a JIT's or a
# runtime's instructions would not compare).
INSTR_PROGRAMS='core_bench stop_token_bench glib_bench'
BASELINE_IMPLS='futex_floor plain'

# Units whose values are better when higher (space-separated).  For them
# the best round is the highest, the best peer or baseline is the highest,
# and the ratio is inverted (other / REF_IMPL) so that below 1 still means
# REF_IMPL does better.
HIGHER_IS_BETTER='req/s'

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD_DIR=${1:-$ROOT/build}
mkdir -p "$BUILD_DIR/bench" || exit 1
BUILD_DIR=$(cd "$BUILD_DIR" && pwd)
OUT_DIR=$BUILD_DIR/bench
RESULTS=$OUT_DIR/results.tsv
COPY=${BENCH_RESULTS_COPY:-$ROOT/build/bench/results.tsv}
ROWS=$OUT_DIR/results.rows.tmp
: >"$ROWS"

warn() { printf 'bench: warning: %s\n' "$*" >&2; }
note() { printf 'bench: %s\n' "$*" >&2; }

run_limited() {
  if command -v timeout >/dev/null 2>&1; then
    timeout "${BENCH_TIMEOUT:-300}" "$@"
  else
    "$@"
  fi
}

# Prepares program $1 (kind $2, source $3) and prints the command that runs
# it, one word per line; returns non-zero (with a warning) if it cannot.
prepare() {
  local name=$1 kind=$2 src=$3 exe=$OUT_DIR/$1
  case $kind in
  exe)
    if [ ! -x "$exe" ]; then
      warn "$exe not found: configure with -DCANCEL_BUILD_BENCH=ON and build"
      return 1
    fi
    printf '%s\n' "$exe"
    ;;
  cxx)
    if [ ! -x "$exe" ]; then
      local cxx=${CXX:-g++}
      if ! command -v "$cxx" >/dev/null 2>&1; then
        warn "$name: no C++ compiler ($cxx), skipped"
        return 1
      fi
      note "building $name with $cxx"
      if ! "$cxx" -O2 -std=c++20 -pthread -o "$exe" "$ROOT/$src"; then
        warn "$name: build failed, skipped"
        return 1
      fi
    fi
    printf '%s\n' "$exe"
    ;;
  go)
    if ! command -v go >/dev/null 2>&1; then
      warn "$name: go not found, skipped"
      return 1
    fi
    note "building $name with $(go version 2>/dev/null)"
    # Caches live in the build directory (works as any user on a fresh
    # machine); nothing is fetched from the network.
    if ! (cd "$ROOT/$src" &&
      GOCACHE=$OUT_DIR/go/cache GOPATH=$OUT_DIR/go/path GOFLAGS='' \
        GOPROXY=off GOSUMDB=off GO111MODULE=on GOTOOLCHAIN=local \
        go build -o "$exe" .); then
      warn "$name: go build failed, skipped"
      return 1
    fi
    printf '%s\n' "$exe"
    ;;
  node)
    if ! command -v node >/dev/null 2>&1; then
      warn "$name: node not found, skipped"
      return 1
    fi
    printf '%s\n%s\n' node "$ROOT/$src"
    ;;
  mono)
    local csc
    if ! command -v mono >/dev/null 2>&1; then
      warn "$name: mono not found, skipped"
      return 1
    fi
    if command -v mcs >/dev/null 2>&1; then
      csc=mcs
    elif command -v csc >/dev/null 2>&1; then
      csc=csc
    else
      warn "$name: no C# compiler (mcs, csc), skipped"
      return 1
    fi
    note "building $name with $csc"
    if ! "$csc" -nologo -optimize+ -out:"$exe.exe" "$ROOT/$src" >&2; then
      warn "$name: $csc failed, skipped"
      return 1
    fi
    printf '%s\n%s\n' mono "$exe.exe"
    ;;
  *)
    warn "$name: unknown kind $kind"
    return 1
    ;;
  esac
}

# A failure of the current program: an error for a required one, a warning
# for an optional one.
fail() {
  if [ "$need" = required ]; then
    printf 'bench: error: %s\n' "$*" >&2
    status=1
  else
    warn "$*"
  fi
}

status=0
# Prepare every program once, then run the whole list BENCH_ROUNDS times,
# interleaved, so that a burst of noise on this shared machine hits every
# impl alike; the table keeps each row's best round (noise only ever adds
# time; for a unit in HIGHER_IS_BETTER, the best is the highest).
names=() needs=() cmds=()
while read -r name kind need src <&3; do
  [ -n "${name:-}" ] || continue
  case $name in \#*) continue ;; esac
  if ! cmd=$(prepare "$name" "$kind" "$src" </dev/null); then
    fail "$name could not be prepared"
    continue
  fi
  names+=("$name") needs+=("$need") cmds+=("$cmd")
done 3<<<"$PROGRAMS"

ROUNDS=${BENCH_ROUNDS:-3}
for ((round = 1; round <= ROUNDS; round++)); do
  for k in "${!names[@]}"; do
    name=${names[$k]} need=${needs[$k]}
    mapfile -t argv <<<"${cmds[$k]}"
    note "running $name (round $round of $ROUNDS)"
    out=$OUT_DIR/$name.out
    run_limited "${argv[@]}" </dev/null >"$out"
    rc=$?
    # Keep the well-formed rows even from a program that failed half-way.
    awk -F'\t' -v OFS='\t' -v prog="$name" -v round="$round" '
      NF == 4 && $1 != "" && $2 != "" && $3 != "" { print $0, round; next }
      {
        printf "bench: warning: %s: ignored line: %s\n", prog, $0 > "/dev/stderr"
      }
    ' "$out" >>"$ROWS"
    if [ "$rc" -ne 0 ]; then
      fail "$name exited with status $rc"
    fi
  done
done

# Instruction counts: one run per program under callgrind, with collection
# off except in the timed parts of each scenario's counted batch; the
# program dumps the counts under the scenario's name and prints
# `<row>_instr impl <units run> units` (or n/a); the dump's total over the
# units is the row.  Instruction counts do not vary between rounds: one run.
instr_units=${BENCH_INSTR:-10000}
if [ "$instr_units" != 0 ]; then
  if ! command -v valgrind >/dev/null 2>&1; then
    warn "valgrind not found: no instruction counts"
  else
    norand=()
    if command -v setarch >/dev/null 2>&1 &&
      setarch "$(uname -m)" -R true 2>/dev/null; then
      norand=(setarch "$(uname -m)" -R)
    fi
    for k in "${!names[@]}"; do
      name=${names[$k]} need=optional
      case " $INSTR_PROGRAMS " in *" $name "*) ;; *) continue ;; esac
      mapfile -t argv <<<"${cmds[$k]}"
      cg=$OUT_DIR/callgrind/$name
      rm -rf "$cg" && mkdir -p "$cg" || continue
      note "counting instructions of $name under callgrind"
      BENCH_INSTR=$instr_units run_limited "${norand[@]}" valgrind \
        --tool=callgrind --collect-atstart=no --callgrind-out-file="$cg/out" \
        --log-file="$cg/valgrind.log" "${argv[@]}" </dev/null >"$cg/rows"
      rc=$?
      # FILENAME order does not matter: the dumps are matched by name.
      awk -F'\t' -v OFS='\t' -v prog="$name" '
        FNR == 1 { dump = "" }
        FILENAME != rows && /^desc: Trigger: Client Request: / {
          dump = substr($0, length("desc: Trigger: Client Request: ") + 1)
        }
        FILENAME != rows && /^totals: / && dump != "" {
          split($0, f, " "); total[dump] = f[2]
        }
        FILENAME == rows && NF == 4 { line[++n] = $0 }
        END {
          for (r = 1; r <= n; r++) {
            split(line[r], c, "\t")
            s = c[1]; sub(/_instr$/, "", s)
            if (c[3] == "n/a") { print c[1], c[2], "n/a", "instr", 1; continue }
            if (!(s in total) || c[3] + 0 <= 0) {
              printf "bench: warning: %s: no callgrind dump for %s\n", prog, s > "/dev/stderr"
              continue
            }
            v = total[s] / c[3]
            print c[1], c[2], sprintf(v < 10 ? "%.2f" : v < 1000 ? "%.1f" : "%.0f", v), "instr", 1
          }
        }
      ' rows="$cg/rows" "$cg/rows" "$cg"/out.* >>"$ROWS"
      if [ "$rc" -ne 0 ]; then
        warn "$name under callgrind exited with status $rc (see $cg/valgrind.log)"
      fi
    done
  fi
fi

# One row per (scenario, impl): the best round, in order of first appearance.
# Except for a throughput (a unit in HIGHER_IS_BETTER) measured against a
# baseline in the same process: those rows are a pair, and the best of each
# taken from different rounds would compare two moments of this machine.
# There the table keeps one round for the whole scenario: the round whose
# ratio (REF_IMPL over the baseline) is the median of the rounds.
awk -F'\t' -v OFS='\t' -v higher="$HIGHER_IS_BETTER" -v ref="$REF_IMPL" \
  -v bases="$BASELINE_IMPLS" '
  function numeric(v) { return v ~ /^[0-9]+(\.[0-9]*)?([eE][-+]?[0-9]+)?$/ }
  BEGIN {
    nh = split(higher, h, " "); for (k = 1; k <= nh; k++) up[h[k]] = 1
    nb = split(bases, b, " "); for (k = 1; k <= nb; k++) isbase[b[k]] = 1
  }
  {
    k = $1 SUBSEP $2
    if (numeric($3)) { rv[k, $5] = $3; rounds[$5] = 1 }
    if (!(k in val)) { order[++n] = k; val[k] = $3; unit[k] = $4; s[k] = $1; i[k] = $2; next }
    if (!numeric($3)) next
    if (!numeric(val[k]) || ($4 in up ? $3 + 0 > val[k] + 0 : $3 + 0 < val[k] + 0))
      val[k] = $3
  }
  END {
    # Paired throughputs: the median round of ref / baseline.
    for (r = 1; r <= n; r++) {
      k = order[r]
      if (i[k] != ref || !(unit[k] in up)) continue
      for (q = 1; q <= n; q++) {
        o = order[q]
        if (s[o] != s[k] || !(i[o] in isbase)) continue
        m = 0
        for (rd in rounds)
          if (((k, rd) in rv) && ((o, rd) in rv) && rv[o, rd] + 0 > 0) {
            m++; ratio[m] = rv[k, rd] / rv[o, rd]; rr[m] = rd
          }
        if (m == 0) continue
        for (x = 2; x <= m; x++)          # insertion sort, m is small
          for (y = x; y > 1 && ratio[y] < ratio[y - 1]; y--) {
            t = ratio[y]; ratio[y] = ratio[y - 1]; ratio[y - 1] = t
            t = rr[y]; rr[y] = rr[y - 1]; rr[y - 1] = t
          }
        pick = rr[int((m + 1) / 2)]
        val[k] = rv[k, pick]; val[o] = rv[o, pick]
      }
    }
    for (r = 1; r <= n; r++) print s[order[r]], i[order[r]], val[order[r]], unit[order[r]]
  }
' "$ROWS" >"$ROWS.best" && mv "$ROWS.best" "$ROWS"

{
  printf 'scenario\timpl\tvalue\tunit\n'
  cat "$ROWS"
} >"$RESULTS.tmp" && mv "$RESULTS.tmp" "$RESULTS"
rm -f "$ROWS"
mkdir -p "$(dirname "$COPY")"
if [ ! "$RESULTS" -ef "$COPY" ]; then
  cp "$RESULTS" "$COPY"
fi
note "results: $RESULTS"

# The table: one line per scenario (in order of first appearance), one
# column per impl (in order of first appearance, baselines last), then
# ratio = REF_IMPL / best peer: the lowest numeric value among the other
# impls with the same unit, baselines excluded; and, when the results hold
# a baseline, base = REF_IMPL / the lowest baseline with the same unit.
# For a unit in HIGHER_IS_BETTER: the highest, and the inverse ratio
# (best peer / REF_IMPL, baseline / REF_IMPL).  Ratios below 0.1 are shown
# with two significant digits.
awk -F'\t' -v ref="$REF_IMPL" -v baselines="$BASELINE_IMPLS" \
  -v higher="$HIGHER_IS_BETTER" '
  function numeric(v) { return v ~ /^[0-9]+(\.[0-9]*)?([eE][-+]?[0-9]+)?$/ }
  # Whether a is better than b (both numeric) in unit u.
  function better(a, b, u) { return (u in up) ? a + 0 > b + 0 : a + 0 < b + 0 }
  # The ratio of ref value r to another value o in unit u, oriented so
  # that below 1 means ref does better.
  function ratio_of(r, o, u,   x) {
    x = (u in up) ? o / r : r / o
    return sprintf(x < 0.1 ? "%.2gx" : "%.2fx", x)
  }
  BEGIN { nh = split(higher, h, " "); for (k = 1; k <= nh; k++) up[h[k]] = 1 }
  NR == 1 { next }
  {
    s = $1; i = $2
    if ($4 in up) seen_up = 1
    if (!(s in seen_s)) { seen_s[s] = 1; sc[++ns] = s }
    if (!(i in seen_i)) { seen_i[i] = 1; ia[++na] = i }
    val[s, i] = $3; unit[s, i] = $4
  }
  END {
    nb = split(baselines, b, " ")
    for (k = 1; k <= nb; k++) base[b[k]] = 1
    # Columns: the impls in order of first appearance, baselines last.
    ni = 0; nbase = 0
    for (k = 1; k <= na; k++) if (!(ia[k] in base)) im[++ni] = ia[k]
    for (k = 1; k <= na; k++) if (ia[k] in base) { im[++ni] = ia[k]; nbase++ }
    nc = ni + 1 + (nbase > 0)
    cell[0, 0] = "scenario"
    for (c = 1; c <= ni; c++) cell[0, c] = im[c]
    cell[0, ni + 1] = "ratio"
    if (nbase > 0) cell[0, ni + 2] = "base"
    for (r = 1; r <= ns; r++) {
      s = sc[r]
      cell[r, 0] = s
      for (c = 1; c <= ni; c++) {
        i = im[c]
        if (!((s, i) in val)) cell[r, c] = "-"
        else if (numeric(val[s, i])) cell[r, c] = val[s, i] " " unit[s, i]
        else cell[r, c] = val[s, i]
      }
      ratio = "-"; bratio = "-"
      if ((s, ref) in val && numeric(val[s, ref])) {
        best = ""; bbest = ""; u = unit[s, ref]
        for (c = 1; c <= ni; c++) {
          i = im[c]
          if (i == ref || !((s, i) in val)) continue
          if (!numeric(val[s, i]) || unit[s, i] != u) continue
          if (i in base) {
            if (bbest == "" || better(val[s, i], bbest, u)) bbest = val[s, i]
          } else if (best == "" || better(val[s, i], best, u)) {
            best = val[s, i]
          }
        }
        # The divisor must be positive: the other value, or for a
        # higher-is-better unit the ref value.
        ok = (u in up) ? val[s, ref] + 0 > 0 : 1
        if (ok && best != "" && best + 0 > 0)
          ratio = ratio_of(val[s, ref], best, u)
        if (ok && bbest != "" && bbest + 0 > 0)
          bratio = ratio_of(val[s, ref], bbest, u)
      }
      cell[r, ni + 1] = ratio
      if (nbase > 0) cell[r, ni + 2] = bratio
    }
    for (c = 0; c <= nc; c++) {
      w[c] = 0
      for (r = 0; r <= ns; r++)
        if (length(cell[r, c]) > w[c]) w[c] = length(cell[r, c])
    }
    for (r = 0; r <= ns; r++) {
      line = sprintf("%-" w[0] "s", cell[r, 0])
      for (c = 1; c <= nc; c++)
        line = line sprintf("  %" w[c] "s", cell[r, c])
      print line
    }
    if (ni > 0) print ""
    print "ratio = " ref " / best peer (the lowest value among the other"
    print "impls, same unit); below 1 means " ref " is faster."
    if (nbase > 0) {
      print "base = " ref " / its baseline (" baselines "): the floor"
      print "or the plain call it is built on, in the same run."
    }
    if (seen_up) {
      print "Higher is better in " higher ": there the best is the highest"
      print "and both ratios are inverted (other / " ref "), so below 1"
      print "still means " ref " does better."
    }
  }
' "$RESULTS"

exit "$status"
