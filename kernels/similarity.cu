// The similarity family's CUDA kernels (mmfast/similarity/cuda_kernels.py calls the launchers).
//
//   similarity:      S = acc·r_i·c_j (N, M) in the output dtype, acc = A·Bᵀ from a tile GEMM, r_i = s/‖a_i‖
//                    (or s), c_j = 1/‖b_j‖ (or 1): the factors come from Python, O(N + M).
//   topk_similarity: per query row, the k best (score, column) of S over a column segment, as int64 rank
//                    keys (order.py: ordered_key(score)·2^32 + 2^32 − 1 − column), sorted best first; the
//                    segments' lists are merged in Python by one torch.topk over the rank keys.
//
// Both read a: (N, D) and b: (M, D) row-major and compute the tile product with warp_mma (mma.cuh):
// bf16/fp16 on tensor cores, fp32 as TF32 or exact fp32 by the caller's flag, fp32 accumulation.
// Scores are (acc·r_i)·c_j in that order, as the Triton kernels form them. Neither kernel uses atomics:
// every output element is written by one block in a fixed order, so results repeat bit for bit and
// torch's deterministic mode needs no other path.
#include <type_traits>

#include "common.cuh"
#include "mma.cuh"
#include "numerics.cuh"

namespace mmfast {
namespace {

// ---- the tile GEMM both kernels share ---------------------------------------------------------------

// Shared-memory staging of one k-step for a BM × BN block tile: BM rows of A, then BN rows of B, each a
// BK-wide slice of the D features, LD elements apart, double buffered.
template <typename T, int BM, int BN>
struct Staging {
  // 64 bytes of each feature row per k-step: 32 bf16/fp16 (two m16n8k16 steps) or 16 fp32 (two TF32
  // m16n8k8 steps), four 16-byte cp.async chunks per row.
  static constexpr int BK = 64 / static_cast<int>(sizeof(T));
  // +16 bytes per row: the 8 rows one ldmatrix (or one fragment load) reads start in different banks.
  static constexpr int LD = BK + 16 / static_cast<int>(sizeof(T));
  static constexpr int STAGE = (BM + BN) * LD;
  static constexpr int BYTES = 2 * STAGE * static_cast<int>(sizeof(T));
};

// acc = A·Bᵀ over the d features for this warp's 16·MI × 8·NI part of a BM × BN block tile (the warps
// laid out (BM / 16·MI) × WARPS_N): a is the tile's first row of A, b its first row of B (d elements
// per row); rows past `rows` / `cols` read as 0. The next k-step's loads (cp.async when VEC) overlap
// this one's MMAs. Every thread of the block calls it; when d > 0 it ends with a barrier, so the caller
// may reuse `stage` afterwards (d = 0 touches no shared memory: acc is 0).
template <typename T, int BM, int BN, int WARPS_N, int MI, int NI, bool VEC, bool TF32>
__device__ __forceinline__ void tile_product(float (&acc)[MI][NI][4], T* stage, const T* a, int rows, const T* b,
                                             int cols, int64_t d) {
  using S = Staging<T, BM, BN>;
  constexpr int kThreads = BM / (16 * MI) * WARPS_N * 32;
  zero(acc);
  const int warp = threadIdx.x >> 5, wm = warp / WARPS_N, wn = warp % WARPS_N;
  const int steps = static_cast<int>(cdiv(d, S::BK));
  auto load = [&](int step) {
    T* s = stage + (step & 1) * S::STAGE;
    const int64_t k0 = static_cast<int64_t>(step) * S::BK;
    const int width = static_cast<int>(min(static_cast<int64_t>(S::BK), d - k0));
    load_tile<T, BM, S::BK, kThreads, VEC>(s, S::LD, a + k0, d, rows, width);
    load_tile<T, BN, S::BK, kThreads, VEC>(s + BM * S::LD, S::LD, b + k0, d, cols, width);
    cp_async_commit();
  };
  if (steps > 0) load(0);
  for (int step = 0; step < steps; ++step) {
    if (step + 1 < steps) {
      load(step + 1);  // into the other buffer, whose last reader passed the previous step's barrier
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* s = stage + (step & 1) * S::STAGE;
    warp_mma<T, MI, NI, true, true, TF32>(acc, s + wm * 16 * MI * S::LD, S::LD, s + (BM + wn * 8 * NI) * S::LD,
                                          S::LD, S::BK);
    __syncthreads();
  }
}

// The column factors of a warp's fragment columns: cs[ni][e] = col_scale[c_base + frag_col(ni, e)], 0 past
// the tile's `cols` columns (col_scale: the tile's first column's factor).
template <int NI>
__device__ __forceinline__ void column_factors(float (&cs)[NI][2], const float* col_scale, int c_base, int cols) {
#pragma unroll
  for (int ni = 0; ni < NI; ++ni)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int c = c_base + frag_col(ni, e);
      cs[ni][e] = c < cols ? col_scale[c] : 0.f;
    }
}

// Calls launch(VEC, TF32) with the flags as std::bool_constant: 16-byte cp.async loads or element loads;
// TF32 or exact fp32 for fp32 inputs (bf16/fp16 always run on tensor cores, so they get TF32 = false only).
template <typename T, typename F>
void with_variant(bool vec, bool tf32, F&& launch) {
  auto with_tf32 = [&](auto v) {
    if constexpr (sizeof(T) == 4) {
      if (tf32) return launch(v, std::true_type{});
    }
    launch(v, std::false_type{});
  };
  if (vec) {
    with_tf32(std::true_type{});
  } else {
    with_tf32(std::false_type{});
  }
}

// ---- similarity -------------------------------------------------------------------------------------

namespace sim {
// 128 × 128 tiles, 8 warps as 2 × 4, each a 64 × 32 part (MI = 4, NI = 4: 8 ldmatrix per 16 MMAs, 64
// fp32 accumulators per thread). Staging is 2 × 256 rows × 80 bytes = 40 KB, static shared memory.
constexpr int BM = 128, BN = 128, WARPS_N = 4, MI = 4, NI = 4;
constexpr int THREADS = BM / (16 * MI) * WARPS_N * 32;
}  // namespace sim

template <typename O>
struct Pair;
template <>
struct Pair<float> {
  static __device__ __forceinline__ float2 make(float x, float y) { return make_float2(x, y); }
};
template <>
struct Pair<__half> {
  static __device__ __forceinline__ __half2 make(float x, float y) { return __floats2half2_rn(x, y); }
};
template <>
struct Pair<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat162 make(float x, float y) { return __floats2bfloat162_rn(x, y); }
};

// Stores x at p[0] and, if `second`, y at p[1]: one two-element store when `pair` says p may hold one
// (an even column of an output with an even row length and an aligned base).
template <typename O>
__device__ __forceinline__ void store_two(O* p, float x, float y, bool second, bool pair) {
  if (pair && second) {
    *reinterpret_cast<decltype(Pair<O>::make(x, y))*>(p) = Pair<O>::make(x, y);
  } else {
    p[0] = from_float<O>(x);
    if (second) p[1] = from_float<O>(y);
  }
}

// One block per 128 × 128 tile of out: (N, M), tiles in row-block-major order (a row block's A tile
// stays in L2 while its column tiles pass). a: (N, D), b: (M, D), row_scale: (N,), col_scale: (M,) fp32.
template <typename T, typename O, bool VEC, bool TF32>
__global__ void __launch_bounds__(sim::THREADS, 2)  // ≤ 128 registers: two blocks per SM
    similarity_kernel(const T* __restrict__ a, const T* __restrict__ b, const float* __restrict__ row_scale,
                      const float* __restrict__ col_scale, O* __restrict__ out, int64_t n, int64_t m, int64_t d,
                      int64_t col_blocks, bool pair) {
  using namespace sim;
  __shared__ __align__(16) unsigned char smem[Staging<T, BM, BN>::BYTES];
  const int64_t tile = blockIdx.x;
  const int64_t row0 = tile / col_blocks * BM, col0 = tile % col_blocks * BN;
  const int rows = static_cast<int>(min(static_cast<int64_t>(BM), n - row0));
  const int cols = static_cast<int>(min(static_cast<int64_t>(BN), m - col0));
  float acc[MI][NI][4];
  tile_product<T, BM, BN, WARPS_N, MI, NI, VEC, TF32>(acc, reinterpret_cast<T*>(smem), a + row0 * d, rows,
                                                      b + col0 * d, cols, d);

  const int warp = threadIdx.x >> 5, r_base = warp / WARPS_N * 16 * MI, c_base = warp % WARPS_N * 8 * NI;
  float cs[NI][2];
  column_factors<NI>(cs, col_scale + col0, c_base, cols);
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = r_base + frag_row(mi, 2 * h);
      if (r >= rows) continue;
      const float rs = row_scale[row0 + r];
      O* dst = out + (row0 + r) * m + col0;  // int64: N·M passes 2^31
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
        const int c = c_base + frag_col(ni, 0);  // even; c + 1 is the pair's second column
        if (c >= cols) continue;
        store_two(dst + c, acc[mi][ni][2 * h] * rs * cs[ni][0], acc[mi][ni][2 * h + 1] * rs * cs[ni][1],
                  c + 1 < cols, pair);
      }
    }
}

