/*
 * A model of libcancel's registration protocol (src/source.c, src/link.c,
 * the timer's disarm in src/timer.c), checked exhaustively with spin.
 *
 * What is modelled, as the C code does it:
 *   - the per-source spin lock (the ST_LOCKED bit of the state word) and
 *     ST_CANCELLED, published by the unlock that ends the first cancel;
 *   - registration states REG_LISTED / RUNNING / DONE / DETACHED / IDLE and
 *     the REG_WAITERS bit, with the futex wait of cancel_unregister() (a
 *     wait that checks the word and sleeps in one step, woken only by an
 *     explicit wake, so a lost wake-up shows as a deadlock);
 *   - running / running_tid / running_gone for a callback removing itself;
 *   - SF_FIRING, SF_ZOMBIE, SF_PENDING, SF_DEAD and the teardown work list;
 *   - the link edge c -> p (its registration on p, p's children count,
 *     link->parent) and its detach when c goes;
 *   - the timer thread as one more canceller of p, and the disarm that
 *     waits for a timer cancel in flight.
 * What is not: weak memory ordering (spin explores interleavings of a
 * sequentially consistent machine), names, details, reasons, metrics (only
 * the read of the source they imply), shields, fds.
 *
 * The world: a heap source p (one reference, held by thread OwnerP, armed
 * with a timeout), a heap source c linked to p (one reference, held by
 * OwnerC), an application registration R0 on p (owned by OwnerP) and R1 on
 * c (owned by OwnerC), and the link's registration L on p (in c's memory).
 * Three threads: the timer thread, OwnerP, OwnerC.  Each owner registers,
 * may cancel its source, then either unregisters and frees its registration
 * and drops its reference, or drops its reference and frees the
 * registration (the header says unref waits, so that is allowed).  Either
 * callback may instead own its registration: it unregisters itself and
 * frees it while it runs.
 *
 * Properties (assertions; spin also reports any deadlock as an invalid end
 * state):
 *   - no callback runs twice;
 *   - none is lost: one listed when the cancel of its source started runs
 *     exactly once or was removed (unregister returned 1, or it was
 *     detached by the teardown of its source);
 *   - no access after free: every source, registration and link carries a
 *     freed flag, asserted on every access;
 *   - unregister waits: after cancel_unregister() returned 0 on another
 *     thread than the callback's, the callback is not running;
 *   - unref waits: after cancel_source_unref() returned, no callback still
 *     registered on the source is running (include/cancel.h);
 *   - nothing leaks: both sources are freed when every thread is done.
 *
 * The protocol under check:
 *   default: today's code.  Spin finds issue 11 item 4: p is kept alive by
 *     c, the timer thread has popped R0, OwnerP's unref takes the zombie
 *     path and returns at once, OwnerP frees R0, and the timer thread then
 *     runs the callback on it and stores REG_DONE into it.
 *   -DFIXED (FIXED 1): the fix.  The zombie path detaches the application
 *     registrations still listed and, when an application callback of the
 *     source is running on another thread, announces itself on the source
 *     and waits on a word of its own; the canceller, under the source lock,
 *     sets that word and wakes it as soon as the running callback has
 *     returned.  Nothing is read from the registration.  Verifies clean.
 *   -DNAIVE_FIX: the zombie path detaches the listed application
 *     registrations and, when one is RUNNING on another thread, waits for
 *     it on the registration's state word like cancel_unregister() does.
 *     Not enough: when the running callback owns its registration (it
 *     removes itself and frees it), the waiter reads freed memory (and,
 *     without a wake in the self-removal path, would sleep for ever).
 */

#ifndef FIXED
#define FIXED 0
#endif
#if defined(NAIVE_FIX)
#define FIX_ON_REG 1
#define FIX_ON_WAITER 0
#elif FIXED
#define FIX_ON_REG 0
#define FIX_ON_WAITER 1
#else
#define FIX_ON_REG 0
#define FIX_ON_WAITER 0
#endif

#define NONE 255

/* Witnesses: in a model built with -DWITNESS, run with the environment
 * variable WITNESS=n, the assertion at point n fails when that point is
 * reached, so run.sh can show that each interesting interleaving is
 * explored (a model whose properties hold only because nothing happens
 * proves nothing).  WITNESS unset or 0: no point fails, and the run is the
 * full check.  Without -DWITNESS they are no-ops. */
