// Command ctxbench is the Go peer (package context, Go 1.19, stdlib only) of
// bench/core_bench.c.  It prints `scenario<TAB>go_context<TAB>value<TAB>unit`
// rows, measured with the same loop as bench/bench.h: calibrate to ~60 ms
// batches, warm up, median of 7 (BENCH_QUICK=1 for ~10x smaller batches,
// BENCH_ONLY=a,b to run some scenarios).
//
// What each scenario measures here, and where Go 1.19 has no equivalent:
//
//   - check: ctx.Err() == nil.  In Go 1.19 cancelCtx.Err takes the context's
//     mutex; the other idiom, `select { case <-ctx.Done(): default: }`, is
//     a channel poll.  ctx.Err() is what request code usually calls.
//   - register_unregister: n/a.  Go 1.19 has no context.AfterFunc (added in
//     Go 1.21); a goroutine blocked on Done() is not a registration (it
//     costs a goroutine and a scheduler wake-up, and cannot be removed
//     synchronously), so there is nothing honest to compare.
//   - link2_create_destroy: context has no multi-parent link.  Emulated the
//     way Go's own propagateCancel does it for a parent it cannot hook:
//     WithCancel(p1), plus a goroutine that selects on p2.Done() and
//     ctx.Done() and cancels the child, then cancel().  The goroutine's
//     exit happens after the timed cancel(), on the scheduler's time.
//   - create_register_cancel: no callbacks exist.  Measured as
//     WithCancel + ctx.Done() (the channel a waiter would block on, the
//     closest thing to registering) + cancel() + a non-blocking receive
//     that proves the channel is closed.
//   - cancel_fanout_1000: 1000 children WithCancel(parent), each with its
//     Done() channel made (as a waiter would), then the parent's cancel()
//     (timed alone) closes them; reported per child.
//   - chain_100: a WithCancel chain 100 deep below a root; the root's
//     cancel() until the leaf's Err() is non-nil is timed, per hop.
//   - register_unregister_contended: n/a (no registration, see above).
//
// wake_latency_{sleep,cond,poll}_{p50,p99}, in microseconds, as in
// bench/wait_bench.c: a goroutine blocked on ctx.Done(), the waker calls
// cancel(); a sample runs from just before cancel() to the woken goroutine
// running again (monotonic time on both sides).  The waker waits until the
// waiter says it is about to block, then spins 200 us (a goroutine is not
// a thread: there is no /proc state to check), so the waiter is parked;
// 3000 samples after 30 of warm-up (300 with BENCH_QUICK).  After cancel()
// the waker blocks on a channel for the waiter's result, as Go code does
// (cancel(); wg.Wait()): the runtime then runs the woken goroutine on the
// waker's own P, so most samples wake no OS thread at all, unlike the C and
// C++ rows, where a thread asleep in the kernel is woken.  (If the waker
// kept running instead, the goroutine would wait for another P to steal it:
// measured 90-120 us p50 and 1-3 ms p99 on the reference VM.)  The three
// waits, each written the way Go code makes that wait cancellable:
//   - sleep: select on ctx.Done() and a time.Timer's channel;
//   - cond:  a bare <-ctx.Done() (a channel is Go's condition variable);
//   - poll:  a Read on a pipe (os.Pipe, in the runtime's netpoller) that
//     never becomes readable, made cancellable the way package net does it
//     for a dial: a goroutine blocked on <-ctx.Done() sets a read deadline
//     in the past, which wakes the Read with os.ErrDeadlineExceeded.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
	"time"
)

const (
	impl   = "go_context"
	reps   = 7
	fanout = 1000
	chainN = 100
)

// ---------------------------------------------------------------------
// The measuring loop and the row format (the same rules as bench.h).
// ---------------------------------------------------------------------

var quick = func() bool {
	q := os.Getenv("BENCH_QUICK")
	return q != "" && q != "0"
}()

func targetNs() int64 {
	if quick {
		return 6000000
	}
	return 60000000
}

