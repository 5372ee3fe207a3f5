# libcancel: the newcomer's entry point.
#
#   make deps    install the Debian packages everything below needs
#   make         configure and build (RelWithDebInfo) into build/
#   make check   tests in three builds (normal, ASan+UBSan, TSan) + valgrind,
#                the core's unit tests built with clang and with musl-gcc
#   make fuzz    the libFuzzer harnesses, FUZZ_SECONDS (300) each
#   make faults  fail every faultable call of the core, one at a time (ASan)
#   make bench   build (Release) and run the benchmarks
#   make demo    build and run the example programs
#   make format  clang-format the sources
#   make clean   remove every build directory
#   make faults-tests  the tests under random allocation failures (libfiu)
#   make package the Debian packages (build-package/packages/*.deb), checked
#
# Variables worth overriding on the command line:
#   VALGRIND_SKIP="stress_test foo_test"   tests not run under valgrind
#   VALGRIND_TIMEOUT=600                   seconds per program under valgrind
#   CANCEL_TEST_TIME_SCALE=5               widen the tests' timing tolerances
#   JOBS=4                                 parallel compile jobs
#   FUZZ_SECONDS=600                       seconds per harness (make fuzz)
#   CHECK_FUZZ_SECONDS=25                  the same in make check

SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec

CMAKE ?= cmake
CTEST ?= ctest
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
CTEST_FLAGS ?= --output-on-failure -j2 --no-tests=error

# ----------------------------------------------------------------------
# Dependencies (Debian packages).  Later work appends to these lists, e.g.
# DEPS_CHECK += libcurl4-openssl-dev libsqlite3-dev libpq-dev postgresql
#               libmicrohttpd-dev
# ----------------------------------------------------------------------

DEPS_CHECK := build-essential cmake pkg-config libcmocka-dev valgrind libuv1-dev \
              libsqlite3-dev libcurl4-openssl-dev libpq-dev postgresql \
              libmicrohttpd-dev curl wrk perl prometheus \
              libjansson-dev jq clang libclang-rt-14-dev fiu-utils libfiu-dev
# spin: the model check of the registration protocol (tests/model).
DEPS_CHECK += spin
# The manual pages: python3 generates them, mandoc lints them, man-db's
# man shows them (man_test).
DEPS_CHECK += python3 mandoc man-db
# dpkg-dev: dpkg-shlibdeps, for the Depends of the Debian packages (make
# package, and the package_test of make check).
DEPS_CHECK += dpkg-dev
# sqlite3: the shell quickstart_test makes its database with (as the
# README's quick start does).
DEPS_CHECK += sqlite3
# musl-tools: musl-gcc, for make check-musl (the core on musl); the kernel
# headers it is pointed at are linux-libc-dev's (build-essential's).
DEPS_CHECK += musl-tools linux-libc-dev
# node may come from outside Debian: only ask for nodejs when none is found.
DEPS_BENCH := golang-go g++ gnuplot-nox $(if $(shell command -v node),,nodejs)
# The GLib and .NET (Mono) peers; valgrind for the instruction counts.
DEPS_BENCH += libglib2.0-dev mono-complete valgrind
DEPS_FORMAT := clang-format

SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

# $(call apt_install,PACKAGES): installs those not installed yet; runs
# apt-get update first, and only when something is missing.
define apt_install
	@missing=""; \
	for p in $(1); do \
	  status=$$(dpkg-query -W -f='$${Status}' "$$p" 2>/dev/null || true); \
	  [ "$$status" = "install ok installed" ] || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "== installing:$$missing"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -q; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -q --no-install-recommends $$missing </dev/null; \
	fi
endef

.PHONY: all build deps deps-check deps-bench deps-format check \
	check-normal check-asan check-tsan check-valgrind check-fuzz \
	check-clang check-musl musl-kernel-include \
	check-summary fuzz fuzz-build faults faults-tests bench demo format clean \
	package

all: build

deps: deps-check deps-bench

deps-check:
	$(call apt_install,$(DEPS_CHECK))

deps-bench:
	$(call apt_install,$(DEPS_BENCH))

deps-format:
	$(call apt_install,$(DEPS_FORMAT))

# ----------------------------------------------------------------------
# Build
# ----------------------------------------------------------------------

build:
	$(CMAKE) -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo
	$(CMAKE) --build build -j$(JOBS)

# ----------------------------------------------------------------------
# Check: every step runs even when an earlier one failed, records
# "<passed> <failed> <what>" in $(TALLY), and check-summary prints the
# totals as "N passed, M failed" and fails when M > 0.
# ----------------------------------------------------------------------

TALLY := build-check/tally

