// The masked-LM softmax (design.md §1.3) on CUDA: the cross_entropy row kernels and linear_cross_entropy
// over the kept rows, with the contracts of mmfast/cross_entropy/triton_kernels.py and the precision
// rules of csrc/cross_entropy_cpu_kernel.cpp (numerics.cuh: online logsumexp with the row's top entries
// counted apart, the gradient through the fp64 lse's hi + lo parts, the target's entry via expm1).
//
// cross_entropy   x: (T, V) logits (fp32/fp16/bf16, rows contiguous), y: (T,) int64, −1 (or ≥ V): ignored
//   forward  → loss (T,) fp32, lse (T,) fp64 (0 and 0 on an ignored row; NaN lse as chunked.py: row_lse)
//   backward → g (T, V) in x's dtype, g = w_t·(softmax·(1 + 2z·lse) − ε/V − (1 − ε)·onehot), possibly over x
//   One warp per row when V ≤ kWarpRowMax (8 rows per block), else a 256-thread block per row. A thread
//   walks its 16-byte chunks of the row (one 16-byte load each where the rows are 16-byte aligned, else
//   element loads), keeping an online (max, Σexp) and Σx; the group merges them in a fixed order. The
//   backward recomputes the statistics (one read of the row), then writes g (one read, one write).
//
// linear_cross_entropy   h: (T, Dh), w: (V, Dh), bias: (V,) or none, y: (T,); only the kept rows (y ≥ 0),
//   `order` (T,) the rows with the kept ones first and `kept` (1,) their count, both on the device (no host
//   sync: the kernels read the count and size their work from it). A tile is kM = 64 kept rows × kN = 64
//   vocabulary entries of X = H·Wᵀ + bias, formed by warp_mma over Dh in K chunks of 64 bytes per row
//   (cp.async double buffer; H rows gathered through `order`).
//   forward (2·T_kept·V·Dh FLOPs): a persistent grid over (vocabulary split × row block) work items; a
//     program walks its split's tiles keeping per-row online (max, Σexp), x_y and Σx in registers, and
//     writes one partial per (split, kept row). The split count is chosen on the device from the kept
//     count so that there are ≈ `target` work items (a few kept rows still fill the GPU). A finish kernel
//     merges the splits in order in fp64 → loss, lse.
//   backward: every tile recomputes X with the saved lse, forms G (BM × BN, in T for fp16/bf16 inputs, fp32
//     for fp32) in shared memory, then walks Dh again: dh_rows += G·W_tile, dW_tile += Gᵀ·H_rows, and
//     dbias_tile += Σ_rows G, all in fp32 outputs.
//     fast (6·T_kept·V·Dh FLOPs): a persistent grid over (row block × vocabulary block) items, ordered so
//       that concurrent programs hit different row blocks and different vocabulary blocks; dh, dW, dbias
//       by fp32 reductions (red.global.add), so the summation order varies from run to run.
//     deterministic (8·T_kept·V·Dh FLOPs, under torch.use_deterministic_algorithms): two sweeps without
//       atomics, each output owned by one program that adds into it in a fixed order: programs owning row
//       blocks walk the vocabulary for dh; programs owning vocabulary blocks walk the row blocks for dW
//       and dbias.
//     dh is added to global memory once per tile (BM × Dh fp32 per 6·BM·BN·Dh FLOPs, L2-resident; on chip
//     it would take BM × Dh fp32 = 192 KB at Dh = 768, more than a block's shared memory at larger Dh).
#include <type_traits>

#include "common.cuh"
#include "mma.cuh"
#include "numerics.cuh"

namespace mmfast {
namespace ce {

constexpr int kThreads = 256;      // 8 warps per block in every kernel
// Occupancy asked of ptxas (minimum resident blocks per SM; without one, ptxas 13 picks a register target
// that spills): row kernels are memory-bound and want many warps in flight (≤ 64 registers); tile kernels
// hold fragments and row statistics, and are given their registers (2 blocks of 8 warps fit at ≤ 128).
constexpr int kRowBlocksPerSm = 4;
constexpr int kTileBlocksPerSm = 1;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kWarpRowMax = 2048;  // rows up to this length: a warp per row (≤ 64 elements per lane)

// ---- statistics of a row ---------------------------------------------------------------------------

// A row's (or a part's) online logsumexp and Σx (for label smoothing).
struct RowStats {
  Lse lse;
  double sum_x;
};

__device__ __forceinline__ RowStats stats_empty() { return {lse_empty(), 0.0}; }

// Exact in the order given (lse_merge), so fixed merge orders are deterministic.
__device__ __forceinline__ RowStats merge(RowStats a, RowStats b) {
  return {lse_merge(a.lse, b.lse), a.sum_x + b.sum_x};
}

__device__ __forceinline__ RowStats shfl_xor(RowStats s, int mask) {
  return {{__shfl_xor_sync(0xffffffffu, s.lse.max, mask), __shfl_xor_sync(0xffffffffu, s.lse.sum, mask)},
          __shfl_xor_sync(0xffffffffu, s.sum_x, mask)};
}

// Adds K logits to a running (max, Σexp): the max rises first (the fp64 sum rescaled by an fp64 exp, as in
// lse_merge, only when it does), then the K terms are summed in fp32 against it with the entries equal to
// it counted apart (exp_rest / exp_top) and carried into the fp64 sum. −inf entries add nothing; a NaN
// makes the max and the sum NaN.
template <int K>
__device__ __forceinline__ void lse_add(Lse& s, const float (&x)[K]) {
  float m = s.max;
#pragma unroll
  for (int j = 0; j < K; ++j) m = nan_max(m, x[j]);
  if (!(m == s.max)) s.sum = (s.max == -INFINITY) ? 0.0 : s.sum * exp((double)s.max - (double)m);
  s.max = m;
  float rest = 0.f, top = 0.f;
#pragma unroll
  for (int j = 0; j < K; ++j) {
    rest += exp_rest(x[j], m);
    top += exp_top(x[j], m);
  }
  s.sum += (double)rest + (double)top;
}

// A row's logsumexp as the `torch` backend (mmfast/cross_entropy/chunked.py) gives it: max + log Σexp for a
// finite max; NaN when the max is +inf (chunked.py's x − max is inf − inf: the triton and CPU backends
// give NaN too), NaN (not −inf) for a row of −inf logits only (its x − max is −inf − (−inf)), NaN for a
// NaN logit. The butterfly merges already turn a +inf max into NaN (exp(inf − inf) in lse_merge); this
// does not rely on it. (numerics.cuh's lse_value gives +inf and −inf there: right for the contrastive
// statistics, whose all −inf column is an empty set, not for a loss row.)
__device__ __forceinline__ double row_lse(Lse s) {
  if (!(s.max - s.max == 0.f)) return (double)NAN;
  return (double)s.max + log(s.sum);
}

// loss = lse − (1 − ε)·x_y + z·lse² − ε·Σx/V in fp64 (the ε term only when ε ≠ 0: −inf logits must not
// give 0·(−inf)), as the CPU kernel.
__device__ __forceinline__ float row_loss(double lse, double x_y, double sum_x, float eps, float z, int64_t vocab) {
  double loss = lse - (1.0 - eps) * x_y + z * lse * lse;
  if (eps != 0.f) loss -= eps * sum_x / (double)vocab;
  return (float)loss;
}

// ---- the row kernels ----------------------------------------------------------------------------------

// 16 bytes of a row ↔ kN fp32 values, through registers only.
template <typename T>
struct Pack;

template <>
struct Pack<float> {
  static constexpr int kN = 4;
  __device__ static void unpack(uint4 u, float (&v)[4]) {
    v[0] = __uint_as_float(u.x), v[1] = __uint_as_float(u.y), v[2] = __uint_as_float(u.z), v[3] = __uint_as_float(u.w);
  }
  __device__ static uint4 pack(const float (&v)[4]) {
    return make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]), __float_as_uint(v[3]));
  }
};