// measure runs fn(n) (n operations, returning the nanoseconds of the
// measured part) and returns the median time per unit, one operation
// counting as `units` units.
func measure(fn func(n uint64) int64, units float64) float64 {
	target := targetNs()
	n := uint64(1)
	var wall int64
	for {
		t0 := time.Now()
		fn(n)
		wall = int64(time.Since(t0))
		if wall >= target/10 || n >= 1<<40 {
			break
		}
		n *= 2
	}
	if wall < 1 {
		wall = 1
	}
	n = uint64(float64(n) * float64(target) / float64(wall))
	if n < 1 {
		n = 1
	}
	fn(n) // warm-up at the final size
	per := make([]float64, reps)
	for i := range per {
		per[i] = float64(fn(n)) / (float64(n) * units)
	}
	sort.Float64s(per)
	return per[reps/2]
}

func format(v float64) string {
	switch {
	case v < 10:
		return fmt.Sprintf("%.2f", v)
	case v < 1000:
		return fmt.Sprintf("%.1f", v)
	default:
		return fmt.Sprintf("%.0f", v)
	}
}

func row(scenario string, v float64) {
	fmt.Printf("%s\t%s\t%s\tns\n", scenario, impl, format(v))
}

func rowUnit(scenario string, v float64, unit string) {
	fmt.Printf("%s\t%s\t%s\t%s\n", scenario, impl, format(v), unit)
}

func rowNA(scenario string) {
	if wanted(scenario) {
		fmt.Printf("%s\t%s\tn/a\tns\n", scenario, impl)
	}
}

func wanted(scenario string) bool {
	only := os.Getenv("BENCH_ONLY")
	if only == "" {
		return true
	}
	for _, s := range strings.Split(only, ",") {
		if s == scenario {
			return true
		}
	}
	return false
}

func run(scenario string, units float64, fn func(n uint64) int64) {
	if wanted(scenario) {
		row(scenario, measure(fn, units))
	}
}

func die(what string) {
	fmt.Fprintf(os.Stderr, "ctxbench: %s\n", what)
	os.Exit(1)
}

var sink int

// ---------------------------------------------------------------------
// wake_latency
// ---------------------------------------------------------------------

const (
	wakeSamples = 3000 // 300 with BENCH_QUICK
	wakeWarmup  = 30
	settle      = 200 * time.Microsecond
)

// epoch makes monotonic readings comparable as int64 nanoseconds.
var epoch = time.Now()

func nanotime() int64 { return int64(time.Since(epoch)) }

// wakeLatency runs one scenario.  wait(ctx, ready) runs on the waiter
// goroutine: it MUST send on ready right before it blocks, and return once
// ctx is cancelled, with nanotime() read right after the blocking call and
// ok false if something else ended the wait.
func wakeLatency(scenario string, wait func(ctx context.Context, ready chan<- struct{}) (t1 int64, ok bool)) {
	if !wanted(scenario) && !wanted(scenario+"_p50") && !wanted(scenario+"_p99") &&
		!wanted("wake_latency") {
		return
	}
	n := wakeSamples
	if quick {
		n /= 10
	}
	jobs := make(chan context.Context)
	ready := make(chan struct{})
	type result struct {
		t1 int64
		ok bool
	}
	done := make(chan result)
	go func() {
		for ctx := range jobs {
			t1, ok := wait(ctx, ready)
			done <- result{t1, ok}
		}
	}()
	samples := make([]int64, 0, n)
	for i := 0; i < wakeWarmup+n; i++ {
		ctx, cancel := context.WithCancel(context.Background())
		jobs <- ctx
		<-ready
		for t := time.Now(); time.Since(t) < settle; {
		}
		t0 := nanotime()
		cancel()
		r := <-done
		if !r.ok {
			die(scenario + ": the wait ended without the cancel")
		}
		if i >= wakeWarmup {
			samples = append(samples, r.t1-t0)
		}
	}
	close(jobs)
	sort.Slice(samples, func(a, b int) bool { return samples[a] < samples[b] })
	rowUnit(scenario+"_p50", float64(samples[len(samples)/2])/1e3, "us")
	rowUnit(scenario+"_p99", float64(samples[len(samples)*99/100])/1e3, "us")
}

