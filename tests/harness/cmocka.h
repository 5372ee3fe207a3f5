/*
 * The part of cmocka's API that libcancel's tests use, for a C library
 * that Debian's libcmocka is not built for (musl: make check-musl).
 *
 * The tests are written against cmocka (tests/test_util.h includes
 * <cmocka.h>); a build configured with -DCANCEL_TESTS_WITHOUT_CMOCKA=ON
 * puts this directory first on their include path instead.  It is this
 * repository's own small runner, written to cmocka's documented behaviour
 * (a failed assertion ends the test with a longjmp back to the runner,
 * skip() ends it as skipped, a group returns the number of failed tests),
 * not a copy of cmocka: no mocks, no expectations, no crash-signal
 * handlers (a crash ends the program, which CTest counts as a failure),
 * and a failure on a thread other than the runner's aborts the program,
 * since there is no test frame to return to there.
 */
#ifndef CANCEL_TEST_HARNESS_CMOCKA_H
#define CANCEL_TEST_HARNESS_CMOCKA_H

#include <fnmatch.h>
#include <inttypes.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef uintmax_t LargestIntegralType;
typedef void (*CMUnitTestFunction)(void **state);
typedef int (*CMFixtureFunction)(void **state);

struct CMUnitTest {
  const char *name;
  CMUnitTestFunction test_func;
  CMFixtureFunction setup_func;
  CMFixtureFunction teardown_func;
  void *initial_state;
};

enum { CM_RUNNING_, CM_FAILED_, CM_SKIPPED_ };

static struct {
  jmp_buf jump;
  pthread_t runner;
  bool in_test;
  const char *test_filter, *skip_filter;
} cm_ __attribute__((unused));

static inline void print_message(const char *fmt, ...)
    __attribute__((format(printf, 1, 2)));
static inline void print_message(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vprintf(fmt, ap);
  va_end(ap);
  fflush(stdout);
}

static inline void print_error(const char *fmt, ...)
    __attribute__((format(printf, 1, 2)));
static inline void print_error(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fflush(stderr);
}

/* Ends the running test (how: CM_FAILED_ or CM_SKIPPED_). */
static inline __attribute__((noreturn)) void cm_end_(int how, const char *file,
                                                     int line) {
  if (how == CM_FAILED_)
    print_error("[   LINE   ] --- %s:%d: error: Failure!\n", file, line);
  if (!cm_.in_test || !pthread_equal(pthread_self(), cm_.runner)) {
    print_error("a test failed outside the runner's thread: abort\n");
    abort();
  }
  longjmp(cm_.jump, how);
}

#define fail() cm_end_(CM_FAILED_, __FILE__, __LINE__)
#define skip() cm_end_(CM_SKIPPED_, __FILE__, __LINE__)
#define fail_msg(...)                                                          \
  do {                                                                         \
    print_error("ERROR: " __VA_ARGS__);                                        \
    print_error("\n");                                                         \
    fail();                                                                    \
  } while (0)