__device__ __forceinline__ uint32_t bits16(__half x) { return __half_as_ushort(x); }
__device__ __forceinline__ uint32_t bits16(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }
template <typename H>
__device__ __forceinline__ H from_bits16(uint32_t b);
template <>
__device__ __forceinline__ __half from_bits16<__half>(uint32_t b) { return __ushort_as_half((unsigned short)b); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_bits16<__nv_bfloat16>(uint32_t b) {
  return __ushort_as_bfloat16((unsigned short)b);
}

template <typename H>
struct Pack16 {
  static constexpr int kN = 8;
  __device__ static void unpack(uint4 u, float (&v)[8]) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = to_float(from_bits16<H>((w[j >> 1] >> (16 * (j & 1))) & 0xFFFFu));
  }
  __device__ static uint4 pack(const float (&v)[8]) {
    uint32_t w[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) w[j] = bits16(from_float<H>(v[2 * j])) | (bits16(from_float<H>(v[2 * j + 1])) << 16);
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
};
template <>
struct Pack<__half> : Pack16<__half> {};
template <>
struct Pack<__nv_bfloat16> : Pack16<__nv_bfloat16> {};

// How many of chunk c's K elements (c·K … c·K + K − 1) lie inside a row of V.
template <typename T>
__device__ __forceinline__ int chunk_len(int64_t vocab, int64_t c) {
  constexpr int K = Pack<T>::kN;
  return (int)(vocab - c * K < K ? vocab - c * K : K);
}

// Chunk c of a row as fp32, −inf past V; returns chunk_len. VEC: one 16-byte load (the row is 16-byte
// aligned and V a multiple of K).
template <typename T, bool VEC>
__device__ __forceinline__ int load_chunk(const T* row, int64_t c, int64_t vocab, float (&v)[Pack<T>::kN]) {
  constexpr int K = Pack<T>::kN;
  const int64_t e0 = c * K;
  if constexpr (VEC) {
    Pack<T>::unpack(*reinterpret_cast<const uint4*>(row + e0), v);
    return K;
  } else {
    const int n = chunk_len<T>(vocab, c);
#pragma unroll
    for (int j = 0; j < K; ++j) v[j] = j < n ? to_float(row[e0 + j]) : -INFINITY;
    return n;
  }
}

// Stores the first n values of chunk c (all K with VEC).
template <typename T, bool VEC>
__device__ __forceinline__ void store_chunk(T* row, int64_t c, int n, const float (&v)[Pack<T>::kN]) {
  constexpr int K = Pack<T>::kN;
  if constexpr (VEC) {
    *reinterpret_cast<uint4*>(row + c * K) = Pack<T>::pack(v);
  } else {
#pragma unroll
    for (int j = 0; j < K; ++j)
      if (j < n) row[c * K + j] = from_float<T>(v[j]);
  }
}

// The statistics of one row, merged over the group of 32·WARPS threads that owns it (every thread of the
// group gets them); `lane` is the thread's index in the group. The merge is a barrier of the group: every
// read of the row by the group happens before it.
template <typename T, int WARPS, bool VEC, bool SUM_X>
__device__ __forceinline__ RowStats row_stats(const T* row, int64_t vocab, int lane) {
  constexpr int K = Pack<T>::kN;
  RowStats s = stats_empty();
  const int64_t chunks = cdiv(vocab, K);
  for (int64_t c = lane; c < chunks; c += 32 * WARPS) {
    float v[K];
    const int n = load_chunk<T, VEC>(row, c, vocab, v);
    lse_add(s.lse, v);
    if constexpr (SUM_X) {
      float sum = 0.f;  // K terms in fp32, then fp64
#pragma unroll
      for (int j = 0; j < K; ++j) sum += j < n ? v[j] : 0.f;
      s.sum_x += sum;
    }
  }
#pragma unroll
  for (int m = 16; m >= 1; m >>= 1) s = merge(s, shfl_xor(s, m));
  if constexpr (WARPS > 1) {
    __shared__ RowStats part[WARPS];
    if (lane_id() == 0) part[threadIdx.x >> 5] = s;
    __syncthreads();
    s = part[0];
#pragma unroll
    for (int w = 1; w < WARPS; ++w) s = merge(s, part[w]);
  }
  return s;
}

// The row of this thread's group (WARPS == kWarps: the block's; else its warp's), or −1 past the rows.
template <int WARPS>
__device__ __forceinline__ int64_t group_row(int64_t rows) {
  const int64_t t = (int64_t)blockIdx.x * (kWarps / WARPS) + threadIdx.x / (32 * WARPS);
  return t < rows ? t : -1;
}

template <typename T, int WARPS, bool VEC>
__global__ void __launch_bounds__(kThreads, kRowBlocksPerSm)
    ce_forward_kernel(const T* __restrict__ x, const int64_t* __restrict__ y, float* __restrict__ loss,
                      double* __restrict__ lse, int64_t rows, int64_t vocab, float eps, float z) {
  const int64_t t = group_row<WARPS>(rows);
  if (t < 0) return;  // uniform over the group
  const int lane = threadIdx.x % (32 * WARPS);
  const int64_t target = y[t];
  if (target < 0 || target >= vocab) {  // ignored: no loss
    if (lane == 0) loss[t] = 0.f, lse[t] = 0.0;
    return;
  }
  const T* row = x + t * vocab;
  const RowStats s = row_stats<T, WARPS, VEC, true>(row, vocab, lane);
  if (lane == 0) {
    const double l = row_lse(s.lse);
    lse[t] = l;
    loss[t] = row_loss(l, to_float(row[target]), s.sum_x, eps, z, vocab);
  }
}

// out may be x itself: every element is read by the thread that writes it, before it writes it, and the
// statistics pass (all reads of the row) ends at the group's merge, before the first write. The target's
// logit is read by the thread that owns its chunk, before the merge.
template <typename T, int WARPS, bool VEC>
__global__ void __launch_bounds__(kThreads, kRowBlocksPerSm)
    ce_grad_kernel(const T* x, const int64_t* __restrict__ y, const float* __restrict__ row_weight, T* out,
                   int64_t rows, int64_t vocab, float eps, float z) {
  constexpr int K = Pack<T>::kN;
  const int64_t t = group_row<WARPS>(rows);
  if (t < 0) return;
  const int lane = threadIdx.x % (32 * WARPS);
  const int64_t target = y[t], chunks = cdiv(vocab, K);
  T* out_row = out + t * vocab;
  if (target < 0 || target >= vocab) {  // ignored: a zero gradient
    const float zero[K] = {};
    for (int64_t c = lane; c < chunks; c += 32 * WARPS) store_chunk<T, VEC>(out_row, c, chunk_len<T>(vocab, c), zero);
    return;
  }
  const T* row = x + t * vocab;
  const bool owns_target = (target / K) % (32 * WARPS) == lane;
  const float x_y = owns_target ? to_float(row[target]) : 0.f;
  const double l = row_lse(row_stats<T, WARPS, VEC, false>(row, vocab, lane).lse);
  const double w = row_weight[t];
  const HiLo s = split(l);
  const float a = (float)(w * (1.0 + 2.0 * z * l)), c0 = (float)(-w * eps / (double)vocab);
  const float g_y = owns_target ? target_grad(x_y, l, w, eps, z, vocab) : 0.f;
  for (int64_t c = lane; c < chunks; c += 32 * WARPS) {
    float v[K];
    const int n = load_chunk<T, VEC>(row, c, vocab, v);
#pragma unroll
    for (int j = 0; j < K; ++j) v[j] = (c * K + j == target) ? g_y : a * exp_minus(v[j], s) + c0;
    store_chunk<T, VEC>(out_row, c, n, v);
  }
}

// f(std::integral_constant<int, WARPS>, std::bool_constant<VEC>) for the row length and alignment.
template <class F>
void dispatch_rows(int64_t vocab, bool vec, F&& f) {
  if (vocab <= kWarpRowMax) {
    vec ? f(std::integral_constant<int, 1>{}, std::true_type{})
        : f(std::integral_constant<int, 1>{}, std::false_type{});
  } else {
    vec ? f(std::integral_constant<int, kWarps>{}, std::true_type{})
        : f(std::integral_constant<int, kWarps>{}, std::false_type{});
  }
}

// Blocks for `rows` rows at `warps` warps per row (rows < 2^31: the launchers check).
inline unsigned row_blocks(int64_t rows, int warps) { return (unsigned)cdiv(rows, kWarps / warps); }

// ---- linear_cross_entropy: tiles of kept rows × vocabulary -------------------------------------------

constexpr int kM = 64;  // kept rows per tile: 2 warps × 32 rows of the logit tile
constexpr int kN = 64;  // vocabulary entries per tile: 4 warps × 16 (small tiles keep the stages, 20 KB, and
                        // G, 9 KB in fp16/bf16 or 17 KB in fp32, in static shared memory for every dtype)

template <typename T>
struct TileShape {
  static constexpr int kK = 64 / (int)sizeof(T);    // K step: 64-byte rows (32 fp16/bf16, 16 fp32 = 2 TF32 steps)
  static constexpr int kPad = 16 / (int)sizeof(T);  // +16 bytes per shared row: ldmatrix rows on distinct banks
  static constexpr int kLdk = kK + kPad;            // pitch of the H / W chunks
  static constexpr int kLdg = kN + kPad;            // pitch of G
  static constexpr int kNi2 = kK / 16;              // pass 2: a warp's 16 × 8·kNi2 part of a 64 × kK chunk
};

// The double-buffered K chunks of the tile's H rows and W rows.
template <typename T>
struct Stages {
  T h[2][kM * TileShape<T>::kLdk];
  T w[2][kN * TileShape<T>::kLdk];
};

template <typename T>
struct LceArgs {
  const T* h;     // (rows, dim)
  const T* w;     // (vocab, dim)
  const T* bias;  // (vocab,) or nullptr
  const int64_t* y;
  const int64_t* order;  // (rows,): kept rows first
  const int64_t* kept;   // (1,): their count
  int64_t rows, vocab, dim;
  float eps, z;
};

// Runs the K loop: load(stage, chunk) fills a stage (cp.async or element stores), use(stage, chunk) reads
// it. Chunk k + 1 is in flight while chunk k is used; a stage is refilled only after the barrier that ends
// its last use, and read only after its cp.async group has landed and a barrier.
template <class Load, class Use>
__device__ __forceinline__ void pipeline(int64_t chunks, Load&& load, Use&& use) {
  if (chunks <= 0) return;
  load(0, 0);
  cp_async_commit();
  for (int64_t kc = 0; kc < chunks; ++kc) {
    if (kc + 1 < chunks) load((int)((kc + 1) & 1), kc + 1);
    cp_async_commit();  // possibly empty: then wait<1> still means "chunk kc has landed"
    cp_async_wait<1>();
    __syncthreads();
    use((int)(kc & 1), kc);
    __syncthreads();
  }
}

// load_tile for gathered rows: row r of the kM × kK chunk is g[rows[r]·ld + k0 …] (zero where rows[r] < 0
// or past `cols`).
template <typename T, bool VEC>
__device__ __forceinline__ void gather_tile(T* s, const int64_t* rows, const T* g, int64_t ld, int64_t k0, int cols) {
  using S = TileShape<T>;
  if constexpr (VEC) {
    constexpr int kPer = 16 / (int)sizeof(T), kRowChunks = S::kK / kPer;
    for (int c = threadIdx.x; c < kM * kRowChunks; c += kThreads) {
      const int r = c / kRowChunks, k = (c % kRowChunks) * kPer;
      const int64_t row = rows[r];
      const int left = row >= 0 ? max(0, min(kPer, cols - k)) : 0;
      cp_async_16(s + r * S::kLdk + k, left > 0 ? g + row * ld + k0 + k : g, left * (int)sizeof(T));
    }
  } else {
    for (int e = threadIdx.x; e < kM * S::kK; e += kThreads) {
      const int r = e / S::kK, k = e % S::kK;
      const int64_t row = rows[r];
      s[r * S::kLdk + k] = (row >= 0 && k < cols) ? g[row * ld + k0 + k] : from_float<T>(0.f);
    }
  }
}

// The warp's part of the logit tile: acc = H[rows]·W[v0 : v0 + n_cols]ᵀ over all of dim (no bias), the 64 × 64
// tile split over the warps 2 (rows) × 4 (columns), 32 × 16 each: row 32·wm + frag_row(mi, e), column
// 16·wn + frag_col(ni, e).
template <typename T, bool VEC, bool TF32>
__device__ __forceinline__ void logit_tile(float (&acc)[2][2][4], Stages<T>& st, const int64_t* rows,
                                           const LceArgs<T>& a, int64_t v0, int n_cols) {
  using S = TileShape<T>;
  const int warp = threadIdx.x >> 5, wm = warp >> 2, wn = warp & 3;
  zero(acc);
  const T* w0 = a.w + v0 * a.dim;
  pipeline(
      cdiv(a.dim, S::kK),
      [&](int s, int64_t kc) {
        const int64_t k0 = kc * S::kK;
        const int cols = (int)(a.dim - k0 < S::kK ? a.dim - k0 : S::kK);
        gather_tile<T, VEC>(st.h[s], rows, a.h, a.dim, k0, cols);
        load_tile<T, kN, S::kK, kThreads, VEC>(st.w[s], S::kLdk, w0 + k0, a.dim, n_cols, cols);
      },
      [&](int s, int64_t) {
        warp_mma<T, 2, 2, true, true, TF32>(acc, st.h[s] + 32 * wm * S::kLdk, S::kLdk, st.w[s] + 16 * wn * S::kLdk,
                                            S::kLdk, S::kK);
      });
}

// The thread's logit (mi, ni, e) plus the bias; n_cols bounds the columns the bias is read at.
template <typename T>
__device__ __forceinline__ float bias_at(const LceArgs<T>& a, int64_t v0, int c, int n_cols) {
  return (a.bias != nullptr && c < n_cols) ? to_float(a.bias[v0 + c]) : 0.f;
}

// Work items of the forward: `blocks` row blocks of kept rows × `splits` vocabulary splits of `tiles` tiles
// each. ≈ target items (at least one split, at most one tile per split), computed alike by every kernel
// from the kept count.
struct Split {
  int64_t blocks, splits, tiles;
};

__host__ __device__ __forceinline__ Split plan_splits(int64_t kept, int64_t vocab, int64_t target) {
  const int64_t blocks = cdiv(kept, kM), vocab_tiles = cdiv(vocab, kN);
  int64_t want = blocks > 0 ? cdiv(target, blocks) : 1;
  want = want < 1 ? 1 : (want > vocab_tiles ? vocab_tiles : want);
  const int64_t tiles = cdiv(vocab_tiles, want);
  return {blocks, cdiv(vocab_tiles, tiles), tiles};
}

// Per (split, kept position p): partial statistics at [split·blocks·kM + p] (blocks·kM·splits ≤
// kM·max(cdiv(T, kM), 2·target) entries: the workspace Python allocates).
struct Partials {
  float* max;
  double* sum;
  float* x_y;
  double* sum_x;
};

template <typename T, bool VEC, bool TF32>
__global__ void __launch_bounds__(kThreads, kTileBlocksPerSm)
    lce_forward_kernel(LceArgs<T> a, Partials part, int64_t target) {
  __shared__ __align__(16) Stages<T> st;
  __shared__ int64_t rows[kM], targets[kM];
  __shared__ RowStats part_stats[4][kM];
  __shared__ float part_xy[4][kM];
  const int64_t kept = *a.kept;
  const Split plan = plan_splits(kept, a.vocab, target);
  const int warp = threadIdx.x >> 5, wm = warp >> 2, wn = warp & 3, g = lane_id() >> 2, t4 = lane_id() & 3;
  // Split-major: concurrent programs walk the same stretch of W (shared through L2) for different rows.
  for (int64_t item = blockIdx.x; item < plan.blocks * plan.splits; item += gridDim.x) {
    const int64_t vsplit = item / plan.blocks, p0 = (item % plan.blocks) * kM;
    if (threadIdx.x < kM) {
      const int64_t p = p0 + threadIdx.x, t = p < kept ? a.order[p] : -1;
      rows[threadIdx.x] = t;
      targets[threadIdx.x] = t >= 0 ? a.y[t] : -1;
    }
    __syncthreads();
    // The thread's 4 rows (q = 2·mi + h: row 32·wm + 16·mi + g + 8·h), over its 4 columns of every tile.
    RowStats s[4];
    float x_y[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) s[q] = stats_empty(), x_y[q] = 0.f;
    const int64_t vocab_tiles = cdiv(a.vocab, kN), split_end = (vsplit + 1) * plan.tiles;
    const int64_t tile_end = split_end < vocab_tiles ? split_end : vocab_tiles;
    for (int64_t tile = vsplit * plan.tiles; tile < tile_end; ++tile) {
      const int64_t v0 = tile * kN;
      const int n_cols = (int)(a.vocab - v0 < kN ? a.vocab - v0 : kN);
      float acc[2][2][4];
      logit_tile<T, VEC, TF32>(acc, st, rows, a, v0, n_cols);
      float b[2][2];
#pragma unroll
      for (int ni = 0; ni < 2; ++ni)
#pragma unroll
        for (int j = 0; j < 2; ++j) b[ni][j] = bias_at(a, v0, 16 * wn + frag_col(ni, j), n_cols);
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int q = 2 * mi + h;
          const int64_t y_r = targets[32 * wm + frag_row(mi, 2 * h)];
          float x[4], sum = 0.f;
#pragma unroll
          for (int ni = 0; ni < 2; ++ni)
#pragma unroll
            for (int j = 0; j < 2; ++j) {
              const int c = 16 * wn + frag_col(ni, j);
              const float v = acc[mi][ni][2 * h + j] + b[ni][j];
              const bool inside = c < n_cols;
              x[2 * ni + j] = inside ? v : -INFINITY;
              sum += inside ? v : 0.f;
              if (v0 + c == y_r) x_y[q] = v;
            }
          lse_add(s[q].lse, x);
          s[q].sum_x += sum;
        }
    }
    // Merge the 4 lanes of a row (t4), then the 4 warps of a row (wn), in fixed orders.
#pragma unroll
    for (int q = 0; q < 4; ++q)
#pragma unroll
      for (int m = 1; m <= 2; m <<= 1) {
        s[q] = merge(s[q], shfl_xor(s[q], m));
        x_y[q] += __shfl_xor_sync(0xffffffffu, x_y[q], m);  // one term is the target's logit, the rest 0
      }
    if (t4 == 0) {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int r = 32 * wm + frag_row(q >> 1, 2 * (q & 1));
        part_stats[wn][r] = s[q];
        part_xy[wn][r] = x_y[q];
      }
    }
    __syncthreads();
    if (threadIdx.x < kM && rows[threadIdx.x] >= 0) {
      const int r = threadIdx.x;
      RowStats total = part_stats[0][r];
      float xy = part_xy[0][r];
#pragma unroll
      for (int w = 1; w < 4; ++w) total = merge(total, part_stats[w][r]), xy += part_xy[w][r];
      const int64_t i = vsplit * plan.blocks * kM + p0 + r;
      part.max[i] = total.lse.max;
      part.sum[i] = total.lse.sum;
      part.x_y[i] = xy;
      part.sum_x[i] = total.sum_x;
    }
    __syncthreads();  // rows, targets and the merge scratch are rewritten by the next item
  }
}

