// Tile GEMM building blocks shared by every kernel family (sm_80 and later): shared-memory tile
// loads (cp.async) and a warp's fragment-level product on tensor cores.
//
// Fragments. A warp's accumulator is MI × NI tiles of 16 × 8 (mma.sync's m16n8 C layout), fp32:
// lane = threadIdx.x % 32, g = lane / 4, t = lane % 4, and acc[mi][ni][e] holds element
//     row frag_row(mi, e) = 16·mi + g + 8·(e / 2),   column frag_col(ni, e) = 8·ni + 2·t + e % 2.
// Every precision (bf16/fp16 on tensor cores, TF32, exact fp32 FMAs) fills this same layout, so a
// kernel's epilogue (online softmax statistics, the gradient G, top-k candidates) is written once.
#pragma once

#include "common.cuh"

namespace mmfast {

__device__ __forceinline__ int lane_id() { return threadIdx.x & 31; }
__device__ __forceinline__ int frag_row(int mi, int e) { return 16 * mi + (lane_id() >> 2) + 8 * (e >> 1); }
__device__ __forceinline__ int frag_col(int ni, int e) { return 8 * ni + 2 * (lane_id() & 3) + (e & 1); }

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// acc = 0, every fragment element.
template <int MI, int NI>
__device__ __forceinline__ void zero(float (&acc)[MI][NI][4]) {
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;
}

// ---- global → shared --------------------------------------------------------------------------------

// 16 bytes global → shared, asynchronously (no registers on the way); the bytes past `valid` (0…16)
// are zero-filled and not read. Completion: cp_async_commit() closes a group, cp_async_wait<N>()
// waits until at most N groups are in flight (then __syncthreads() before other threads read).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(valid));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");  // no shared-memory read moves above it
}

// Whether a row-major matrix can be loaded in 16-byte chunks: its base and row pitch 16-byte aligned.
template <typename T>
__host__ __device__ __forceinline__ bool vec16_ok(const T* base, int64_t ld) {
  return (reinterpret_cast<uintptr_t>(base) % 16 == 0) && ((ld * static_cast<int64_t>(sizeof(T))) % 16 == 0);
}

// Copies a ROWS × COLS tile of a row-major matrix g (its first element at g, ld elements per row) into
// shared memory s (row r at s + r·lds), zero past `rows` × `cols` (the matrix's edge). VEC: 16-byte
// cp.async chunks (vec16_ok(g, ld) must hold; the caller commits and waits); else element loads and
// stores. Every one of the block's THREADS threads calls it; the caller synchronises.
template <typename T, int ROWS, int COLS, int THREADS, bool VEC>
__device__ __forceinline__ void load_tile(T* s, int lds, const T* g, int64_t ld, int rows, int cols) {
  if constexpr (VEC) {
    constexpr int kPer = 16 / static_cast<int>(sizeof(T));
    static_assert(COLS % kPer == 0, "a tile row must be whole 16-byte chunks");
    constexpr int kRowChunks = COLS / kPer;
    for (int c = threadIdx.x; c < ROWS * kRowChunks; c += THREADS) {
      const int r = c / kRowChunks, k = (c % kRowChunks) * kPer;
      const int left = r < rows ? max(0, min(kPer, cols - k)) : 0;
      const T* src = left > 0 ? g + r * ld + k : g;  // a chunk with nothing to read reads nothing
      cp_async_16(s + r * lds + k, src, left * static_cast<int>(sizeof(T)));
    }
  } else {
    for (int e = threadIdx.x; e < ROWS * COLS; e += THREADS) {
      const int r = e / COLS, k = e % COLS;
      s[r * lds + k] = (r < rows && k < cols) ? g[r * ld + k] : from_float<T>(0.f);
    }
  }
}

// ---- shared → registers → tensor cores ----------------------------------------------------------------

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans) {
  if (trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(row)));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(row)));
  }
}

__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* row, bool trans) {
  if (trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(smem_u32(row)));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(smem_u32(row)));
  }
}

// d += a·b for one m16n8k16 tile, fp32 accumulation.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
               "{%0, %1, %2, %3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
               "{%0, %1, %2, %3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
}

// d += a·b for one m16n8k8 TF32 tile (a: (g, t), (g+8, t), (g, t+4), (g+8, t+4); b: (k=t, n=g), (k=t+4, n=g)).
__device__ __forceinline__ void mma_1688_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
               "{%0, %1, %2, %3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// An operand in shared memory, by layout: K_MAJOR: element (row, k) at p[row·ld + k]; else at p[k·ld + row].
