// dotnet_bench: the .NET peer (System.Threading.CancellationTokenSource) of
// bench/core_bench.c, run on Mono (Debian 12's mono-complete, Mono 6.8).
// Mono's mscorlib carries CoreFX's CancellationTokenSource of the .NET Core
// 2.x era (callbacks in SparselyPopulatedArray lists; .NET Core 3.0
// rewrote it, so today's .NET runtime would give other numbers).  Build and
// run (bench/run.sh does both):
//   mcs -optimize+ -out:dotnet_bench.exe dotnet_bench.cs && mono dotnet_bench.exe
//
// Prints `scenario<TAB>dotnet_mono<TAB>value<TAB>unit` rows, measured with
// the same loop as bench/bench.h (calibrate to ~60 ms batches, warm up,
// median of 7; BENCH_QUICK=1 for ~10x smaller batches, BENCH_ONLY=a,b to run
// some scenarios).  The clock is Stopwatch.GetTimestamp(), which ticks
// every 100 ns on Mono: whole-loop rows span milliseconds; the fan-out and
// chain rows add up one difference per cancel, each off by less than a
// tick, with no bias on average (the ticks fall at random points).
// Garbage collections triggered by a scenario's allocations run inside
// its batches and are counted, as Go's and Node's are.
//
// How each scenario maps (every feature is native; nothing is emulated):
//   check: CancellationToken.IsCancellationRequested;
//   register_unregister: token.Register(Action), then Dispose() of the
//     returned CancellationTokenRegistration (the delegate is allocated
//     once, outside the loop);
//   source_create_destroy: new CancellationTokenSource(), Dispose();
//   link2_create_destroy: CancellationTokenSource.CreateLinkedTokenSource(
//     t1, t2), Dispose() (which unregisters from both parents);
//   timeout_create_dispose: new CancellationTokenSource(TimeSpan) of one
//     hour (a System.Threading.Timer inside), Dispose();
//   create_register_cancel: new, Register a counting callback, Cancel()
//     (callbacks run inside Cancel), Dispose();
//   cancel_fanout_1000: 1000 registrations (not timed), the timed Cancel(),
//     then the registrations and the source disposed (not timed); per
//     callback;
//   chain_100: a root and 100 CreateLinkedTokenSource(previous) sources;
//     timed: root.Cancel() until the leaf reads cancelled; per hop;
//   register_unregister_contended: 2 threads registering and disposing on
//     one shared token, per pair of one thread (wall time), as in
//     core_bench.
// .NET has no deadline to query or re-arm (deadline_*_chain_100), no
// caller storage and no work scopes: those rows are libcancel's alone.
// No instruction counts: callgrind counts a JIT's instructions, not the
// program's, and the rows would not compare with the C ones.
using System;
using System.Diagnostics;
using System.Globalization;
using System.Threading;

static class DotnetBench
{
    const string Impl = "dotnet_mono";
    const int Reps = 7;
    const int Fanout = 1000;
    const int ChainN = 100;

    static readonly bool Quick = IsQuick();
    static readonly double NsPerTick = 1e9 / Stopwatch.Frequency;

    static bool IsQuick()
    {
        string q = Environment.GetEnvironmentVariable("BENCH_QUICK");
        return !string.IsNullOrEmpty(q) && q != "0";
    }

    static long NowNs()
    {
        return (long)(Stopwatch.GetTimestamp() * NsPerTick);
    }

    static long TargetNs()
    {
        return Quick ? 6000000 : 60000000;
    }

    // fn(n) runs n operations and returns the nanoseconds of the measured
    // part; returns the median per unit (one operation = units units).
    static double Measure(Func<ulong, long> fn, double units)
    {
        long target = TargetNs();
        ulong n = 1;
        long wall;
        for (;;)
        {
            long t0 = NowNs();
            fn(n);
            wall = NowNs() - t0;
            if (wall >= target / 10 || n >= (1UL << 40))
                break;
            n *= 2;
        }
        if (wall < 1)
            wall = 1;
        n = (ulong)((double)n * target / wall);
        if (n < 1)
            n = 1;
        fn(n); // warm-up at the final size
        var per = new double[Reps];
        for (int i = 0; i < Reps; i++)
            per[i] = fn(n) / ((double)n * units);
        Array.Sort(per);
        return per[Reps / 2];
    }

    static string Format(double v)
    {
        string f = v < 10 ? "F2" : v < 1000 ? "F1" : "F0";
        return v.ToString(f, CultureInfo.InvariantCulture);
    }

    static bool Wanted(string scenario)
    {
        string only = Environment.GetEnvironmentVariable("BENCH_ONLY");
        if (string.IsNullOrEmpty(only))
            return true;
        return Array.IndexOf(only.Split(','), scenario) >= 0;
    }

    static void Run(string scenario, Func<ulong, long> fn, double units = 1)
    {
        if (!Wanted(scenario))
            return;
        double v = Measure(fn, units);
        Console.Out.Write(scenario + "\t" + Impl + "\t" + Format(v) + "\tns\n");
        Console.Out.Flush();
    }

    static void Die(string what)
    {
        Console.Error.WriteLine("dotnet_bench: " + what);
        Environment.Exit(1);
    }