template <typename T, typename O>
void launch_similarity(cudaStream_t stream, const void* a, const void* b, const float* row_scale,
                       const float* col_scale, void* out, int64_t n, int64_t m, int64_t d, int64_t tiles, bool tf32) {
  const T* ta = static_cast<const T*>(a);
  const T* tb = static_cast<const T*>(b);
  O* to = static_cast<O*>(out);
  const bool vec = vec16_ok(ta, d) && vec16_ok(tb, d);
  const bool pair = m % 2 == 0 && reinterpret_cast<uintptr_t>(out) % (2 * sizeof(O)) == 0;
  with_variant<T>(vec, tf32, [&](auto v, auto f) {
    similarity_kernel<T, O, decltype(v)::value, decltype(f)::value>
        <<<static_cast<unsigned>(tiles), sim::THREADS, 0, stream>>>(ta, tb, row_scale, col_scale, to, n, m, d,
                                                                   cdiv(m, sim::BN), pair);
  });
}

// ---- streaming top-k ----------------------------------------------------------------------------------

namespace topk {
// 64-row blocks walk their column segment in 128-column tiles; 4 warps as 2 × 2, each a 32 × 64 part
// (MI = 2, NI = 8). 64 rows keep the per-row lists (64·k·8 bytes, ≤ 32 KB) and the key tile (34 KB,
// aliasing the 30 KB staging) at ≤ 67 KB: three blocks per H100 SM, two per A100 SM.
constexpr int BM = 64, BN = 128, WARPS_N = 2, MI = 2, NI = 8;
constexpr int WARPS = BM / (16 * MI) * WARPS_N;
constexpr int THREADS = WARPS * 32;
// Key tile pitch: the int2 stores from the fragments (8 rows × 4 column pairs per instruction) then
// touch each bank at most twice, the minimum for 256 bytes.
constexpr int LDK = BN + 8;
// Two list slots per lane in the merge (the Triton backend's limit too).
constexpr int K_MAX = 64;
constexpr int kSlots = K_MAX / 32;
// Below every real key (−inf's is −2139095041): an empty list slot or an entry past the tile's edge.
constexpr int32_t kEmpty = INT32_MIN;

template <typename T>
constexpr int kUnionBytes = Staging<T, BM, BN>::BYTES > BM * LDK * 4 ? Staging<T, BM, BN>::BYTES : BM * LDK * 4;

// Dynamic shared memory: staging ∪ key tile, then the lists' keys and columns (BM × k each), then
// pending (BM).
template <typename T>
size_t smem_bytes(int k) {
  return static_cast<size_t>(kUnionBytes<T>) + 2 * static_cast<size_t>(BM) * k * 4 + BM * 4;
}
}  // namespace topk