// One thread per position p of `order`: a kept row merges its splits' partials in split order (fp64) into
// loss and lse; an ignored row (p ≥ kept) gets 0 and 0.
__global__ void __launch_bounds__(kThreads, kRowBlocksPerSm)
    lce_finish_kernel(const int64_t* __restrict__ order, const int64_t* __restrict__ kept_count, Partials part,
                      float* __restrict__ loss, double* __restrict__ lse, int64_t rows, int64_t vocab, int64_t target,
                      float eps, float z) {
  const int64_t p = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (p >= rows) return;
  const int64_t t = order[p], kept = *kept_count;
  if (p >= kept) {
    loss[t] = 0.f, lse[t] = 0.0;
    return;
  }
  const Split plan = plan_splits(kept, vocab, target);
  RowStats total = stats_empty();
  float x_y = 0.f;  // exact: one split holds the target's logit, the others 0
  for (int64_t s = 0; s < plan.splits; ++s) {
    const int64_t i = s * plan.blocks * kM + p;
    total = merge(total, RowStats{{part.max[i], part.sum[i]}, part.sum_x[i]});
    x_y += part.x_y[i];
  }
  const double l = row_lse(total.lse);
  lse[t] = l;
  loss[t] = row_loss(l, x_y, total.sum_x, eps, z, vocab);
}

