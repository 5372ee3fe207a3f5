#!/bin/sh
# bench/plot.sh RESULTS.TSV OUT.PNG: draws the rows of a bench/run.sh
# results file (scenario, impl, value, unit) that compare libcancel with its
# peers (C++ std::stop_token, Go context, Node.js AbortSignal, GLib
# GCancellable, .NET CancellationTokenSource on Mono) as grouped
# bars, one group per scenario, on a logarithmic nanosecond axis.  Only
# rows in ns where at least one peer has a value are drawn; "n/a" and
# missing values leave a gap.  Needs gnuplot (Debian: gnuplot-nox).
#
#   bench/plot.sh build/bench/results.tsv bench/peers.png
set -eu

in=${1:?usage: plot.sh RESULTS.TSV OUT.PNG}
out=${2:?usage: plot.sh RESULTS.TSV OUT.PNG}
command -v gnuplot >/dev/null 2>&1 || {
  echo "plot.sh: gnuplot not found (Debian: gnuplot-nox)" >&2
  exit 1
}
data=$(mktemp "${TMPDIR:-/tmp}/bench-plot.XXXXXX")
trap 'rm -f "$data"' EXIT

# One line per scenario: name, then libcancel and each peer ("?" missing).
awk -F'\t' -v impls="libcancel cpp_stop_token go_context node_abort glib_cancellable dotnet_mono" '
  NR == 1 || $4 != "ns" { next }
  !($1 in seen) { seen[$1] = 1; order[++n] = $1 }
  { v[$1, $2] = $3 }
  END {
    k = split(impls, im, " ")
    for (i = 1; i <= n; i++) {
      s = order[i]; peers = 0; line = s
      for (j = 1; j <= k; j++) {
        x = ((s, im[j]) in v) ? v[s, im[j]] : "?"
        if (x == "n/a") x = "?"
        if (j > 1 && x != "?") peers++
        line = line "\t" x
      }
      if (peers > 0) print line
    }
  }' "$in" >"$data"
[ -s "$data" ] || { echo "plot.sh: no rows with peers in $in" >&2; exit 1; }

gnuplot <<GP
set terminal pngcairo size 1300,560 noenhanced font "sans,10"
set output "$out"
set title "libcancel and its peers (bench/run.sh; lower is better)"
set datafile separator "\t"
set datafile missing "?"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set boxwidth 0.9
set logscale y
set ylabel "ns per operation (log scale)"
set grid ytics
set xtics rotate by -30 left
set key outside right top
plot "$data" using 2:xtic(1) title "libcancel", \
     "" using 3 title "C++ std::stop_token", \
     "" using 4 title "Go context", \
     "" using 5 title "Node.js AbortSignal", \
     "" using 6 title "GLib GCancellable", \
     "" using 7 title ".NET CancellationTokenSource (Mono)"
GP
echo "plot.sh: wrote $out"