#ifdef WITNESS
byte witness; /* set once by init from the environment */
#define REACHED(n) assert(witness != n)
#else
#define REACHED(n) skip
#endif

/* Sources. */
#define P 0
#define C 1

/* Registrations: R0 and R1 belong to the application, L to the link. */
#define R0 0
#define R1 1
#define L 2

/* The state word. */
#define ST_CANCELLED 1
#define ST_LOCKED 2

/* Source flags (those the protocol needs). */
#define SF_FIRING 1
#define SF_ZOMBIE 2
#define SF_PENDING 4
#define SF_DEAD 8

/* Registration states, low bits, and the waiters bit. */
#define REG_IDLE 0
#define REG_LISTED 1
#define REG_RUNNING 2
#define REG_DONE 3
#define REG_DETACHED 4
#define REG_MASK 7
#define REG_WAITERS 8

/* cancel_unregister()'s -EINVAL. */
#define EINVAL 2

/* ---- Shared memory --------------------------------------------------- */

byte sst[2];       /* state word: ST_CANCELLED | ST_LOCKED */
byte sflags[2];    /* SF_*, under the lock */
byte srunning[2];  /* running: the registration being run, or NONE */
byte srtid[2];     /* running_tid: the _pid running the cancel */
bool sgone[2];     /* *running_gone (the canceller's local, one per cancel) */
byte schildren[2]; /* length of the children list (only p has one) */
byte swaiter[2];   /* FIXED: the _pid waiting in unref, or NONE */
bool sfreed[2];

byte lparent;      /* link->parent of c's link (atomic), P or NONE */

byte rstate[3];
byte rsrc[3];      /* reg->src */
bool rlisted[3];   /* in its source's list ... */
byte rseq[3];      /* ... pushed at this time: the head is the newest */
byte seqctr;
bool rfreed[3];
byte fgen[3];      /* futex on rstate[r]: bumped by every wake */

byte wword[5];     /* FIXED: the unref waiter's own word, by _pid */
byte wgen[5];      /* futex on it */

bool tarmed;       /* p is in the timer heap */
bool tfiring;      /* the timer thread popped p and is firing it */
byte timer_pid;

/* Observations for the properties (application registrations only). */
byte ran[2];       /* times the callback ran */
byte cbrun[2];     /* callback running right now */
bool lac[2];       /* listed when the cancel of its source started */
bool removed[2];   /* unregister returned 1, or detached by teardown */
bool inl[2];       /* ran inline from cancel_register() */
bool cbself[2];    /* the callback owns its registration */

/* Locals every thread needs, since the operations below are inlined. */
#define LOCALS \
  byte pv, pr, pold; bool ppend; \
  byte cv, cr, cold; bool cpend; \
  byte uv, us, ust, uret, cret, oret; \
  byte gv; \
  byte rv, rr, rst; \
  byte z1, th, tv; \
  byte lp, lpar, dv, dst, dret; \
  byte fw

/* ---- The spin lock ---------------------------------------------------- */

/* cancel__lock(): spins (here: blocks) until the bit is clear, then sets
 * it.  Spinning on a freed source is a use after free too. */
inline lock(s, v) {
  atomic {
    (sfreed[s] || !(sst[s] & ST_LOCKED));
    assert(!sfreed[s]);
    sst[s] = sst[s] | ST_LOCKED;
    v = sst[s]
  }
}

/* cancel__unlock(): a plain store of the value the holder knows. */
inline unlock(s, v) {
  atomic {
    assert(!sfreed[s]);
    sst[s] = v & ~ST_LOCKED
  }
}

/* ---- Futexes ------------------------------------------------------------ */

/* FUTEX_WAIT on rstate[r]: sleeps only if the word still holds expected,
 * then until a wake.  The kernel reads the word: it must not be freed. */
inline futex_wait(r, expected) {
  atomic {
    assert(!rfreed[r]);
    if
    :: rstate[r] == expected -> fw = fgen[r]; (fgen[r] != fw)
    :: else -> skip
    fi;
    fw = 0
  }
}

/* The waiting loop of cancel__reg_remove_locked(). */
inline wait_done(r, st) {
  do
  :: (st & REG_MASK) == REG_RUNNING ->
     futex_wait(r, st);
     assert(!rfreed[r]);
     st = rstate[r]
  :: else -> break
  od;
  skip
}

/* ---- Lists ------------------------------------------------------------ */