// ---- linear_cross_entropy backward --------------------------------------------------------------------

struct LceGrads {
  const double* lse;       // (rows,) from the forward
  const float* weight;     // (rows,) row weights (the incoming gradient)
  float* dh;               // (rows, dim), zeroed
  float* dw;               // (vocab, dim), zeroed
  float* db;               // (vocab,), zeroed, or nullptr
};

// The tile's rows and what the gradient needs of each: g = a·exp(x − lse) + c off the target,
// target_grad(x_y, lse, w, …) on it.
struct GradRows {
  int64_t index[kM];  // row of h (−1 past the kept count)
  int64_t target[kM];
  double lse[kM], weight[kM];
  float hi[kM], lo[kM], a[kM], c[kM];
};

// dst(r, col) += acc for the warp's 16 × 8·NI part (rows 16·wm2 + frag_row(0, e), columns col0 + frag_col(ni, e))
// of a pass-2 chunk; row_ptr(r) is row r's output at the chunk's first column, or nullptr for no row; cols
// bounds the columns. ATOMIC: fp32 reductions (other programs add to the same outputs); else a plain
// read-modify-write by the output's only writer.
template <bool ATOMIC, int NI, class RowPtr>
__device__ __forceinline__ void add_out(const float (&acc)[1][NI][4], int wm2, int col0, int64_t cols,
                                        RowPtr&& row_ptr) {
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    float* dst = row_ptr(16 * wm2 + frag_row(0, e));
    if (dst == nullptr) continue;
#pragma unroll
    for (int ni = 0; ni < NI; ++ni) {
      const int col = col0 + frag_col(ni, e);
      if (col < cols) {
        if constexpr (ATOMIC) {
          atomicAdd(dst + col, acc[0][ni][e]);
        } else {
          dst[col] += acc[0][ni][e];
        }
      }
    }
  }
}