// Merges a warp's 32 candidates (lane j: key kc, column cc, taken if `valid`; columns increase with the
// lane) into a row's list of k entries, kept sorted best first (ranks_before) in shared memory. New
// places: a listed entry at i moves down by the candidates that rank before it; a candidate goes to
// (listed entries before it) + (valid candidates before it). Those places are a permutation of
// 0 … k + count − 1, so the ones below k are written in place, with no collision, after every lane has
// read what it moves.
__device__ __forceinline__ void merge_chunk(int32_t* list_key, int32_t* list_col, int k, bool valid, int32_t kc,
                                            int32_t cc) {
  constexpr unsigned kAll = 0xffffffffu;
  const int lane = lane_id();
  // Listed entries before the candidate: a prefix of the sorted list, found by binary search.
  int lo = 0, hi = k;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (ranks_before(list_key[mid], list_col[mid], kc, cc)) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  const int prefix = valid ? lo : (1 << 30);  // an invalid lane ranks before no listed entry
  int32_t key[topk::kSlots], col[topk::kSlots];
  int place[topk::kSlots];
#pragma unroll
  for (int s = 0; s < topk::kSlots; ++s) {
    const int i = lane + 32 * s;
    key[s] = i < k ? list_key[i] : topk::kEmpty;
    col[s] = i < k ? list_col[i] : -1;
    place[s] = i;
  }
  int place_c = prefix;
  for (int j = 0; j < 32; ++j) {
    const int32_t kj = __shfl_sync(kAll, kc, j);
    const bool vj = __shfl_sync(kAll, valid, j);
    const int pj = __shfl_sync(kAll, prefix, j);
    place_c += vj && ranks_before(kj, j, kc, lane);  // lanes stand for the chunk's increasing columns
#pragma unroll
    for (int s = 0; s < topk::kSlots; ++s) place[s] += pj <= lane + 32 * s;  // candidate j ranks before entry i
  }
  __syncwarp();
#pragma unroll
  for (int s = 0; s < topk::kSlots; ++s) {
    if (lane + 32 * s < k && place[s] < k) {
      list_key[place[s]] = key[s];
      list_col[place[s]] = col[s];
    }
  }
  if (valid && place_c < k) {
    list_key[place_c] = kc;
    list_col[place_c] = cc;
  }
  __syncwarp();
}