/* src->head: the newest registration listed on s. */
inline head(s, h) {
  d_step {
    h = NONE;
    if
    :: rlisted[R0] && rsrc[R0] == s -> h = R0
    :: else
    fi;
    if
    :: rlisted[R1] && rsrc[R1] == s && (h == NONE || rseq[R1] > rseq[h]) -> h = R1
    :: else
    fi;
    if
    :: rlisted[L] && rsrc[L] == s && (h == NONE || rseq[L] > rseq[h]) -> h = L
    :: else
    fi
  }
}

inline push(r) {
  d_step { seqctr++; rseq[r] = seqctr; rlisted[r] = 1 }
}

/* ---- Registrations ------------------------------------------------------ */

/* A callback of the application: reads its argument (the struct that
 * holds the registration), and when it owns the registration, removes it
 * (this must not wait: it runs on the cancelling thread) and frees it. */
inline app_cb(r) {
  assert(!rfreed[r]);
  cbrun[r]++;
  ran[r]++;
  assert(ran[r] <= 1);
  if
  :: cbself[r] ->
     unregister(r, cret);
     assert(cret == 0);
     rfreed[r] = 1;
     cret = 0
  :: else -> assert(!rfreed[r])
  fi;
  cbrun[r]--
}

/* cancel_register(r, s): runs the callback inline when s is cancelled. */
inline do_register(r, s, ret) {
  assert(!rfreed[r]);
  rsrc[r] = s;
  lock(s, gv);
  if
  :: gv & ST_CANCELLED ->
     REACHED(7);
     unlock(s, gv);
     rstate[r] = REG_DONE;
     inl[r] = 1;
     app_cb(r);
     ret = 1
  :: else ->
     push(r);
     rstate[r] = REG_LISTED;
     unlock(s, gv);
     ret = 0
  fi;
  gv = 0
}

/* cancel__reg_remove_locked(): s is locked with value v; unlocks it. */
inline remove_locked(s, r, v, st, ret) {
  assert(!rfreed[r]);
  st = rstate[r];
  if
  :: (st & REG_MASK) == REG_LISTED ->
     rlisted[r] = 0;
     rstate[r] = REG_IDLE;
     unlock(s, v);
     ret = 1
  :: (st & REG_MASK) == REG_RUNNING && srunning[s] == r && srtid[s] == _pid ->
     /* A callback removing itself: tell the canceller not to touch r. */
     REACHED(3);
     sgone[s] = 1;
     rstate[r] = REG_IDLE;
#if FIX_ON_REG
     /* The naive fix needs a wake here, or the unref waiting on r sleeps
      * for ever. */
     if
     :: st & REG_WAITERS -> fgen[r]++
     :: else
     fi;
#endif
     unlock(s, v);
     ret = 0
  :: (st & REG_MASK) == REG_RUNNING && !(srunning[s] == r && srtid[s] == _pid) ->
     if
     :: r != L -> REACHED(1) /* unregister waits for the callback */
     :: else -> REACHED(2)   /* c's teardown waits for the link callback */
     fi;
     st = st | REG_WAITERS;
     rstate[r] = st;
     unlock(s, v);
     wait_done(r, st);
     rstate[r] = REG_IDLE;
     ret = 0
  :: (st & REG_MASK) == REG_DONE ->
     unlock(s, v);
     rstate[r] = REG_IDLE;
     ret = 0
  :: else ->
     unlock(s, v);
     rstate[r] = REG_IDLE;
     ret = 1
  fi
}

/* cancel_unregister(r). */
inline unregister(r, ret) {
  assert(!rfreed[r]);
  ust = rstate[r];
  if
  :: (ust & REG_MASK) == REG_LISTED || (ust & REG_MASK) == REG_RUNNING ->
     assert(!rfreed[r]);
     us = rsrc[r];
     assert(us != NONE);
     lock(us, uv);
     remove_locked(us, r, uv, ust, ret)
  :: (ust & REG_MASK) == REG_DONE ->
     rstate[r] = REG_IDLE;
     ret = 0
  :: (ust & REG_MASK) == REG_DETACHED ->
     rstate[r] = REG_IDLE;
     ret = 1
  :: else -> ret = EINVAL
  fi;
  d_step { uv = 0; us = 0; ust = 0 }
}

/* ---- Cancelling --------------------------------------------------------- */

/* Records which application registrations are listed as the cancel of s
 * starts (lock held). */
