// Tile kernels call single-threaded GEMMs from inside their own parallel regions. MKL does not
// notice the region: left alone it starts its own threads in every call, and 2 threads × 2 MKL
// threads thrash a 2-core machine (measured: clip_loss at N = 4096 took 8.5 s instead of 0.65 s
// with another process on one core). A guard per worker thread makes MKL single-threaded there.
// The symbol (MKL's C interface; the lower-case one is Fortran's, by pointer) is weak: builds of
// torch without MKL lack it.
#pragma once

#if defined(__GNUC__) && !defined(_WIN32)
extern "C" __attribute__((weak)) int MKL_Set_Num_Threads_Local(int);
#define MMFAST_HAS_MKL_LOCAL_THREADS 1
#endif

namespace mmfast {

class SingleThreadedBlas {
 public:
  SingleThreadedBlas() {
#ifdef MMFAST_HAS_MKL_LOCAL_THREADS
    if (MKL_Set_Num_Threads_Local) previous_ = MKL_Set_Num_Threads_Local(1);
#endif
  }
  ~SingleThreadedBlas() {
#ifdef MMFAST_HAS_MKL_LOCAL_THREADS
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous_);  // 0: back to the global setting
#endif
  }
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace mmfast