# Sanitizer runtime settings; override from the environment if needed.
export ASAN_OPTIONS ?= detect_leaks=1
export UBSAN_OPTIONS ?= print_stacktrace=1:halt_on_error=1

# gcc 12's TSan aborts with "unexpected memory mapping" when the kernel
# randomises mmap with more bits than it expects (vm.mmap_rnd_bits > 28 on
# newer kernels).  Running without ASLR avoids that; the personality is
# inherited, so wrapping ctest covers every test it starts.
TSAN_LAUNCHER = $(shell setarch $$(uname -m) -R true 2>/dev/null && \
                   echo "setarch $$(uname -m) -R")

# Sanitizers and valgrind slow tests down: widen the timing tolerances,
# unless the caller chose a scale.  The normal build gets a little room
# too: ctest runs tests in parallel on a shared machine, where CI saw a
# 20 ms timer land 100 ms late.
NORMAL_SCALE = $(or $(CANCEL_TEST_TIME_SCALE),3)
SLOW_SCALE = $(or $(CANCEL_TEST_TIME_SCALE),4)
VALGRIND_SCALE = $(or $(CANCEL_TEST_TIME_SCALE),10)

VALGRIND_SKIP ?= stress_test
# Run alone under valgrind, after the others (tests/valgrind/run.sh).
VALGRIND_ALONE ?= settle_test timer_test sqlite_test curl_test
VALGRIND_TIMEOUT ?= 600
# --fair-sched: valgrind runs one thread at a time; by default a thread
# that never blocks (an SQLite query, a busy loop under test) can keep the
# others (the timer that cancels it) waiting for minutes.
VALGRIND := valgrind --error-exitcode=1 --leak-check=full --fair-sched=yes \
	--errors-for-leak-kinds=definite,indirect

# $(call check_build,DIR,WHAT,CMAKE-ARGS,CTEST-PREFIX): configure, build
# and run ctest in DIR; a build failure counts as one failure.
define check_build
	@echo "== $(2): build $(1)"
	@mkdir -p $(dir $(TALLY))
	@if ! { $(CMAKE) -S . -B $(1) $(3) && $(CMAKE) --build $(1) -j$(JOBS); }; then \
	  echo "0 1 $(2) (build failed)" >> $(TALLY); exit 1; \
	fi
	@echo "== $(2): ctest in $(1)"
	@rm -f $(1)/junit.xml; \
	rc=0; (cd $(1) && $(4) $(CTEST) $(CTEST_FLAGS) --output-junit junit.xml) || rc=$$?; \
	set -- $$(tr '\n' ' ' < $(1)/junit.xml 2>/dev/null | \
	  sed -n 's/.*<testsuite [^>]*tests="\([0-9]*\)"[^>]*failures="\([0-9]*\)".*/\1 \2/p') 0 0; \
	passed=$$(($$1 - $$2)); failed=$$2; \
	if [ $$rc -ne 0 ] && [ $$failed -eq 0 ]; then failed=1; fi; \
	echo "$$passed $$failed $(2)" >> $(TALLY); \
	exit $$rc
endef

check: deps-check
	@rm -f $(TALLY)
	@rc=0; \
	for step in check-normal check-asan check-tsan check-valgrind check-fuzz \
	            check-clang check-musl; do \
	  $(MAKE) --no-print-directory $$step || rc=1; \
	done; \
	$(MAKE) --no-print-directory check-summary || rc=1; \
	exit $$rc

NORMAL_CMAKE := -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCANCEL_WERROR=ON
ASAN_CMAKE := -DCMAKE_BUILD_TYPE=Debug -DCANCEL_SANITIZE=address
TSAN_CMAKE := -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCANCEL_SANITIZE=thread
SLOW_ENV = CANCEL_TEST_TIME_SCALE=$(SLOW_SCALE)

check-normal:
	$(call check_build,build,normal,$(NORMAL_CMAKE),CANCEL_TEST_TIME_SCALE=$(NORMAL_SCALE))

check-asan:
	$(call check_build,build-asan,asan,$(ASAN_CMAKE),$(SLOW_ENV))

check-tsan:
	$(call check_build,build-tsan,tsan,$(TSAN_CMAKE),$(SLOW_ENV) $(TSAN_LAUNCHER))

# The core (no adapter, no host: their libraries are glibc's) built with
# clang, warnings as errors, and its unit tests (include/cancel.h:
# Platform says what each compiler and C library gets).
CORE_CMAKE := -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCANCEL_WERROR=ON \
	-DCANCEL_WITH_SQLITE=OFF -DCANCEL_WITH_CURL=OFF -DCANCEL_WITH_PQ=OFF \
	-DCANCEL_WITH_HTTP=OFF -DCANCEL_WITH_HOST=OFF