inline mark_listed(s) {
  d_step {
    if
    :: rlisted[R0] && rsrc[R0] == s -> lac[R0] = 1
    :: else
    fi;
    if
    :: rlisted[R1] && rsrc[R1] == s -> lac[R1] = 1
    :: else
    fi
  }
}

/* FIXED: the canceller tells the unref waiting on s that the callback it
 * waited for has returned (lock held). */
inline signal_waiter(s) {
#if FIX_ON_WAITER
  if
  :: swaiter[s] != NONE ->
     wword[swaiter[s]] = 1;
     wgen[swaiter[s]]++;
     swaiter[s] = NONE
  :: else
  fi
#else
  skip
#endif
}

/* cancel__fire(S), with DISPATCH(r) calling the callback.  A macro, not an
 * inline, since p's instance calls c's (through the link) and an inline
 * cannot be expanded inside itself. */
#define FIRE(S, VIA, V, R, OLD, PEND, DISPATCH, TEARDOWN) \
  lock(S, V); \
  if \
  :: V & ST_CANCELLED -> REACHED(10); unlock(S, V) \
  :: else -> \
     mark_listed(S); \
     d_step { \
       sflags[S] = sflags[S] | SF_FIRING; \
       srtid[S] = _pid; \
       V = V | ST_CANCELLED \
     }; \
     do \
     :: true -> \
        head(S, R); \
        if \
        :: R == NONE -> break \
        :: else -> \
           d_step { \
             assert(!rfreed[R]); \
             rlisted[R] = 0; \
             rstate[R] = REG_RUNNING; \
             sgone[S] = 0; \
             srunning[S] = R \
           }; \
           unlock(S, V); \
           DISPATCH(R); \
           lock(S, V); \
           if \
           :: !sgone[S] -> \
              assert(!rfreed[R]); \
              OLD = rstate[R]; \
              rstate[R] = REG_DONE; \
              if \
              :: OLD & REG_WAITERS -> fgen[R]++ \
              :: else \
              fi \
           :: else \
           fi; \
           signal_waiter(S) \
        fi \
     od; \
     skip; /* a break may not jump into a d_step */ \
     d_step { \
       srunning[S] = NONE; \
       sgone[S] = 0; \
       sflags[S] = sflags[S] & ~SF_FIRING; \
       PEND = (sflags[S] & SF_PENDING) != 0 \
     }; \
     unlock(S, V); \
     if \
     :: VIA == NONE -> assert(!sfreed[S]) /* metrics read src->name */ \
     :: else \
     fi; \
     if \
     :: PEND -> REACHED(5); TEARDOWN \
     :: else \
     fi \
  fi; \
  d_step { V = 0; R = 0; OLD = 0; PEND = 0 }

inline dispatch_c(r) {
  app_cb(r)
}

/* c is never left pending here: only a zombie parent is, or a source
 * dropped from its own callback, which no callback here does. */
#define FIRE_C(VIA) FIRE(C, VIA, cv, cr, cold, cpend, dispatch_c, assert(false))

/* cancel__link_fired(): the link is in c's memory; it reads the parent's
 * reason, then fires c. */
inline link_fired() {
  assert(!rfreed[L]);
  lpar = lparent;
  if
  :: lpar != NONE ->
     assert(!sfreed[lpar]);
     FIRE_C(P)
  :: else
  fi;
  lpar = 0
}

inline dispatch_p(r) {
  if
  :: r == L -> link_fired()
  :: else -> app_cb(r)
  fi
}

#define FIRE_P(VIA) FIRE(P, VIA, pv, pr, pold, ppend, dispatch_p, teardown_p())

/* ---- Teardown ----------------------------------------------------------- */

/* cancel__timer_disarm(p): out of the heap, then wait for a timer cancel
 * in flight unless this is the timer thread. */
inline timer_disarm() {
  tarmed = 0;
  if
  :: tfiring && _pid != timer_pid -> REACHED(9)
  :: else
  fi;
  (!tfiring || _pid == timer_pid)
}

/* cancel__link_detach() of c's link; z gets p when c was the last child of
 * zombie p and p is not firing (the caller tears it down). */
