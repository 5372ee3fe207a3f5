// abort_bench.mjs: the Node.js peer (AbortController / AbortSignal, Node 20)
// of bench/core_bench.c.  Run: node bench/peers/abort_bench.mjs
//
// Prints `scenario<TAB>node_abort<TAB>value<TAB>unit` rows, measured with the
// same loop as bench/bench.h (calibrate to ~60 ms batches, warm up, median
// of 7; BENCH_QUICK=1 for ~10x smaller batches, BENCH_ONLY=a,b to run some
// scenarios).  Times come from process.hrtime.bigint().
//
// Notes on what is measured:
//   - Node 20 creates a controller's AbortSignal lazily, on the first read
//     of `controller.signal` (about 4 us: it re-prototypes an EventTarget).
//     A controller whose signal is never read is not a usable source (and
//     the JIT can drop it entirely), so every scenario reads `.signal`.
//   - Every object made in a timed loop is garbage; the garbage collector
//     runs inside the timed batches, so its cost is part of the numbers
//     (the median of 7 batches keeps a single long pause out).
//   - check: signal.aborted on a live signal.  The loop alternates between
//     two live signals so the JIT cannot prove the getter's result
//     loop-invariant and hoist it; that adds one array load per check.
//   - link2_create_destroy: AbortSignal.any([s1, s2]) then drop it (Node
//     has no way to unlink it early).  In Node 20 each parent keeps a
//     WeakRef to every signal made from it and never prunes the dead ones
//     (nodejs/node#55351, fixed in later majors), so the parents are made
//     afresh for every batch, outside the timed loop: otherwise the leak
//     would grow across batches.
//   - timeout_create_dispose: AbortSignal.timeout() cannot be disposed, so
//     this is new AbortController() and its signal + setTimeout(() =>
//     c.abort(), 1 h) + clearTimeout().
//   - create_register_cancel, cancel_fanout_1000: abort() without a reason,
//     as callers write it; Node then makes a DOMException for the reason.
//   - chain_100: controllers whose 'abort' listener aborts the next one
//     with the previous signal's reason (so a reason is inherited, as with
//     libcancel's links and AbortSignal.any, and made only once).
//     AbortSignal.any([prev]) is not a chain in Node: it flattens to the
//     root's own signal, so cancelling the root would be a fan-out.
//   - register_unregister_contended: n/a (one thread; worker threads cannot
//     share an AbortSignal).

import { setMaxListeners } from 'node:events';

const IMPL = 'node_abort';
const REPS = 7;
const FANOUT = 1000;
const CHAIN = 100;

// ---------------------------------------------------------------------
// The measuring loop and the row format (the same rules as bench.h).
// ---------------------------------------------------------------------

const quick = !!process.env.BENCH_QUICK && process.env.BENCH_QUICK !== '0';
const targetNs = quick ? 6e6 : 60e6;

const nowNs = () => process.hrtime.bigint();

// fn(n) runs n operations and returns the nanoseconds (a Number) of the
// measured part.  Returns the median time per unit, one operation counting
// as `units` units.
function measure(fn, units) {
  let n = 1;
  let wall;
  for (;;) {
    const t0 = nowNs();
    fn(n);
    wall = Number(nowNs() - t0);
    if (wall >= targetNs / 10 || n >= 2 ** 40) break;
    n *= 2;
  }
  wall = Math.max(wall, 1);
  n = Math.max(1, Math.floor((n * targetNs) / wall));
  fn(n); // warm-up at the final size
  const per = [];
  for (let i = 0; i < REPS; i++) per.push(fn(n) / (n * units));
  per.sort((a, b) => a - b);
  return per[REPS >> 1];
}

function format(v) {
  if (v < 10) return v.toFixed(2);
  if (v < 1000) return v.toFixed(1);
  return v.toFixed(0);
}

const onlyList = (process.env.BENCH_ONLY || '').split(',').filter((s) => s);
const wanted = (scenario) =>
  onlyList.length === 0 || onlyList.includes(scenario);

function row(scenario, v, unit = 'ns') {
  process.stdout.write(`${scenario}\t${IMPL}\t${format(v)}\t${unit}\n`);
}

function rowNA(scenario, unit = 'ns') {
  if (wanted(scenario)) {
    process.stdout.write(`${scenario}\t${IMPL}\tn/a\t${unit}\n`);
  }
}