CLANG_CMAKE := -DCMAKE_C_COMPILER=clang $(CORE_CMAKE)

check-clang: CTEST_FLAGS += -L unit
check-clang:
	$(call check_build,build-clang,clang,$(CLANG_CMAKE),CANCEL_TEST_TIME_SCALE=$(NORMAL_SCALE))

# The same with musl (musl-gcc, Debian musl-tools): no pkg-config, whose
# libraries are glibc's, and so the tests on tests/harness/cmocka.h, not
# libcmocka.  musl-gcc searches no glibc header; the kernel's (linux/,
# asm/, asm-generic/) come from a directory of links to linux-libc-dev's,
# as a musl distribution's kernel-headers package would install them.
MUSL_KERNEL_INCLUDE := build-musl/kernel-include
MUSL_CMAKE := -DCMAKE_C_COMPILER=musl-gcc $(CORE_CMAKE) \
	-DCMAKE_DISABLE_FIND_PACKAGE_PkgConfig=ON -DCANCEL_TESTS_WITHOUT_CMOCKA=ON \
	"-DCMAKE_C_FLAGS=-idirafter $(CURDIR)/$(MUSL_KERNEL_INCLUDE)"

musl-kernel-include:
	@mkdir -p $(MUSL_KERNEL_INCLUDE)
	@ln -sfn /usr/include/linux $(MUSL_KERNEL_INCLUDE)/linux
	@ln -sfn /usr/include/asm-generic $(MUSL_KERNEL_INCLUDE)/asm-generic
	@ln -sfn /usr/include/$$(gcc -print-multiarch)/asm $(MUSL_KERNEL_INCLUDE)/asm

check-musl: CTEST_FLAGS += -L 'unit|example'
check-musl: musl-kernel-include
	$(call check_build,build-musl,musl,$(MUSL_CMAKE),CANCEL_TEST_TIME_SCALE=$(NORMAL_SCALE))