// Offers one row of the key tile (columns col0 …, kEmpty past the segment) to the row's list, a chunk of
// 32 columns at a time. Only keys above the list's k-th key can enter: a later column with an equal key
// ranks below it, and every listed column is lower than this tile's.
__device__ __forceinline__ void select_row(int32_t* list_key, int32_t* list_col, int k, const int32_t* row_keys,
                                           int64_t col0) {
  const int lane = lane_id();
  int32_t threshold = list_key[k - 1];
  for (int part = 0; part < topk::BN / 32; ++part) {
    const int c = 32 * part + lane;
    const int32_t key = row_keys[c];
    const bool pass = key > threshold;
    if (__any_sync(0xffffffffu, pass)) {
      merge_chunk(list_key, list_col, k, pass, key, static_cast<int32_t>(col0 + c));
      threshold = list_key[k - 1];
    }
  }
}

// The int64 rank key of order.py: larger = ranked earlier, distinct per column.
__device__ __forceinline__ int64_t rank_key(int32_t key, int32_t col) {
  return static_cast<int64_t>(key) * (int64_t{1} << 32) + (int64_t{0xFFFFFFFF} - col);
}

// Grid (row blocks, segments). Block (x, y) keeps, for rows x·BM … of q: (N, D), the best k of columns
// [y·seg_cols, min(M, (y + 1)·seg_cols)) of keys: (M, D), and writes them, sorted, to
// ranks[y][row][0 … k): (segments, N, k) int64. Per tile: the GEMM, then every thread writes its scores'
// keys to the key tile and marks rows with a key above their threshold (pending = this tile's number);
// then each warp merges its pending rows' candidates. Most tiles of a long walk mark no row.
template <typename T, bool VEC, bool TF32>
__global__ void __launch_bounds__(topk::THREADS, 3)  // ≤ 168 registers: three blocks per SM
    topk_similarity_kernel(const T* __restrict__ q, const T* __restrict__ keys, const float* __restrict__ row_scale,
                           const float* __restrict__ col_scale, int64_t* __restrict__ ranks, int64_t n, int64_t m,
                           int64_t d, int k, int64_t seg_cols) {
  using namespace topk;
  extern __shared__ __align__(16) unsigned char smem[];
  T* stage = reinterpret_cast<T*>(smem);
  int32_t* tile_key = reinterpret_cast<int32_t*>(smem);  // aliases stage: used between two tiles' GEMMs
  int32_t* list_key = reinterpret_cast<int32_t*>(smem + kUnionBytes<T>);
  int32_t* list_col = list_key + BM * k;
  int* pending = list_col + BM * k;

  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int rows = static_cast<int>(min(static_cast<int64_t>(BM), n - row0));
  const int64_t seg_start = static_cast<int64_t>(blockIdx.y) * seg_cols;
  const int64_t seg_end = min(m, seg_start + seg_cols);
  for (int i = threadIdx.x; i < BM * k; i += THREADS) {
    list_key[i] = kEmpty;
    list_col[i] = -1;
  }
  for (int i = threadIdx.x; i < BM; i += THREADS) pending[i] = -1;

  const int warp = threadIdx.x >> 5, r_base = warp / WARPS_N * 16 * MI, c_base = warp % WARPS_N * 8 * NI;
  float rs[MI][2];  // this thread's rows' factors (0 past N: those keys are never kept)
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = r_base + frag_row(mi, 2 * h);
      rs[mi][h] = r < rows ? row_scale[row0 + r] : 0.f;
    }
  __syncthreads();

  int tile = 0;
  for (int64_t col0 = seg_start; col0 < seg_end; col0 += BN, ++tile) {
    const int cols = static_cast<int>(min(static_cast<int64_t>(BN), seg_end - col0));
    float acc[MI][NI][4];
    tile_product<T, BM, BN, WARPS_N, MI, NI, VEC, TF32>(acc, stage, q + row0 * d, rows, keys + col0 * d, cols, d);

    float cs[NI][2];
    column_factors<NI>(cs, col_scale + col0, c_base, cols);
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = r_base + frag_row(mi, 2 * h);
        const bool row_ok = r < rows;
        const int32_t threshold = list_key[r * k + k - 1];
        bool above = false;
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) {
          const int c = c_base + frag_col(ni, 0);
          int2 kv;
          kv.x = row_ok && c < cols ? ordered_key(acc[mi][ni][2 * h] * rs[mi][h] * cs[ni][0]) : kEmpty;
          kv.y = row_ok && c + 1 < cols ? ordered_key(acc[mi][ni][2 * h + 1] * rs[mi][h] * cs[ni][1]) : kEmpty;
          *reinterpret_cast<int2*>(tile_key + r * LDK + c) = kv;  // c and LDK even: 8-byte aligned
          above |= kv.x > threshold || kv.y > threshold;
        }
        if (above) pending[r] = tile;  // every writer writes the same value
      }
    __syncthreads();
    for (int r = warp; r < rows; r += WARPS) {
      if (pending[r] == tile) select_row(list_key + r * k, list_col + r * k, k, tile_key + r * LDK, col0);
    }
    __syncthreads();  // the lists are final for the next tile's thresholds; the key tile may be overwritten
  }

  for (int r = warp; r < rows; r += WARPS) {
    int64_t* dst = ranks + (static_cast<int64_t>(blockIdx.y) * n + row0 + r) * k;
    for (int i = lane_id(); i < k; i += 32) dst[i] = rank_key(list_key[r * k + i], list_col[r * k + i]);
  }
}