// One tile's gradients: rows p0 … p0 + 63 of the kept order × vocabulary v0 … v0 + 63. DH: dh += G·W_tile;
// DW: dW_tile += Gᵀ·H_rows and dbias_tile += Σ_rows G.
template <typename T, bool VEC, bool TF32, bool DH, bool DW, bool ATOMIC>
__device__ __forceinline__ void grad_tile(const LceArgs<T>& a, const LceGrads& out, Stages<T>& st, T* gs,
                                          GradRows& rows, float (&colsum)[2][kN], int64_t p0, int64_t v0,
                                          int64_t kept) {
  using S = TileShape<T>;
  const int warp = threadIdx.x >> 5, wm = warp >> 2, wn = warp & 3, lane = lane_id();
  const int n_cols = (int)(a.vocab - v0 < kN ? a.vocab - v0 : kN);
  if (threadIdx.x < kM) {
    const int r = threadIdx.x;
    const int64_t p = p0 + r, t = p < kept ? a.order[p] : -1;
    rows.index[r] = t;
    if (t >= 0) {
      const double l = out.lse[t], w = out.weight[t];
      const HiLo s = split(l);
      rows.target[r] = a.y[t];
      rows.lse[r] = l, rows.weight[r] = w;
      rows.hi[r] = s.hi, rows.lo[r] = s.lo;
      rows.a[r] = (float)(w * (1.0 + 2.0 * a.z * l));
      rows.c[r] = (float)(-w * a.eps / (double)a.vocab);
    }
  }
  __syncthreads();
  float acc[2][2][4];
  logit_tile<T, VEC, TF32>(acc, st, rows.index, a, v0, n_cols);

  // G into shared memory (0 outside the kept rows and the vocabulary), and its column sums in fp32.
  float b[2][2], cs[2][2] = {};
#pragma unroll
  for (int ni = 0; ni < 2; ++ni)
#pragma unroll
    for (int j = 0; j < 2; ++j) b[ni][j] = bias_at(a, v0, 16 * wn + frag_col(ni, j), n_cols);
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = 32 * wm + frag_row(mi, 2 * h);
      const bool kept_row = rows.index[r] >= 0;
      const int64_t y_r = kept_row ? rows.target[r] : -1;
      float x_t = 0.f;  // the target's logit, if this thread holds it
      bool has_target = false;
#pragma unroll
      for (int ni = 0; ni < 2; ++ni)
#pragma unroll
        for (int j = 0; j < 2; ++j)
          if (v0 + 16 * wn + frag_col(ni, j) == y_r) has_target = true, x_t = acc[mi][ni][2 * h + j] + b[ni][j];
      const float g_t = has_target ? target_grad(x_t, rows.lse[r], rows.weight[r], a.eps, a.z, a.vocab) : 0.f;
      const HiLo s = kept_row ? HiLo{rows.hi[r], rows.lo[r]} : HiLo{0.f, 0.f};
      const float ar = kept_row ? rows.a[r] : 0.f, cr = kept_row ? rows.c[r] : 0.f;
#pragma unroll
      for (int ni = 0; ni < 2; ++ni)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int c = 16 * wn + frag_col(ni, j);
          float gv = 0.f;
          if (kept_row && c < n_cols)
            gv = (v0 + c == y_r) ? g_t : ar * exp_minus(acc[mi][ni][2 * h + j] + b[ni][j], s) + cr;
          gs[r * S::kLdg + c] = from_float<T>(gv);
          cs[ni][j] += gv;
        }
    }
  if constexpr (DW) {
#pragma unroll
    for (int m = 4; m <= 16; m <<= 1)  // over g: the warp's 32 rows
#pragma unroll
      for (int ni = 0; ni < 2; ++ni)
#pragma unroll
        for (int j = 0; j < 2; ++j) cs[ni][j] += __shfl_xor_sync(0xffffffffu, cs[ni][j], m);
    if (lane < 4) {
#pragma unroll
      for (int ni = 0; ni < 2; ++ni)
#pragma unroll
        for (int j = 0; j < 2; ++j) colsum[wm][16 * wn + frag_col(ni, j)] = cs[ni][j];
    }
  }
  __syncthreads();  // G and the column sums are complete
  if constexpr (DW) {
    if (out.db != nullptr && threadIdx.x < n_cols) {
      const float v = colsum[0][threadIdx.x] + colsum[1][threadIdx.x];
      if constexpr (ATOMIC) {
        atomicAdd(out.db + v0 + threadIdx.x, v);
      } else {
        out.db[v0 + threadIdx.x] += v;
      }
    }
  }

  // Pass 2 over dim, chunk by chunk: the 64 × kK outputs split over the warps 4 (rows) × 2 (columns).
  const int wm2 = warp >> 1, col0 = 8 * S::kNi2 * (warp & 1);
  const T* w0 = a.w + v0 * a.dim;
  pipeline(
      cdiv(a.dim, S::kK),
      [&](int s, int64_t kc) {
        const int64_t k0 = kc * S::kK;
        const int cols = (int)(a.dim - k0 < S::kK ? a.dim - k0 : S::kK);
        if constexpr (DW) gather_tile<T, VEC>(st.h[s], rows.index, a.h, a.dim, k0, cols);
        if constexpr (DH) load_tile<T, kN, S::kK, kThreads, VEC>(st.w[s], S::kLdk, w0 + k0, a.dim, n_cols, cols);
      },
      [&](int s, int64_t kc) {
        const int64_t k0 = kc * S::kK, cols = a.dim - k0;
        float acc2[1][S::kNi2][4];
        if constexpr (DH) {  // dh (64 rows × kK) += G (64 × 64) · W chunk (64 × kK)
          zero(acc2);
          warp_mma<T, 1, S::kNi2, true, false, TF32>(acc2, gs + 16 * wm2 * S::kLdg, S::kLdg, st.w[s] + col0, S::kLdk,
                                                     kN);
          add_out<ATOMIC>(acc2, wm2, col0, cols, [&](int r) -> float* {
            return rows.index[r] >= 0 ? out.dh + rows.index[r] * a.dim + k0 : nullptr;
          });
        }
        if constexpr (DW) {  // dW (64 vocabulary rows × kK) += Gᵀ (64 × 64) · H chunk (64 × kK)
          zero(acc2);
          warp_mma<T, 1, S::kNi2, false, false, TF32>(acc2, gs + 16 * wm2, S::kLdg, st.h[s] + col0, S::kLdk, kM);
          add_out<ATOMIC>(acc2, wm2, col0, cols, [&](int r) -> float* {
            return r < n_cols ? out.dw + (v0 + r) * a.dim + k0 : nullptr;
          });
        }
      });
}

