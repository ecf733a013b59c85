// What a worker thread of the tile kernels' parallel regions needs before it calls ATen ops.
//
// The tile kernels call single-threaded GEMMs from inside their own parallel regions. MKL does not
// notice the region: left alone it starts its own threads in every call, and 2 threads × 2 MKL
// threads thrash a 2-core machine (measured: clip_loss at N = 4096 took 8.5 s instead of 0.65 s
// with another process on one core). The guard makes MKL single-threaded in this thread. The
// symbol (MKL's C interface; the lower-case one is Fortran's, by pointer) is weak: builds of torch
// without MKL lack it. The guard also installs the calling thread's thread-local state (the
// dispatch keys below autograd, grad mode), which OpenMP workers do not inherit: without it an
// ATen op on a tensor that requires grad goes through autograd again from a worker.
#pragma once

#include <ATen/ThreadLocalState.h>

#if defined(__GNUC__) && !defined(_WIN32)
extern "C" __attribute__((weak)) int MKL_Set_Num_Threads_Local(int);
#define MMFAST_HAS_MKL_LOCAL_THREADS 1
#endif

namespace mmfast {

class WorkerGuard {
 public:
  explicit WorkerGuard(const at::ThreadLocalState& caller) : state_(caller) {
#ifdef MMFAST_HAS_MKL_LOCAL_THREADS
    if (MKL_Set_Num_Threads_Local) previous_ = MKL_Set_Num_Threads_Local(1);
#endif
  }
  ~WorkerGuard() {
#ifdef MMFAST_HAS_MKL_LOCAL_THREADS
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous_);  // 0: back to the global setting
#endif
  }
  WorkerGuard(const WorkerGuard&) = delete;
  WorkerGuard& operator=(const WorkerGuard&) = delete;

 private:
  at::ThreadLocalStateGuard state_;
  int previous_ = 0;
};

}  // namespace mmfast