    static long sink;
    static long ran;
    static readonly Action Noop = () => { };
    static readonly Action Count = () => { ran++; };

    static int Main()
    {
        var live = new CancellationTokenSource();
        var p1 = new CancellationTokenSource();
        var p2 = new CancellationTokenSource();
        CancellationToken tok = live.Token, t1 = p1.Token, t2 = p2.Token;
        Type mono = Type.GetType("Mono.Runtime");
        object version = mono == null ? null : mono.GetMethod("GetDisplayName",
            System.Reflection.BindingFlags.NonPublic |
            System.Reflection.BindingFlags.Static).Invoke(null, null);
        Console.Error.WriteLine("dotnet_bench: Mono " + (version ?? "?") +
            (Quick ? " (BENCH_QUICK)" : ""));

        Run("check", n =>
        {
            long hits = 0;
            long t0 = NowNs();
            for (ulong i = 0; i < n; i++)
                if (tok.IsCancellationRequested)
                    hits++;
            long t = NowNs() - t0;
            sink += hits;
            return t;
        });

        Run("register_unregister", n =>
        {
            long t0 = NowNs();
            for (ulong i = 0; i < n; i++)
            {
                CancellationTokenRegistration r = tok.Register(Noop);
                r.Dispose();
            }
            return NowNs() - t0;
        });

        Run("source_create_destroy", n =>
        {
            long t0 = NowNs();
            for (ulong i = 0; i < n; i++)
            {
                var s = new CancellationTokenSource();
                s.Dispose();
            }
            return NowNs() - t0;
        });

        Run("link2_create_destroy", n =>
        {
            long t0 = NowNs();
            for (ulong i = 0; i < n; i++)
            {
                var c = CancellationTokenSource.CreateLinkedTokenSource(t1, t2);
                c.Dispose();
            }
            return NowNs() - t0;
        });

        var hour = TimeSpan.FromHours(1);
        Run("timeout_create_dispose", n =>
        {
            long t0 = NowNs();
            for (ulong i = 0; i < n; i++)
            {
                var s = new CancellationTokenSource(hour);
                s.Dispose();
            }
            return NowNs() - t0;
        });

        Run("create_register_cancel", n =>
        {
            ran = 0;
            long t0 = NowNs();
            for (ulong i = 0; i < n; i++)
            {
                var s = new CancellationTokenSource();
                s.Token.Register(Count);
                s.Cancel();
                s.Dispose();
            }
            long t = NowNs() - t0;
            if (ran != (long)n)
                Die("create_register_cancel: callbacks did not run");
            return t;
        });

        var regs = new CancellationTokenRegistration[Fanout];
        Run("cancel_fanout_1000", n =>
        {
            long timed = 0;
            for (ulong i = 0; i < n; i++)
            {
                ran = 0;
                var s = new CancellationTokenSource();
                CancellationToken st = s.Token;
                for (int k = 0; k < Fanout; k++)
                    regs[k] = st.Register(Count);
                long t0 = NowNs();
                s.Cancel();
                timed += NowNs() - t0;
                if (ran != Fanout)
                    Die("cancel_fanout_1000: callbacks did not run");
                for (int k = 0; k < Fanout; k++)
                    regs[k].Dispose();
                s.Dispose();
            }
            return timed;
        }, Fanout);

        var chain = new CancellationTokenSource[ChainN + 1];
        Run("chain_100", n =>
        {
            long timed = 0;
            for (ulong i = 0; i < n; i++)
            {
                chain[0] = new CancellationTokenSource();
                for (int k = 1; k <= ChainN; k++)
                    chain[k] = CancellationTokenSource.CreateLinkedTokenSource(
                        chain[k - 1].Token);
                CancellationToken leaf = chain[ChainN].Token;
                long t0 = NowNs();
                chain[0].Cancel();
                while (!leaf.IsCancellationRequested)
                    if (NowNs() - t0 > 10000000000L)
                        Die("chain_100: leaf never cancelled");
                timed += NowNs() - t0;
                for (int k = ChainN; k >= 0; k--)
                    chain[k].Dispose();
            }
            return timed;
        }, ChainN);

        Run("register_unregister_contended", n =>
        {
            var start = new Barrier(2);
            long first = long.MaxValue, last = 0;
            ThreadStart body = () =>
            {
                start.SignalAndWait();
                long t0 = NowNs();
                for (ulong i = 0; i < n; i++)
                {
                    CancellationTokenRegistration r = tok.Register(Noop);
                    r.Dispose();
                }
                long tEnd = NowNs();
                long cur;
                while (t0 < (cur = Interlocked.Read(ref first)) &&
                       Interlocked.CompareExchange(ref first, t0, cur) != cur)
                    ;
                while (tEnd > (cur = Interlocked.Read(ref last)) &&
                       Interlocked.CompareExchange(ref last, tEnd, cur) != cur)
                    ;
            };
            var a = new Thread(body);
            var b = new Thread(body);
            a.Start();
            b.Start();
            a.Join();
            b.Join();
            start.Dispose();
            return last - first;
        });

        if (tok.IsCancellationRequested || t1.IsCancellationRequested ||
            t2.IsCancellationRequested)
            Die("a live token was cancelled");
        live.Dispose();
        p1.Dispose();
        p2.Dispose();
        return 0;
    }
}
