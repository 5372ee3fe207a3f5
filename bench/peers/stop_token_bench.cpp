// stop_token_bench: the C++20 peer (std::stop_source / std::stop_token /
// std::stop_callback) of bench/core_bench.c.  Build:
//   g++ -O2 -std=c++20 -pthread stop_token_bench.cpp -o stop_token_bench
//
// Prints `scenario<TAB>cpp_stop_token<TAB>value<TAB>unit` rows, measured
// with the same loop as bench/bench.h (calibrate to ~60 ms batches, warm
// up, median of 7; BENCH_QUICK=1 for ~10x smaller batches, BENCH_ONLY=a,b to
// run some scenarios).
//
// Emulations (the standard has no linked sources and no timers):
//   link2_create_destroy: a child stop_source plus one stop_callback on each
//     parent token that calls child.request_stop();
//   chain_100: 100 stop_sources, each with a stop_callback on the previous
//     one's token that requests stop on it;
//   timeout_create_dispose: n/a (no timers in the standard library).
//
// wake_latency_cond is measured in bench/wait_bench.c (peers/condvar_any.cpp
// is linked into it), interleaved with libcancel's samples.
//
// BENCH_INSTR=<units>: instruction counts under callgrind instead of times,
// as in bench/bench.h (now_ns() switches the thread's collection on and off
// around each timed part of the counted batch; one dump per scenario).
#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <stop_token>
#include <string>
#include <thread>
#include <vector>

#include <fcntl.h>
#include <sys/syscall.h>
#include <unistd.h>

#if __has_include(<valgrind/callgrind.h>)
#include <valgrind/callgrind.h>
#define BENCH_HAVE_CALLGRIND 1
#endif