#define assert_true(c)                                                         \
  do {                                                                         \
    if (!(c)) {                                                                \
      print_error("%s\n", #c);                                                 \
      fail();                                                                  \
    }                                                                          \
  } while (0)
#define assert_false(c) assert_true(!(c))
#define assert_null(p) assert_true((p) == NULL)
#define assert_non_null(p) assert_true((p) != NULL)

#define cm_int_cmp_(a, b, want_equal)                                          \
  do {                                                                         \
    LargestIntegralType cm_a_ = (LargestIntegralType)(a);                      \
    LargestIntegralType cm_b_ = (LargestIntegralType)(b);                      \
    if ((cm_a_ == cm_b_) != (want_equal)) {                                    \
      print_error("%" PRIdMAX " (%#" PRIxMAX ") %s %" PRIdMAX " (%#" PRIxMAX   \
                  ")\n",                                                       \
                  (intmax_t)cm_a_, cm_a_,                                      \
                  (want_equal) ? "!=" : "==", (intmax_t)cm_b_, cm_b_);         \
      fail();                                                                  \
    }                                                                          \
  } while (0)
#define assert_int_equal(a, b) cm_int_cmp_(a, b, true)
#define assert_int_not_equal(a, b) cm_int_cmp_(a, b, false)
#define assert_ptr_equal(a, b)                                                 \
  cm_int_cmp_((uintptr_t)(const void *)(a), (uintptr_t)(const void *)(b), true)

#define cm_str_cmp_(a, b, want_equal)                                          \
  do {                                                                         \
    const char *cm_a_ = (a), *cm_b_ = (b);                                     \
    bool cm_eq_ = cm_a_ != NULL && cm_b_ != NULL && strcmp(cm_a_, cm_b_) == 0; \
    if (cm_eq_ != (want_equal)) {                                              \
      print_error("\"%s\" %s \"%s\"\n", cm_a_ ? cm_a_ : "(null)",              \
                  (want_equal) ? "!=" : "==", cm_b_ ? cm_b_ : "(null)");       \
      fail();                                                                  \
    }                                                                          \
  } while (0)
#define assert_string_equal(a, b) cm_str_cmp_(a, b, true)
#define assert_string_not_equal(a, b) cm_str_cmp_(a, b, false)

#define assert_memory_equal(a, b, n)                                           \
  do {                                                                         \
    if (memcmp((a), (b), (n)) != 0) {                                          \
      print_error("%zu bytes at %s differ from %s\n", (size_t)(n), #a, #b);    \
      fail();                                                                  \
    }                                                                          \
  } while (0)

#define cmocka_unit_test(f)                                                    \
  { #f, f, NULL, NULL, NULL }
#define cmocka_unit_test_setup_teardown(f, setup, teardown)                    \
  { #f, f, setup, teardown, NULL }

static inline void cmocka_set_test_filter(const char *pattern) {
  cm_.test_filter = pattern;
}
static inline void cmocka_set_skip_filter(const char *pattern) {
  cm_.skip_filter = pattern;
}

/* Runs fn(state) as part of the running test: 0, or CM_FAILED_ /
 * CM_SKIPPED_ when it ended the test. */
static inline int cm_guard_(void (*fn)(void **), CMFixtureFunction fix,
                            void **state) {
  int how = setjmp(cm_.jump);
  if (how != 0)
    return how;
  if (fn != NULL)
    fn(state);
  else if (fix(state) != 0)
    return CM_FAILED_;
  return 0;
}

/* cmocka's name: fd_test builds its table at run time and calls it. */
static inline int _cmocka_run_group_tests(const char *group,
                                          const struct CMUnitTest *tests,
                                          size_t n,
                                          CMFixtureFunction group_setup,
                                          CMFixtureFunction group_teardown) {
  void *group_state = NULL;
  size_t failed = 0, passed = 0, skipped = 0, run = 0;
  cm_.runner = pthread_self();
  cm_.in_test = true;
  if (group_setup != NULL && cm_guard_(NULL, group_setup, &group_state) != 0) {
    print_error("[  ERROR   ] %s: group setup failed\n", group);
    cm_.in_test = false;
    return (int)n;
  }
  print_message("[==========] Running %zu test(s).\n", n);
  for (size_t i = 0; i < n; i++) {
    const struct CMUnitTest *t = &tests[i];
    if (cm_.test_filter != NULL && fnmatch(cm_.test_filter, t->name, 0) != 0)
      continue;
    if (cm_.skip_filter != NULL && fnmatch(cm_.skip_filter, t->name, 0) == 0)
      continue;
    run++;
    print_message("[ RUN      ] %s\n", t->name);
    void *state = t->initial_state != NULL ? t->initial_state : group_state;
    int how = 0;
    if (t->setup_func != NULL)
      how = cm_guard_(NULL, t->setup_func, &state);
    if (how == 0)
      how = cm_guard_(t->test_func, NULL, &state);
    if (t->teardown_func != NULL &&
        cm_guard_(NULL, t->teardown_func, &state) == CM_FAILED_)
      how = CM_FAILED_;
    if (how == CM_FAILED_) {
      failed++;
      print_message("[  FAILED  ] %s\n", t->name);
    } else if (how == CM_SKIPPED_) {
      skipped++;
      print_message("[  SKIPPED ] %s\n", t->name);
    } else {
      passed++;
      print_message("[       OK ] %s\n", t->name);
    }
  }
  if (group_teardown != NULL)
    (void)cm_guard_(NULL, group_teardown, &group_state);
  cm_.in_test = false;
  print_message("[==========] %zu test(s) run.\n", run);
  print_message("[  PASSED  ] %zu test(s).\n", passed);
  if (skipped > 0)
    print_message("[  SKIPPED ] %zu test(s).\n", skipped);
  if (failed > 0)
    print_message("[  FAILED  ] %zu test(s).\n", failed);
  return (int)failed;
}

#define cmocka_run_group_tests(tests, setup, teardown)                         \
  _cmocka_run_group_tests(#tests, tests, sizeof(tests) / sizeof((tests)[0]),   \
                          setup, teardown)
#define cmocka_run_group_tests_name(name, tests, setup, teardown)              \
  _cmocka_run_group_tests(name, tests, sizeof(tests) / sizeof((tests)[0]),     \
                          setup, teardown)

#endif