inline link_detach(z) {
  assert(!rfreed[L]);
  lp = lparent;
  if
  :: lp == NONE -> skip
  :: else ->
     lock(lp, dv);
     schildren[lp]--;
     lparent = NONE;
     if
     :: (sflags[lp] & SF_ZOMBIE) && schildren[lp] == 0 ->
        if
        :: sflags[lp] & SF_FIRING -> sflags[lp] = sflags[lp] | SF_PENDING
        :: else -> sflags[lp] = sflags[lp] | SF_DEAD; z = lp
        fi
     :: else
     fi;
     remove_locked(lp, L, dv, dst, dret)
  fi;
  d_step { lp = 0; dv = 0; dst = 0; dret = 0 }
}

/* detach_everything_locked(s). */
inline detach_everything(s) {
  assert(schildren[s] == 0); /* a heap source with children is a zombie */
  d_step {
    if
    :: rlisted[R0] && rsrc[R0] == s ->
       assert(!rfreed[R0]);
       rlisted[R0] = 0; rsrc[R0] = NONE; rstate[R0] = REG_DETACHED;
       removed[R0] = 1
    :: else
    fi;
    if
    :: rlisted[R1] && rsrc[R1] == s ->
       assert(!rfreed[R1]);
       rlisted[R1] = 0; rsrc[R1] = NONE; rstate[R1] = REG_DETACHED;
       removed[R1] = 1
    :: else
    fi;
    assert(!(rlisted[L] && rsrc[L] == s))
  }
}

/* The application registrations of a source becoming a zombie (lock
 * held): they go now, as they would without children. */
inline detach_app(s) {
  d_step {
    if
    :: rlisted[R0] && rsrc[R0] == s ->
       assert(!rfreed[R0]);
       rlisted[R0] = 0; rsrc[R0] = NONE; rstate[R0] = REG_DETACHED;
       removed[R0] = 1
    :: else
    fi;
    if
    :: rlisted[R1] && rsrc[R1] == s ->
       assert(!rfreed[R1]);
       rlisted[R1] = 0; rsrc[R1] = NONE; rstate[R1] = REG_DETACHED;
       removed[R1] = 1
    :: else
    fi
  }
}

/* The end of teardown_one(): frees s (and with c, the link in its block). */
inline free_source(s) {
  atomic {
    assert(!sfreed[s]);
    sfreed[s] = 1;
    if
    :: s == C -> rfreed[L] = 1
    :: else
    fi
  }
}

/* teardown_one(p): p has no parent, it has a timer, and it had a child
 * (SEEN_CHILD), so it takes its lock to detach what is left. */
inline teardown_p() {
  timer_disarm();
  lock(P, tv);
  detach_everything(P);
  unlock(P, tv);
  free_source(P);
  tv = 0
}

/* teardown_list(c): c unhooks its link (which hands back p when c was the
 * last child of zombie p), looks at its head without the lock, as its last
 * owner may, and frees itself; then p, if it came back. */
inline teardown_list_c() {
  z1 = NONE;
  link_detach(z1);
  head(C, th);
  if
  :: th != NONE ->
     lock(C, tv);
     detach_everything(C);
     unlock(C, tv)
  :: else
  fi;
  free_source(C);
  d_step { th = 0; tv = 0 };
  if
  :: z1 != NONE -> REACHED(8); teardown_p()
  :: else
  fi;
  z1 = 0
}

/* FIXED: wait on this thread's own word until the canceller says the
 * running callback has returned. */
inline wait_own_word() {
  do
  :: wword[_pid] == 0 ->
     atomic {
       if
       :: wword[_pid] == 0 -> fw = wgen[_pid]; (wgen[_pid] != fw)
       :: else -> skip
       fi;
       fw = 0
     }
  :: else -> break
  od;
  wword[_pid] = 0
}

/* The zombie path of release() after the application registrations were
 * detached: s is locked with rv; unlocks it. */
inline zombie_unlock(s) {
#if FIX_ON_REG
  rr = srunning[s];
  if
  :: (sflags[s] & SF_FIRING) && srtid[s] != _pid && rr != NONE && rr != L &&
     (rstate[rr] & REG_MASK) == REG_RUNNING ->
     REACHED(6);
     rst = rstate[rr] | REG_WAITERS;
     rstate[rr] = rst;
     unlock(s, rv);
     wait_done(rr, rst)
  :: else -> unlock(s, rv)
  fi;
  skip;
  d_step { rr = 0; rst = 0 }
#elif FIX_ON_WAITER
  rr = srunning[s];
  if
  :: (sflags[s] & SF_FIRING) && srtid[s] != _pid && rr != NONE && rr != L ->
     assert(swaiter[s] == NONE); /* one last reference, one waiter */
     swaiter[s] = _pid;
     unlock(s, rv);
     REACHED(6);
     wait_own_word()
  :: else -> unlock(s, rv)
  fi;
  rr = 0
#else
  unlock(s, rv)
#endif
}