# Every test and example program of the normal build under valgrind,
# except those named in VALGRIND_SKIP, JOBS at a time.
check-valgrind:
	@mkdir -p $(dir $(TALLY))
	@echo "== valgrind: programs of build/ (skipping: $(VALGRIND_SKIP))"
	@if ! $(CMAKE) --build build -j$(JOBS) >/dev/null 2>&1; then \
	  echo "0 1 valgrind (build failed)" >> $(TALLY); exit 1; \
	fi
	@srcs=; \
	for src in tests/*_test.c examples/patterns/*.c docs/examples/*.c; do \
	  [ -e "$$src" ] || continue; \
	  case " $(VALGRIND_SKIP) " in *" $$(basename "$$src" .c) "*) continue ;; esac; \
	  srcs="$$srcs $$src"; \
	done; \
	VALGRIND="$(VALGRIND)" VALGRIND_ALONE="$(VALGRIND_ALONE)" \
	  CANCEL_TEST_TIME_SCALE=$(VALGRIND_SCALE) \
	  sh tests/valgrind/run.sh build $(JOBS) $(VALGRIND_TIMEOUT) $$srcs \
	  > build/valgrind.txt; rc=$$?; \
	sed '$$d' build/valgrind.txt; \
	set -- $$(tail -n 1 build/valgrind.txt) 0 1; \
	echo "$$1 $$2 valgrind" >> $(TALLY); \
	[ $$rc -eq 0 ] && [ $$2 -eq 0 ]

# ----------------------------------------------------------------------
# Fuzzing: clang's libFuzzer, every object instrumented and under
# ASan+UBSan (build-fuzz/).  make check runs each harness for
# CHECK_FUZZ_SECONDS on its committed corpus; make fuzz for FUZZ_SECONDS.
# ----------------------------------------------------------------------

FUZZ_SECONDS ?= 300
CHECK_FUZZ_SECONDS ?= 25
FUZZ_CMAKE := -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCANCEL_FUZZ=ON \
	-DCANCEL_BUILD_TESTS=OFF -DCANCEL_BUILD_EXAMPLES=OFF

fuzz-build:
	CC=clang $(CMAKE) -S . -B build-fuzz $(FUZZ_CMAKE)
	$(CMAKE) --build build-fuzz -j$(JOBS)

fuzz: deps-check fuzz-build
	tests/fuzz/run.sh build-fuzz $(FUZZ_SECONDS)

check-fuzz:
	@mkdir -p $(dir $(TALLY))
	@echo "== fuzz: each harness for $(CHECK_FUZZ_SECONDS) s"
	@if ! $(MAKE) --no-print-directory fuzz-build >/dev/null 2>&1; then \
	  echo "0 1 fuzz (build failed)" >> $(TALLY); exit 1; \
	fi
	@rc=0; out=$$(tests/fuzz/run.sh build-fuzz $(CHECK_FUZZ_SECONDS)) || rc=$$?; \
	echo "$$out"; \
	set -- $$(echo "$$out" | sed -n 's/^\([0-9]*\) passed, \([0-9]*\) failed$$/\1 \2/p') 0 1; \
	echo "$$1 $$2 fuzz" >> $(TALLY); \
	exit $$rc

# Fault injection: tests/faults/sweep.c, in the ASan build, every fault
# point of every scenario (make check's fault_sample test takes at most 40
# of each).
faults: deps-check
	$(CMAKE) -S . -B build-asan $(ASAN_CMAKE)
	$(CMAKE) --build build-asan -j$(JOBS) --target fault_sweep
	$(SLOW_ENV) build-asan/tests/fault_sweep

check-summary:
	@echo "== summary"
	@awk '{ p = $$1; f = $$2; sub(/^[0-9]+ [0-9]+ /, ""); \
	        printf "  %-24s %d passed, %d failed\n", $$0 ":", p, f }' $(TALLY)
	@awk '{ p += $$1; f += $$2 } END { printf "%d passed, %d failed\n", p, f; exit (f > 0) }' $(TALLY)

# ----------------------------------------------------------------------
# Fault injection: the test programs under random allocation failures
# (libfiu); a test that fails must fail cleanly, never crash or hang.
# ----------------------------------------------------------------------

faults-tests: deps-check build
	tests/faults/fiu_tests.sh build 3

# ----------------------------------------------------------------------
# Bench and demo
# ----------------------------------------------------------------------

bench: deps-check deps-bench
	$(CMAKE) -S . -B build-bench -DCMAKE_BUILD_TYPE=Release \
	  -DCANCEL_BUILD_BENCH=ON -DCANCEL_BUILD_TESTS=OFF
	$(CMAKE) --build build-bench -j$(JOBS)
	@test -x bench/run.sh || { echo "bench/run.sh does not exist yet" >&2; exit 1; }
	bench/run.sh build-bench

# The pattern programs, one after the other (a few seconds), then the
# reference service: examples/reportd/demo.sh starts reportd and its
# downstream on free ports and plays its scenarios with real clients,
# ending with a summary table; it fails when a scenario misbehaves.
demo: deps-check build
	@for src in examples/patterns/*.c; do \
	  [ -e "$$src" ] || continue; \
	  name=$$(basename "$$src" .c); \
	  exe=build/examples/patterns/$$name; \
	  if [ ! -x "$$exe" ]; then echo "=== $$name: not built (see cmake's STATUS lines)"; echo; continue; fi; \
	  echo "=== $$name"; \
	  $$exe; \
	  echo; \
	done
	@if [ ! -x build/examples/reportd/reportd ]; then \
	  echo "=== reportd: not built (see cmake's STATUS lines)"; exit 1; \
	fi
	bash examples/reportd/demo.sh build

# ----------------------------------------------------------------------
# Debian packages (cmake/packaging.cmake): built in build-package/ with
# the prefix /usr, so that the libraries go to Debian's multiarch libdir,
# every adapter required (a package build must not lose one silently),
# then checked by tests/package/run.sh (make check's package_test does the
# same with the normal build).
# ----------------------------------------------------------------------

PACKAGE_CMAKE := -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_INSTALL_PREFIX=/usr \
	-DCANCEL_BUILD_TESTS=OFF -DCANCEL_BUILD_EXAMPLES=OFF \
	-DCANCEL_WITH_SQLITE=ON -DCANCEL_WITH_CURL=ON -DCANCEL_WITH_PQ=ON \
	-DCANCEL_WITH_HTTP=ON -DCANCEL_WITH_HOST=ON

package: deps-check
	$(CMAKE) -S . -B build-package $(PACKAGE_CMAKE)
	$(CMAKE) --build build-package -j$(JOBS)
	rm -rf build-package/packages
	cd build-package && cpack -G DEB
	CANCEL_PACKAGE_DIR=build-package/packages sh tests/package/run.sh build-package $(CMAKE)
	@ls -l build-package/packages/*.deb

# ----------------------------------------------------------------------
# Housekeeping
# ----------------------------------------------------------------------

format: deps-format
	find include src tests examples -name '*.[ch]' -print0 | xargs -0 -r clang-format -i
	find bench -maxdepth 1 -name '*.c' -print0 | xargs -0 -r clang-format -i

clean:
	rm -rf build build-asan build-tsan build-bench build-check build-fuzz build-package \
	  build-clang build-musl