func wakeLatencyAll() {
	wakeLatency("wake_latency_sleep", func(ctx context.Context, ready chan<- struct{}) (int64, bool) {
		t := time.NewTimer(10 * time.Second)
		defer t.Stop()
		ready <- struct{}{}
		select {
		case <-ctx.Done():
			return nanotime(), true
		case <-t.C:
			return nanotime(), false
		}
	})

	wakeLatency("wake_latency_cond", func(ctx context.Context, ready chan<- struct{}) (int64, bool) {
		ready <- struct{}{}
		<-ctx.Done()
		return nanotime(), true
	})

	r, w, err := os.Pipe()
	if err != nil {
		die("os.Pipe: " + err.Error())
	}
	defer r.Close()
	defer w.Close()
	var buf [1]byte
	aLongTimeAgo := time.Unix(1, 0)
	wakeLatency("wake_latency_poll", func(ctx context.Context, ready chan<- struct{}) (int64, bool) {
		stopped := make(chan struct{})
		go func() { // the watcher: what package net starts for a dial's ctx
			<-ctx.Done()
			r.SetReadDeadline(aLongTimeAgo)
			close(stopped)
		}()
		ready <- struct{}{}
		_, err := r.Read(buf[:])
		t1 := nanotime()
		<-stopped
		r.SetReadDeadline(time.Time{})
		return t1, errors.Is(err, os.ErrDeadlineExceeded)
	})
}

func main() {
	bg := context.Background()
	live, liveCancel := context.WithCancel(bg)
	defer liveCancel()
	p1, cancel1 := context.WithCancel(bg)
	defer cancel1()
	p2, cancel2 := context.WithCancel(bg)
	defer cancel2()

	run("check", 1, func(n uint64) int64 {
		hits := 0
		t0 := time.Now()
		for i := uint64(0); i < n; i++ {
			if live.Err() != nil {
				hits++
			}
		}
		t := int64(time.Since(t0))
		sink += hits
		return t
	})

	rowNA("register_unregister")

	run("source_create_destroy", 1, func(n uint64) int64 {
		t0 := time.Now()
		for i := uint64(0); i < n; i++ {
			_, cancel := context.WithCancel(bg)
			cancel()
		}
		return int64(time.Since(t0))
	})

	run("link2_create_destroy", 1, func(n uint64) int64 {
		t0 := time.Now()
		for i := uint64(0); i < n; i++ {
			ctx, cancel := context.WithCancel(p1)
			go func() {
				select {
				case <-p2.Done():
					cancel()
				case <-ctx.Done():
				}
			}()
			cancel()
		}
		return int64(time.Since(t0))
	})

	run("timeout_create_dispose", 1, func(n uint64) int64 {
		t0 := time.Now()
		for i := uint64(0); i < n; i++ {
			_, cancel := context.WithTimeout(bg, time.Hour)
			cancel()
		}
		return int64(time.Since(t0))
	})

	run("create_register_cancel", 1, func(n uint64) int64 {
		t0 := time.Now()
		for i := uint64(0); i < n; i++ {
			ctx, cancel := context.WithCancel(bg)
			done := ctx.Done()
			cancel()
			select {
			case <-done:
			default:
				die("create_register_cancel: Done not closed")
			}
		}
		return int64(time.Since(t0))
	})

	{
		children := make([]context.Context, fanout)
		cancels := make([]context.CancelFunc, fanout)
		run("cancel_fanout_1000", fanout, func(n uint64) int64 {
			var timed int64
			for i := uint64(0); i < n; i++ {
				parent, cancel := context.WithCancel(bg)
				for k := range children {
					children[k], cancels[k] = context.WithCancel(parent)
					children[k].Done()
				}
				t0 := time.Now()
				cancel()
				timed += int64(time.Since(t0))
				for k := range children {
					if children[k].Err() == nil {
						die("cancel_fanout_1000: child not cancelled")
					}
					cancels[k]()
				}
			}
			return timed
		})
	}

	{
		cancels := make([]context.CancelFunc, chainN)
		run("chain_100", chainN, func(n uint64) int64 {
			var timed int64
			for i := uint64(0); i < n; i++ {
				root, rootCancel := context.WithCancel(bg)
				ctx := root
				for k := range cancels {
					ctx, cancels[k] = context.WithCancel(ctx)
				}
				leaf := ctx
				t0 := time.Now()
				rootCancel()
				for leaf.Err() == nil {
					if time.Since(t0) > 10*time.Second {
						die("chain_100: leaf never cancelled")
					}
				}
				timed += int64(time.Since(t0))
				for _, c := range cancels {
					c()
				}
			}
			return timed
		})
	}

	rowNA("register_unregister_contended")

	wakeLatencyAll()

	if live.Err() != nil || p1.Err() != nil || p2.Err() != nil {
		die("a live context was cancelled")
	}
}