/* RELEASE(S, TEARDOWN), the last reference gone, TEARDOWN the source's teardown_list
 * (no fast path: p was armed and has had a child, c is linked, so neither
 * takes it).  A macro, to expand only the teardown S needs. */
#define RELEASE(S, TEARDOWN) \
  lock(S, rv); \
  if \
  :: schildren[S] > 0 -> \
     sflags[S] = sflags[S] | SF_ZOMBIE; \
     if \
     :: (sflags[S] & SF_FIRING) && srtid[S] != _pid && srunning[S] != NONE && \
        srunning[S] != L -> REACHED(4) /* item 4's window */ \
     :: else \
     fi; \
     detach_app(S); \
     zombie_unlock(S) \
  :: schildren[S] == 0 && (sflags[S] & SF_FIRING) && srtid[S] == _pid -> \
     /* Dropped from one of its own callbacks. */ \
     sflags[S] = sflags[S] | SF_PENDING; \
     unlock(S, rv) \
  :: else -> \
     sflags[S] = sflags[S] | SF_DEAD; \
     unlock(S, rv); \
     TEARDOWN \
  fi; \
  rv = 0

/* ---- Threads ------------------------------------------------------------ */

/* The timer thread: pops p when its timeout is due, fires it. */
proctype Timer() {
  LOCALS;
  atomic {
    if
    :: tarmed -> tarmed = 0; tfiring = 1
    :: else -> skip
    fi
  }
  if
  :: tfiring ->
     assert(!sfreed[P]); /* cancel__timer_fired() reads the deadline */
     FIRE_P(NONE);
     tfiring = 0
  :: else
  fi
}

/* An owner of source S with registration R on it. */
#define OWNER(NAME, S, R, FIRE_IT, TEARDOWN) \
proctype NAME() { \
  LOCALS; \
  do_register(R, S, oret); \
  if \
  :: FIRE_IT(NONE) \
  :: skip \
  fi; \
  if \
  :: cbself[R] -> RELEASE(S, TEARDOWN) \
  :: else -> \
     if \
     :: unregister(R, oret); \
        assert(oret != EINVAL); \
        assert(oret == 1 || cbrun[R] == 0) /* unregister waits */; \
        if \
        :: oret == 1 -> removed[R] = 1 \
        :: else \
        fi; \
        rfreed[R] = 1; \
        RELEASE(S, TEARDOWN) \
     :: RELEASE(S, TEARDOWN); \
        assert(cbrun[R] == 0) /* unref waits */; \
        rfreed[R] = 1 \
     fi \
  fi \
}

OWNER(OwnerP, P, R0, FIRE_P, teardown_p())
OWNER(OwnerC, C, R1, FIRE_C, teardown_list_c())

init {
  atomic {
#ifdef WITNESS
    c_code {
      const char *w = getenv("WITNESS");
      now.witness = (uchar)(w != NULL ? atoi(w) : 0);
    };
#endif
    srunning[P] = NONE; srunning[C] = NONE;
    swaiter[P] = NONE; swaiter[C] = NONE;
    rsrc[R0] = NONE; rsrc[R1] = NONE;
    /* c = cancel_source_new_linked(p): L on p, c in p's children. */
    rsrc[L] = P;
    lparent = P;
    schildren[P] = 1;
    push(L);
    rstate[L] = REG_LISTED;
    /* cancel_source_cancel_after(p, ...). */
    tarmed = 1;
    if
    :: cbself[R0] = 1
    :: skip
    fi;
    if
    :: cbself[R1] = 1
    :: skip
    fi;
    timer_pid = run Timer();
    run OwnerP();
    run OwnerC()
  }
  (_nr_pr == 1);
  /* Everything is done: check what happened. */
  assert(sfreed[P] && sfreed[C]);
  assert(ran[R0] <= 1 && ran[R1] <= 1);
  assert(!lac[R0] || ran[R0] + removed[R0] == 1);
  assert(!lac[R1] || ran[R1] + removed[R1] == 1);
  assert(ran[R0] == 0 || lac[R0] || inl[R0]);
  assert(ran[R1] == 0 || lac[R1] || inl[R1])
}