enum GradMode : int {
  kFast = 0,       // items (row block × vocabulary block), fp32 reductions into dh, dW, dbias
  kOwnRows = 1,    // deterministic sweep 1: a program owns row blocks and walks the vocabulary (dh)
  kOwnVocab = 2,   // deterministic sweep 2: a program owns vocabulary blocks and walks the row blocks (dW, dbias)
};

template <typename T, bool VEC, bool TF32, int MODE>
__global__ void __launch_bounds__(kThreads, kTileBlocksPerSm) lce_backward_kernel(LceArgs<T> a, LceGrads out) {
  __shared__ __align__(16) Stages<T> st;
  __shared__ __align__(16) T gs[kM * TileShape<T>::kLdg];
  __shared__ GradRows rows;
  __shared__ float colsum[2][kN];
  const int64_t kept = *a.kept, blocks = cdiv(kept, kM), vblocks = cdiv(a.vocab, kN);
  if constexpr (MODE == kFast) {
    // Item i: row block i mod blocks, so concurrent items hit different rows of dh; its vocabulary block
    // is offset by `spread` per row block, so they also hit different (spread-out) blocks of dW.
    const int64_t spread = blocks > 0 && vblocks / blocks > 1 ? vblocks / blocks : 1;
    for (int64_t item = blockIdx.x; item < blocks * vblocks; item += gridDim.x) {
      const int64_t rb = item % blocks, vb = (item / blocks + rb * spread) % vblocks;
      grad_tile<T, VEC, TF32, true, true, true>(a, out, st, gs, rows, colsum, rb * kM, vb * kN, kept);
    }
  } else if constexpr (MODE == kOwnRows) {
    for (int64_t rb = blockIdx.x; rb < blocks; rb += gridDim.x)
      for (int64_t vb = 0; vb < vblocks; ++vb)
        grad_tile<T, VEC, TF32, true, false, false>(a, out, st, gs, rows, colsum, rb * kM, vb * kN, kept);
  } else {
    for (int64_t vb = blockIdx.x; vb < vblocks; vb += gridDim.x)
      for (int64_t rb = 0; rb < blocks; ++rb)
        grad_tile<T, VEC, TF32, false, true, false>(a, out, st, gs, rows, colsum, rb * kM, vb * kN, kept);
  }
}