template <typename T>
int launch_topk(cudaStream_t stream, const void* q, const void* keys, const float* row_scale, const float* col_scale,
                int64_t* ranks, int64_t n, int64_t m, int64_t d, int k, int64_t seg_cols, dim3 grid, bool tf32) {
  const T* tq = static_cast<const T*>(q);
  const T* tk = static_cast<const T*>(keys);
  const size_t bytes = topk::smem_bytes<T>(k);
  const bool vec = vec16_ok(tq, d) && vec16_ok(tk, d);
  int status = 0;
  with_variant<T>(vec, tf32, [&](auto v, auto f) {
    auto kernel = topk_similarity_kernel<T, decltype(v)::value, decltype(f)::value>;
    status = static_cast<int>(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
    if (status == 0) {
      kernel<<<grid, topk::THREADS, bytes, stream>>>(tq, tk, row_scale, col_scale, ranks, n, m, d, k, seg_cols);
    }
  });
  return status;
}

}  // namespace
}  // namespace mmfast

// out: (n, m) of dtype out_dtype = scale·n(a)·n(b)ᵀ via the factors row_scale: (n,) and col_scale: (m,)
// fp32; a: (n, d), b: (m, d) contiguous, of dtype `dtype`; tf32 (fp32 inputs): TF32 tensor cores, else
// exact fp32. Nothing is launched when n·m = 0.
MMFAST_API int mmfast_similarity(int device, cudaStream_t stream, const void* a, const void* b, const float* row_scale,
                                 const float* col_scale, void* out, int64_t n, int64_t m, int64_t d, int dtype,
                                 int out_dtype, int tf32) {
  using namespace mmfast;
  if (n < 0 || m < 0 || d < 0) return kInvalidArgument;
  const int64_t tiles = cdiv(n, sim::BM) * cdiv(m, sim::BN);
  if (tiles == 0) return 0;
  if (tiles > INT32_MAX) return kInvalidArgument;  // a 1-D grid (needs N·M ≥ 2^45: no such output fits)
  DeviceScope scope(device);
  MMFAST_DISPATCH_DTYPE(dtype, T,
                        MMFAST_DISPATCH_DTYPE(out_dtype, O,
                                              launch_similarity<T, O>(stream, a, b, row_scale, col_scale, out, n,
                                                                      m, d, tiles, tf32 != 0)));
  return launch_status();
}