namespace {

// ---------------------------------------------------------------------
// The measuring loop and the row format (the same rules as bench.h).
// ---------------------------------------------------------------------

constexpr int kReps = 7;
constexpr const char *kImpl = "cpp_stop_token";

inline int64_t clock_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// BENCH_INSTR: set while the counted batch runs; per thread, whether the
// thread is inside a timed part (see bench/bench.h).
std::atomic<bool> instr_armed{false};
#ifdef BENCH_HAVE_CALLGRIND
thread_local bool instr_inside = false;
#endif

inline int64_t now_ns() {
#ifdef BENCH_HAVE_CALLGRIND
  if (__builtin_expect(instr_armed.load(std::memory_order_relaxed), 0)) {
    int64_t t;
    if (!instr_inside) {
      t = clock_ns();
      instr_inside = true;
      CALLGRIND_TOGGLE_COLLECT;
    } else {
      CALLGRIND_TOGGLE_COLLECT;
      instr_inside = false;
      t = clock_ns();
    }
    return t;
  }
#endif
  return clock_ns();
}

// No instruction; tells the compiler memory may have changed or been read.
inline void clobber() {
  asm volatile("" ::: "memory");
}
template <class T> inline void escape(T *p) {
  asm volatile("" : : "g"(p) : "memory");
}

bool quick() {
  const char *q = std::getenv("BENCH_QUICK");
  return q != nullptr && *q != '\0' && std::strcmp(q, "0") != 0;
}

int64_t target_ns() {
  return quick() ? 6000000 : 60000000;
}

// fn(n) runs n operations and returns the nanoseconds of the measured part.
// Returns the median time per unit (one operation = `units` units).
template <class Fn> double measure(Fn &&fn, double units) {
  const int64_t target = target_ns();
  uint64_t n = 1;
  int64_t wall;
  for (;;) {
    int64_t t0 = now_ns();
    fn(n);
    wall = now_ns() - t0;
    if (wall >= target / 10 || n >= (uint64_t(1) << 40))
      break;
    n *= 2;
  }
  wall = std::max<int64_t>(wall, 1);
  n = std::max<uint64_t>(1,
                         uint64_t(double(n) * double(target) / double(wall)));
  fn(n); // warm-up at the final size
  double per[kReps];
  for (double &p : per)
    p = double(fn(n)) / (double(n) * units);
  std::sort(per, per + kReps);
  return per[kReps / 2];
}

std::string format(double v) {
  char buf[64];
  if (v < 10)
    std::snprintf(buf, sizeof buf, "%.2f", v);
  else if (v < 1000)
    std::snprintf(buf, sizeof buf, "%.1f", v);
  else
    std::snprintf(buf, sizeof buf, "%.0f", v);
  return buf;
}

void row(const char *scenario, double v, const char *unit = "ns") {
  std::printf("%s\t%s\t%s\t%s\n", scenario, kImpl, format(v).c_str(), unit);
  std::fflush(stdout);
}

bool instr_mode() {
  const char *v = std::getenv("BENCH_INSTR");
  return v != nullptr && std::strtod(v, nullptr) > 0;
}

void row_na(const char *scenario, const char *unit = "ns") {
  if (instr_mode())
    std::printf("%s_instr\t%s\tn/a\tinstr\n", scenario, kImpl);
  else
    std::printf("%s\t%s\tn/a\t%s\n", scenario, kImpl, unit);
  std::fflush(stdout);
}

bool wanted(const char *scenario) {
  const char *only = std::getenv("BENCH_ONLY");
  if (only == nullptr || *only == '\0')
    return true;
  std::string list = std::string(",") + only + ",";
  return list.find(std::string(",") + scenario + ",") != std::string::npos;
}

[[noreturn]] void die(const char *what) {
  std::fprintf(stderr, "stop_token_bench: %s\n", what);
  std::exit(1);
}

double instr_units() {
  const char *v = std::getenv("BENCH_INSTR");
  double u = v != nullptr ? std::strtod(v, nullptr) : 0;
  return u > 0 ? u : 0;
}

// BENCH_INSTR: a warm-up batch, then one counted batch of about that many
// units, dumped under the scenario's name; prints the units run.
template <class Fn> void instr(const char *scenario, Fn &&fn, double units) {
  uint64_t n = std::max<uint64_t>(1, uint64_t(instr_units() / units));
  fn(n);
  instr_armed.store(true);
  fn(n);
  instr_armed.store(false);
#ifdef BENCH_HAVE_CALLGRIND
  CALLGRIND_DUMP_STATS_AT(scenario);
#endif
  std::printf("%s_instr\t%s\t%.0f\tunits\n", scenario, kImpl,
              double(n) * units);
  std::fflush(stdout);
}

// instr_units_per_op: what one operation counts in instructions, when it
// differs from `units` (the contended row: one pair in each thread).
template <class Fn>
void run(const char *scenario, Fn &&fn, double units = 1,
         double instr_units_per_op = 0) {
  if (!wanted(scenario))
    return;
  if (instr_units() > 0)
    instr(scenario, fn, instr_units_per_op > 0 ? instr_units_per_op : units);
  else
    row(scenario, measure(fn, units));
}

// ---------------------------------------------------------------------
// Callbacks
// ---------------------------------------------------------------------

struct Noop {
  void operator()() const noexcept {}
};

struct Count {
  uint64_t *ran;
  void operator()() const noexcept {
    ++*ran;
  }
};

struct RequestStop {
  std::stop_source *target;
  void operator()() const noexcept {
    target->request_stop();
  }
};

constexpr int kFanout = 1000;
constexpr int kChain = 100;

volatile uint64_t sink;

} // namespace