function run(scenario, fn, units = 1) {
  if (wanted(scenario)) row(scenario, measure(fn, units));
}

function die(what) {
  process.stderr.write(`abort_bench: ${what}\n`);
  process.exit(1);
}

// ---------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------

let sink = 0;
const noop = () => {};
const live = new AbortController();
const liveSignal = live.signal;

const checkSignals = [liveSignal, new AbortController().signal];
run('check', (n) => {
  let hits = 0;
  const t0 = nowNs();
  for (let i = 0; i < n; i++) {
    if (checkSignals[i & 1].aborted) hits++;
  }
  const t = Number(nowNs() - t0);
  sink += hits;
  return t;
});

run('register_unregister', (n) => {
  const t0 = nowNs();
  for (let i = 0; i < n; i++) {
    liveSignal.addEventListener('abort', noop);
    liveSignal.removeEventListener('abort', noop);
  }
  return Number(nowNs() - t0);
});

run('source_create_destroy', (n) => {
  let last;
  const t0 = nowNs();
  for (let i = 0; i < n; i++) last = new AbortController().signal;
  const t = Number(nowNs() - t0);
  sink += last.aborted ? 1 : 0;
  return t;
});

if (typeof AbortSignal.any === 'function') {
  run('link2_create_destroy', (n) => {
    const parents = [
      new AbortController().signal,
      new AbortController().signal,
    ];
    let last;
    const t0 = nowNs();
    for (let i = 0; i < n; i++) last = AbortSignal.any(parents);
    const t = Number(nowNs() - t0);
    sink += last.aborted ? 1 : 0;
    return t;
  });
} else {
  rowNA('link2_create_destroy');
}

run('timeout_create_dispose', (n) => {
  let last;
  const t0 = nowNs();
  for (let i = 0; i < n; i++) {
    const c = new AbortController();
    const timer = setTimeout(() => c.abort(), 3600e3);
    last = c.signal;
    clearTimeout(timer);
  }
  const t = Number(nowNs() - t0);
  sink += last.aborted ? 1 : 0;
  return t;
});

run('create_register_cancel', (n) => {
  let ran = 0;
  const onAbort = () => {
    ran++;
  };
  const t0 = nowNs();
  for (let i = 0; i < n; i++) {
    const c = new AbortController();
    c.signal.addEventListener('abort', onAbort);
    c.abort();
  }
  const t = Number(nowNs() - t0);
  if (ran !== n) die('create_register_cancel: listeners did not run');
  return t;
});

// Only abort() is timed; adding the 1000 listeners is not.  The listeners
// are 1000 distinct functions (addEventListener ignores a duplicate); the
// signal's listener limit is raised so Node does not print a leak warning.
{
  let ran = 0;
  const listeners = Array.from({ length: FANOUT }, () => () => {
    ran++;
  });
  run(
    'cancel_fanout_1000',
    (n) => {
      let timed = 0;
      for (let i = 0; i < n; i++) {
        ran = 0;
        const c = new AbortController();
        const s = c.signal;
        setMaxListeners(FANOUT + 1, s);
        for (const l of listeners) s.addEventListener('abort', l);
        const t0 = nowNs();
        c.abort();
        timed += Number(nowNs() - t0);
        if (ran !== FANOUT) die('cancel_fanout_1000: listeners did not run');
      }
      return timed;
    },
    FANOUT,
  );
}

// chain_100: a root and 100 controllers, each aborted by an 'abort'
// listener on the previous signal.  Timed: root.abort() until the leaf
// reads aborted; building the chain is not timed.
run(
  'chain_100',
  (n) => {
    let timed = 0;
    for (let i = 0; i < n; i++) {
      const chain = [new AbortController()];
      for (let k = 1; k <= CHAIN; k++) {
        const c = new AbortController();
        const prev = chain[k - 1].signal;
        prev.addEventListener('abort', () => c.abort(prev.reason), {
          once: true,
        });
        chain.push(c);
      }
      const leaf = chain[CHAIN].signal;
      const t0 = nowNs();
      chain[0].abort();
      if (!leaf.aborted) die('chain_100: leaf not aborted');
      timed += Number(nowNs() - t0);
    }
    return timed;
  },
  CHAIN,
);

rowNA('register_unregister_contended');

if (liveSignal.aborted) {
  die('a live signal was aborted');
}
if (sink < 0) die('unreachable');