// Programs of `kernel` resident on the device at once (SMs × blocks per SM), capped at `items`.
template <class Kernel>
unsigned persistent_grid(Kernel kernel, int device, int64_t items) {
  int sms = 1, per_sm = 1;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0);
  const int64_t programs = (int64_t)sms * (per_sm > 0 ? per_sm : 1);
  return (unsigned)(items < programs ? items : programs);
}

// f(std::bool_constant<VEC>, std::bool_constant<TF32>): TF32 only matters for fp32 (fp16/bf16 tiles always
// run on tensor cores), so those get one instantiation.
template <typename T, class F>
void dispatch_tiles(bool vec, bool tf32, F&& f) {
  if constexpr (sizeof(T) == 2) {
    vec ? f(std::true_type{}, std::false_type{}) : f(std::false_type{}, std::false_type{});
  } else if (tf32) {
    vec ? f(std::true_type{}, std::true_type{}) : f(std::false_type{}, std::true_type{});
  } else {
    vec ? f(std::true_type{}, std::false_type{}) : f(std::false_type{}, std::false_type{});
  }
}

template <typename T>
LceArgs<T> lce_args(const void* h, const void* w, const void* bias, const int64_t* y, const int64_t* order,
                    const int64_t* kept, int64_t rows, int64_t vocab, int64_t dim, float eps, float z) {
  return {static_cast<const T*>(h), static_cast<const T*>(w), static_cast<const T*>(bias), y, order, kept,
          rows, vocab, dim, eps, z};
}

// Whether the H and W chunks can be loaded 16 bytes at a time (row pitches and bases 16-byte aligned).
template <typename T>
bool tiles_vec_ok(const LceArgs<T>& a) {
  return vec16_ok(a.h, a.dim) && vec16_ok(a.w, a.dim);
}

}  // namespace ce
}  // namespace mmfast

using namespace mmfast;

// cross_entropy forward: x (rows, vocab) of `dtype`, y (rows,) → loss (rows,) fp32, lse (rows,) fp64.
MMFAST_API int mmfast_cross_entropy_forward(int device, cudaStream_t stream, const void* x, const int64_t* y,
                                            float* loss, double* lse, int64_t rows, int64_t vocab, int dtype,
                                            float eps, float z) {
  if (rows <= 0) return 0;
  if (rows > 0x7FFFFFFF || vocab <= 0) return kInvalidArgument;  // a block per row at most: gridDim.x < 2^31
  DeviceScope scope(device);
  MMFAST_DISPATCH_DTYPE(dtype, T, {
    const T* xt = static_cast<const T*>(x);
    ce::dispatch_rows(vocab, vec16_ok(xt, vocab), [&](auto warps, auto vec) {
      ce::ce_forward_kernel<T, decltype(warps)::value, decltype(vec)::value>
          <<<ce::row_blocks(rows, decltype(warps)::value), ce::kThreads, 0, stream>>>(xt, y, loss, lse, rows, vocab,
                                                                                    eps, z);
    });
  });
  return launch_status();
}

