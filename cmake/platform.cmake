# The platform the core needs (include/cancel.h, section "Platform"):
# Linux, its kernel headers, and a C library with POSIX threads (glibc or
# musl).  What is required fails configure here, with what to install; what
# has a fallback is detected and the fallback is named in the summary.
include(CheckIncludeFile)
include(CheckSymbolExists)

if(NOT CMAKE_SYSTEM_NAME STREQUAL "Linux")
  message(FATAL_ERROR "libcancel runs on Linux only (futex, epoll, eventfd, "
                      "timerfd, signalfd), not on ${CMAKE_SYSTEM_NAME}")
endif()

set(CMAKE_REQUIRED_DEFINITIONS -D_GNU_SOURCE)
set(CMAKE_REQUIRED_FLAGS -pthread)

# Headers of the kernel (linux/*.h, Debian: linux-libc-dev) and of the C
# library's Linux interfaces.  musl-gcc does not look in /usr/include:
# point it at the kernel headers with CFLAGS (make check-musl does).
foreach(_h linux/futex.h linux/membarrier.h sys/epoll.h sys/eventfd.h
           sys/timerfd.h sys/signalfd.h sys/syscall.h)
  string(MAKE_C_IDENTIFIER "CANCEL_HAVE_${_h}" _var)
  check_include_file(${_h} ${_var})
  if(NOT ${_var})
    if(_h MATCHES "^linux/")
      set(_how "the kernel headers are missing (Debian: linux-libc-dev; "
               "with musl-gcc, add their directory with -idirafter, as "
               "make check-musl does)")
    else()
      set(_how "the C library lacks it")
    endif()
    message(FATAL_ERROR "libcancel needs <${_h}>: ${_how}")
  endif()
endforeach()

# Functions the core cannot do without.
foreach(_pair "epoll_create1;sys/epoll.h" "eventfd;sys/eventfd.h"
              "timerfd_create;sys/timerfd.h" "signalfd;sys/signalfd.h"
              "accept4;sys/socket.h" "ppoll;poll.h" "dup3;unistd.h"
              "waitid;sys/wait.h" "posix_spawnp;spawn.h"
              "SYS_futex;sys/syscall.h" "SYS_membarrier;sys/syscall.h"
              "SYS_preadv2;sys/syscall.h" "SYS_pidfd_open;sys/syscall.h")
  list(GET _pair 0 _sym)
  list(GET _pair 1 _hdr)
  string(MAKE_C_IDENTIFIER "CANCEL_HAVE_${_sym}" _var)
  check_symbol_exists(${_sym} ${_hdr} ${_var})
  if(NOT ${_var})
    message(FATAL_ERROR "libcancel needs ${_sym} (<${_hdr}>), which this C "
                        "library or its kernel headers lack")
  endif()
endforeach()

# Functions with a fallback: CANCEL_HAVE_<NAME> is defined for the sources
# when found.  cancel.h's "Platform" section says what each fallback does.
set(_cancel_platform_defs "")
set(_cancel_platform_missing "")
foreach(_pair "pthread_cond_clockwait;pthread.h" "strerrordesc_np;string.h"
              "strerrorname_np;string.h" "backtrace;execinfo.h"
              "preadv2;sys/uio.h")
  list(GET _pair 0 _sym)
  list(GET _pair 1 _hdr)
  string(TOUPPER "${_sym}" _up)
  check_symbol_exists(${_sym} ${_hdr} CANCEL_HAVE_${_up})
  if(CANCEL_HAVE_${_up})
    list(APPEND _cancel_platform_defs CANCEL_HAVE_${_up})
  else()
    list(APPEND _cancel_platform_missing ${_sym})
  endif()
endforeach()
unset(CMAKE_REQUIRED_DEFINITIONS)
unset(CMAKE_REQUIRED_FLAGS)
