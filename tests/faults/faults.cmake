# The fault-injection sweep (tests/faults/sweep.c): the core's static
# library linked with --wrap for every function the sweep can fail.
set(_cancel_fault_fns malloc calloc realloc strdup eventfd epoll_create1
    epoll_ctl timerfd_create timerfd_settime signalfd pthread_create
    pthread_key_create fcntl posix_spawn posix_spawnp)
add_executable(fault_sweep "${CMAKE_CURRENT_LIST_DIR}/sweep.c")
target_link_libraries(fault_sweep PRIVATE cancel_static)
foreach(_fn ${_cancel_fault_fns})
  target_link_options(fault_sweep PRIVATE "LINKER:--wrap=${_fn}")
endforeach()
set_target_properties(fault_sweep PROPERTIES
  RUNTIME_OUTPUT_DIRECTORY "${PROJECT_BINARY_DIR}/tests")
# make check runs a sample of every scenario's fault points (at most 40
# each); make faults runs them all (build-asan/tests/fault_sweep).
add_test(NAME fault_sample COMMAND fault_sweep --sample 40)
set_tests_properties(fault_sample PROPERTIES TIMEOUT 600 LABELS faults)