// cross_entropy backward: the gradient of Σ_t row_weight_t·loss_t (row_weight fp32) into out (rows, vocab)
// of x's dtype, contiguous; out may be x.
MMFAST_API int mmfast_cross_entropy_grad(int device, cudaStream_t stream, const void* x, const int64_t* y,
                                         const float* row_weight, void* out, int64_t rows, int64_t vocab, int dtype,
                                         float eps, float z) {
  if (rows <= 0) return 0;
  if (rows > 0x7FFFFFFF || vocab <= 0) return kInvalidArgument;  // a block per row at most: gridDim.x < 2^31
  DeviceScope scope(device);
  MMFAST_DISPATCH_DTYPE(dtype, T, {
    const T* xt = static_cast<const T*>(x);
    T* ot = static_cast<T*>(out);
    const bool aligned = vec16_ok(xt, vocab) && vec16_ok(static_cast<const T*>(ot), vocab);
    ce::dispatch_rows(vocab, aligned, [&](auto warps, auto vec) {
      ce::ce_grad_kernel<T, decltype(warps)::value, decltype(vec)::value>
          <<<ce::row_blocks(rows, decltype(warps)::value), ce::kThreads, 0, stream>>>(xt, y, row_weight, ot, rows,
                                                                                    vocab, eps, z);
    });
  });
  return launch_status();
}

// linear_cross_entropy forward. h (rows, dim), w (vocab, dim), bias (vocab,) or NULL, all of `dtype`; y (rows,);
// order (rows,) and kept (1,) from the compaction; partials: 4 arrays of kM·max(cdiv(rows, kM), 2·target)
// entries (fp32, fp64, fp32, fp64); target: the work items wanted (≈ a few per SM); tf32: fp32 tiles on
// TF32 tensor cores (else exact fp32). → loss (rows,) fp32, lse (rows,) fp64.
MMFAST_API int mmfast_linear_cross_entropy_forward(int device, cudaStream_t stream, const void* h, const void* w,
                                                   const void* bias, const int64_t* y, const int64_t* order,
                                                   const int64_t* kept, float* part_max, double* part_sum,
                                                   float* part_xy, double* part_sum_x, float* loss, double* lse,
                                                   int64_t rows, int64_t vocab, int64_t dim, int64_t target, int dtype,
                                                   int tf32, float eps, float z) {
  if (rows <= 0) return 0;
  if (vocab <= 0 || dim <= 0 || target <= 0) return kInvalidArgument;
  DeviceScope scope(device);
  const ce::Partials part{part_max, part_sum, part_xy, part_sum_x};
  // Upper bound of the items (plan_splits' blocks × splits) for any kept count.
  const int64_t max_items = cdiv(rows, ce::kM) > 2 * target ? cdiv(rows, ce::kM) : 2 * target;
  MMFAST_DISPATCH_DTYPE(dtype, T, {
    const ce::LceArgs<T> a = ce::lce_args<T>(h, w, bias, y, order, kept, rows, vocab, dim, eps, z);
    ce::dispatch_tiles<T>(ce::tiles_vec_ok(a), tf32 != 0, [&](auto vec, auto tf) {
      auto kernel = ce::lce_forward_kernel<T, decltype(vec)::value, decltype(tf)::value>;
      kernel<<<ce::persistent_grid(kernel, device, max_items), ce::kThreads, 0, stream>>>(a, part, target);
    });
  });
  ce::lce_finish_kernel<<<(unsigned)cdiv(rows, ce::kThreads), ce::kThreads, 0, stream>>>(
      order, kept, part, loss, lse, rows, vocab, target, eps, z);
  return launch_status();
}

// linear_cross_entropy backward: the gradients of Σ_t row_weight_t·loss_t into dh (rows, dim), dw (vocab, dim)
// and db (vocab,) or NULL, fp32 and zeroed by the caller. lse (rows,) fp64 from the forward, row_weight
// (rows,) fp32. deterministic: the two owner sweeps (no atomics), else one sweep with fp32 reductions.
MMFAST_API int mmfast_linear_cross_entropy_backward(int device, cudaStream_t stream, const void* h, const void* w,
                                                    const void* bias, const int64_t* y, const int64_t* order,
                                                    const int64_t* kept, const double* lse, const float* row_weight,
                                                    float* dh, float* dw, float* db, int64_t rows, int64_t vocab,
                                                    int64_t dim, int dtype, int tf32, int deterministic, float eps,
                                                    float z) {
  if (rows <= 0) return 0;
  if (vocab <= 0 || dim <= 0) return kInvalidArgument;
  DeviceScope scope(device);
  const ce::LceGrads out{lse, row_weight, dh, dw, db};
  const int64_t row_blocks = cdiv(rows, ce::kM), vocab_blocks = cdiv(vocab, ce::kN);
  MMFAST_DISPATCH_DTYPE(dtype, T, {
    const ce::LceArgs<T> a = ce::lce_args<T>(h, w, bias, y, order, kept, rows, vocab, dim, eps, z);
    ce::dispatch_tiles<T>(ce::tiles_vec_ok(a), tf32 != 0, [&](auto vec, auto tf) {
      constexpr bool kVec = decltype(vec)::value, kTf32 = decltype(tf)::value;
      if (deterministic) {
        auto by_rows = ce::lce_backward_kernel<T, kVec, kTf32, ce::kOwnRows>;
        by_rows<<<ce::persistent_grid(by_rows, device, row_blocks), ce::kThreads, 0, stream>>>(a, out);
        auto by_vocab = ce::lce_backward_kernel<T, kVec, kTf32, ce::kOwnVocab>;
        by_vocab<<<ce::persistent_grid(by_vocab, device, vocab_blocks), ce::kThreads, 0, stream>>>(a, out);
      } else {
        auto fast = ce::lce_backward_kernel<T, kVec, kTf32, ce::kFast>;
        fast<<<ce::persistent_grid(fast, device, row_blocks * vocab_blocks), ce::kThreads, 0, stream>>>(a, out);
      }
    });
  });
  return launch_status();
}