int main() {
  std::stop_source live, p1, p2;
  const std::stop_token tok = live.get_token();
  const std::stop_token pt1 = p1.get_token(), pt2 = p2.get_token();

  // check: stop_token::stop_requested() is an acquire load of the shared
  // state; the clobber makes the compiler redo it every iteration.
  run("check", [&](uint64_t n) {
    uint64_t hits = 0;
    int64_t t0 = now_ns();
    for (uint64_t i = 0; i < n; i++) {
      clobber();
      hits += tok.stop_requested();
    }
    int64_t t = now_ns() - t0;
    sink = sink + hits;
    return t;
  });

  run("register_unregister", [&](uint64_t n) {
    int64_t t0 = now_ns();
    for (uint64_t i = 0; i < n; i++) {
      std::stop_callback cb(tok, Noop{});
      escape(&cb);
    }
    return now_ns() - t0;
  });

  run("source_create_destroy", [&](uint64_t n) {
    int64_t t0 = now_ns();
    for (uint64_t i = 0; i < n; i++) {
      std::stop_source s;
      escape(&s);
    }
    return now_ns() - t0;
  });

  // Emulated link: a child source and a stop_callback on each parent.
  run("link2_create_destroy", [&](uint64_t n) {
    int64_t t0 = now_ns();
    for (uint64_t i = 0; i < n; i++) {
      std::stop_source child;
      std::stop_callback c1(pt1, RequestStop{&child});
      std::stop_callback c2(pt2, RequestStop{&child});
      escape(&c1);
      escape(&c2);
    }
    return now_ns() - t0;
  });

  if (wanted("timeout_create_dispose"))
    row_na("timeout_create_dispose"); // no timers in std

  run("create_register_cancel", [&](uint64_t n) {
    uint64_t ran = 0;
    int64_t t0 = now_ns();
    for (uint64_t i = 0; i < n; i++) {
      std::stop_source s;
      std::stop_callback cb(s.get_token(), Count{&ran});
      if (!s.request_stop())
        die("request_stop returned false");
    }
    int64_t t = now_ns() - t0;
    if (ran != n)
      die("create_register_cancel: callbacks did not run");
    return t;
  });

  // Only request_stop() is timed; constructing and destroying the 1000
  // callbacks happen outside the timed region.
  {
    static std::optional<std::stop_callback<Count>> cbs[kFanout];
    run(
        "cancel_fanout_1000",
        [&](uint64_t n) {
          int64_t timed = 0;
          for (uint64_t i = 0; i < n; i++) {
            uint64_t ran = 0;
            std::stop_source s;
            std::stop_token st = s.get_token();
            for (auto &cb : cbs)
              cb.emplace(st, Count{&ran});
            int64_t t0 = now_ns();
            if (!s.request_stop())
              die("request_stop returned false");
            timed += now_ns() - t0;
            if (ran != kFanout)
              die("cancel_fanout_1000: callbacks did not run");
            for (auto &cb : cbs)
              cb.reset();
          }
          return timed;
        },
        kFanout);
  }

  // chain_100: root plus 100 sources, each hooked to the previous one by a
  // stop_callback.  Timed: root.request_stop() until the leaf reads
  // stopped; building and destroying the chain are outside the timed region.
  {
    static std::optional<std::stop_source> chain[kChain + 1];
    static std::optional<std::stop_callback<RequestStop>> links[kChain + 1];
    run(
        "chain_100",
        [&](uint64_t n) {
          int64_t timed = 0;
          for (uint64_t i = 0; i < n; i++) {
            chain[0].emplace();
            for (int k = 1; k <= kChain; k++) {
              chain[k].emplace();
              links[k].emplace(chain[k - 1]->get_token(),
                               RequestStop{&*chain[k]});
            }
            std::stop_token leaf = chain[kChain]->get_token();
            int64_t t0 = now_ns();
            chain[0]->request_stop();
            while (!leaf.stop_requested())
              if (now_ns() - t0 > 10000000000)
                die("chain_100: leaf never stopped");
            timed += now_ns() - t0;
            for (int k = kChain; k >= 1; k--) {
              links[k].reset();
              chain[k].reset();
            }
            chain[0].reset();
          }
          return timed;
        },
        kChain);
  }

  // 2 threads, one shared live token, n pairs each; reported per pair of
  // one thread: wall time (first start to last end) / n.
  run(
      "register_unregister_contended",
      [&](uint64_t n) {
        std::barrier start(2);
        std::atomic<int64_t> first{INT64_MAX}, last{0};
        auto body = [&] {
          start.arrive_and_wait();
          int64_t t0 = now_ns();
          for (uint64_t i = 0; i < n; i++) {
            std::stop_callback cb(tok, Noop{});
            escape(&cb);
          }
          int64_t t1 = now_ns();
          int64_t cur = first.load(std::memory_order_relaxed);
          while (t0 < cur && !first.compare_exchange_weak(cur, t0))
            ;
          cur = last.load(std::memory_order_relaxed);
          while (t1 > cur && !last.compare_exchange_weak(cur, t1))
            ;
        };
        std::thread a(body), b(body);
        a.join();
        b.join();
        return last.load() - first.load();
      },
      1, 2);

  // wake_latency_cond is measured inside wait_bench (peers/condvar_any.cpp),
  // interleaved with libcancel's samples in one process.

  if (tok.stop_requested() || pt1.stop_requested() || pt2.stop_requested())
    die("a live token was stopped");
  return 0;
}