// ranks: (cdiv(m, seg_cols), n, k) int64 = per column segment and query row, the rank keys of the k best
// columns of scale·n(q)·n(keys)ᵀ (factors as mmfast_similarity's), sorted best first; a segment with
// fewer than k columns fills its last places with keys below every real one. 1 ≤ k ≤ 64, m < 2^31.
MMFAST_API int mmfast_topk_similarity(int device, cudaStream_t stream, const void* q, const void* keys,
                                      const float* row_scale, const float* col_scale, int64_t* ranks, int64_t n,
                                      int64_t m, int64_t d, int k, int64_t seg_cols, int dtype, int tf32) {
  using namespace mmfast;
  if (n < 0 || m < 0 || d < 0 || k < 1 || k > topk::K_MAX || m > INT32_MAX || seg_cols < 1) return kInvalidArgument;
  if (n == 0 || m == 0) return 0;
  const int64_t row_blocks = cdiv(n, topk::BM), segments = cdiv(m, seg_cols);
  if (row_blocks > INT32_MAX || segments > 65535) return kInvalidArgument;
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(segments));
  DeviceScope scope(device);
  int status = 0;
  MMFAST_DISPATCH_DTYPE(dtype, T,
                        status = launch_topk<T>(stream, q, keys, row_scale, col_scale, ranks, n, m, d, k, seg_cols,
                                                grid, tf32 != 0));
  const int launched = launch_status();  // also clears the error a failed attribute call left
  return status != 0 ? status : launched;
}