template <typename T, bool K_MAJOR>
__device__ __forceinline__ const T* at(const T* p, int ld, int row, int k) {
  return K_MAJOR ? p + row * ld + k : p + k * ld + row;
}

// acc += A·Bᵀ over k ∈ [0, K) for the warp's 16·MI × 8·NI tile; A(m, k) and B(n, k) are read from shared
// memory at a and b in the layouts A_K_MAJOR / B_K_MAJOR (see `at`). K is a multiple of 16.
//   bf16/fp16: mma.sync m16n8k16, operands by ldmatrix (.trans for a layout that is not k-major), so
//     every row an ldmatrix reads must be 16-byte aligned: a, b 16-byte aligned, lda, ldb multiples of 8.
//   fp32 with TF32: mma.sync m16n8k8 on operands rounded to TF32 (cvt.rna), as cuBLAS's TF32 mode.
//   fp32 exact: FMAs in fp32 (a 2·MI × 2·NI register outer product per k), the same fragment layout.
template <typename T, int MI, int NI, bool A_K_MAJOR, bool B_K_MAJOR, bool TF32>
__device__ __forceinline__ void warp_mma(float (&acc)[MI][NI][4], const T* a, int lda, const T* b, int ldb, int K) {
  const int lane = lane_id(), g = lane >> 2, t = lane & 3;
  if constexpr (sizeof(T) == 2) {
    for (int k0 = 0; k0 < K; k0 += 16) {
      uint32_t af[MI][4], bf[NI][2];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
        // ldmatrix.x4 reads four 8 × 8 blocks (m 0-7 | 8-15) × (k 0-7 | 8-15) in the order a0a1, a2a3,
        // a4a5, a6a7 want; lane l names a row of block l / 8.
        const int blk = lane >> 3, r = lane & 7;
        const int m = A_K_MAJOR ? 16 * mi + (lane & 15) : 16 * mi + (blk & 1) * 8;
        const int k = A_K_MAJOR ? k0 + (lane >> 4) * 8 : k0 + (blk >> 1) * 8 + r;
        ldmatrix_x4(af[mi], at<T, true>(a, lda, A_K_MAJOR ? m : k, A_K_MAJOR ? k : m), !A_K_MAJOR);
      }
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
        // ldmatrix.x2: blocks (n 0-7) × (k 0-7 | 8-15), lanes 0-15 name their rows.
        const int n = B_K_MAJOR ? 8 * ni + (lane & 7) : 8 * ni;
        const int k = B_K_MAJOR ? k0 + ((lane >> 3) & 1) * 8 : k0 + (lane & 15);
        ldmatrix_x2(bf[ni], at<T, true>(b, ldb, B_K_MAJOR ? n : k, B_K_MAJOR ? k : n), !B_K_MAJOR);
      }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) mma_16816<T>(acc[mi][ni], af[mi], bf[ni]);
    }
  } else if constexpr (TF32) {
    for (int k0 = 0; k0 < K; k0 += 8) {
      uint32_t af[MI][4], bf[NI][2];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          af[mi][e] = to_tf32(*at<T, A_K_MAJOR>(a, lda, 16 * mi + g + 8 * (e & 1), k0 + t + 4 * (e >> 1)));
#pragma unroll
      for (int ni = 0; ni < NI; ++ni)
#pragma unroll
        for (int e = 0; e < 2; ++e) bf[ni][e] = to_tf32(*at<T, B_K_MAJOR>(b, ldb, 8 * ni + g, k0 + t + 4 * e));
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) mma_1688_tf32(acc[mi][ni], af[mi], bf[ni]);
    }
  } else {
    for (int k = 0; k < K; ++k) {
      float av[MI][2], bv[NI][2];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) av[mi][h] = *at<T, A_K_MAJOR>(a, lda, 16 * mi + g + 8 * h, k);
#pragma unroll
      for (int ni = 0; ni < NI; ++ni)
#pragma unroll
        for (int h = 0; h < 2; ++h) bv[ni][h] = *at<T, B_K_MAJOR>(b, ldb, 8 * ni + 2 * t + h, k);
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[mi][ni][e] = fmaf(av[mi][e >> 1], bv[ni][e & 1], acc[mi][ni][e]);
    }
  }
}

}  // namespace mmfast
