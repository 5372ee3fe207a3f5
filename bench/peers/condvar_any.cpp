// condvar_any.cpp: the C++ side of wait_bench's wake_latency_cond, linked
// into wait_bench so that its samples interleave, one by one, with
// libcancel's and the futex floor's in the same process (a separate
// program would run at another moment of this shared machine).  A thread
// blocks in std::condition_variable_any::wait(lock, stop_token, pred) with
// a predicate that is never true; std::stop_source::request_stop() ends it.
#include <condition_variable>
#include <mutex>
#include <stop_token>

struct cpp_stop {
  std::mutex m;
  std::condition_variable_any cv;
  std::stop_source src;
};

extern "C" {

cpp_stop *cpp_stop_new(void) { return new cpp_stop; }

void cpp_stop_free(cpp_stop *s) { delete s; }

// Blocks until s is stopped; returns 1 if the wait ended by the stop.
int cpp_stop_wait(cpp_stop *s, void (*before_block)(void *), void *arg) {
  std::unique_lock lk(s->m);
  before_block(arg);
  bool pred = s->cv.wait(lk, s->src.get_token(), [] { return false; });
  return pred ? 0 : 1;
}

void cpp_stop_request(cpp_stop *s) { s->src.request_stop(); }

} // extern "C"
