// The contrastive family's two primitives on CUDA (design.md §1.1; the contract: mmfast/contrastive/op.py,
// csrc/contrastive_cpu.h), over the logits Z = s·A·Bᵀ + b, A: (N, D), B: (M, D) row-major, never stored.
//
// stats (2·N·M·D FLOPs): a (P row programs × Q column splits) grid, as the triton backend's stats_grid.
//   Program (p, q) takes row blocks p, p + P, … (128 rows) against the columns of split q (whole 128-wide
//   tiles), merging each row's (max fp32, Σ exp fp64) online (sigmoid: Σ softplus(−t·Z) in fp64) and, with
//   cols, each tile's column (max, Σ exp) into the column partial it alone writes. Partials: rows (Q, N),
//   columns (P, M) (12 bytes each); merge_kernel folds them in fp64 in a fixed order → row (N,), col (M,).
//   Deterministic: one writer per partial slot, fixed tile and merge orders.
// grad (the row sweep, program (i, c) owning row block i (64 rows) and D-chunk c, walking every 128-wide
//   column tile): recomputes the tile of Z over all of D, forms G in fp32 (ds = Σ G∘(A·Bᵀ), db = Σ G in
//   per-program fp64 partials, chunk 0 only), stores G in shared memory (in T for half inputs, as PyTorch's
//   bf16 backward casts G; fp32 for fp32), then per 128-byte slab of its D-chunk: dA_slab += G·B_slab into
//   fp32 accumulators kept in shared memory for the whole walk (never read-modify-written in global memory;
//   written once, ×s, in T at the end) and, in the fast mode, dB_slab += s·Gᵀ·A_slab by fp32 atomics.
//   FLOPs: 2·N·M·D per D-chunk (Z) + 2·N·M·D (dA) + 2·N·M·D (dB).
//   The D-chunk exists because dA's accumulators (64 × D fp32) must fit in shared memory next to the
//   staging: one chunk up to D = 576 on an H100/H200 (227 KB per block), 320 on an A100 (bf16); a second
//   chunk costs one more Z (8·N·M·D backward: design.md's budget); more only for wider D on smaller GPUs.
//   When the row blocks fill at most half the GPU (one program per SM), D is split in two anyway: two
//   programs per row block, each doing 4 of the 6 units, finish sooner than one doing all 6.
// Deterministic mode (grad's db pointer instead of db32): the row sweep leaves dB out, and the column
//   sweep (the same kernel, COLUMNS: program (j, c) owning 64 columns of B, walking every 128-row tile of
//   A, Zᵀ recomputed) keeps dB on chip as the row sweep does dA: 10·N·M·D with the forward, no atomics.
//
// Precision: bf16/fp16 on tensor cores (mma.sync m16n8k16) with fp32 accumulation; fp32 inputs by TF32
// (m16n8k8) when torch allows it (the launcher's tf32 flag), else exact fp32 FMAs (warp_mma's three paths).
// Global offsets are int64 (N·D, N·M and P·M pass 2^31); inside a tile, int.
#include "common.cuh"
#include "mma.cuh"
#include "numerics.cuh"

#include <type_traits>

namespace mmfast {
namespace contrastive {

constexpr int kThreads = 256;  // 8 warps: enough mma.sync in flight per SM, the fragment shapes below
constexpr int kWarps = kThreads / 32;

// How many of a block's `block` rows (or columns) are real when `left` remain.
__device__ __forceinline__ int extent(int64_t left, int block) {
  return left < block ? static_cast<int>(left) : block;
}

// Shared-memory rows: a K slab of the logits GEMM is 64 bytes of each row (32 bf16/fp16 or 16 fp32
// elements: two m16n8k16 steps, and 3 stages of two 128-row slabs stay at 60 KB), a D slab of the
// gradient GEMMs 128 bytes (64 / 32 elements); each row is padded by 16 bytes so that the 8 rows an
// ldmatrix (or a TF32 fragment load) reads fall in distinct banks.
template <typename T>
struct Geometry {
  static constexpr int kBK = 64 / static_cast<int>(sizeof(T));
  static constexpr int kDS = 128 / static_cast<int>(sizeof(T));
  static constexpr int kPad = 16 / static_cast<int>(sizeof(T));
  static constexpr int kLdk = kBK + kPad;
  static constexpr int kLds = kDS + kPad;
};

// What both passes read: the features, the scalars (device pointers: they may require grad, so they are
// read in-kernel, no host sync), the sigmoid loss's positives.
template <typename T>
struct Problem {
  const T* a;               // (N, D)
  const T* b;               // (M, D)
  const float* scale;       // []
  const float* bias;        // [] or null
  const int64_t* pos;       // (N,) row i's positive column (out of [0, M): none), or null
  int64_t n, m, d;
  bool sigmoid;
};

// Runs `steps` steps of a STAGES-deep cp.async pipeline: load(step, stage) fills a stage (every thread
// calls it), compute(step, stage) reads it. A stage is refilled only after the __syncthreads that follows
// every warp's last read of it; the caller synchronises before reusing the stages for anything else.
template <int STAGES, class Load, class Compute>
__device__ __forceinline__ void pipeline(int steps, Load&& load, Compute&& compute) {
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < steps) load(s, s);
    cp_async_commit();  // empty groups too: the wait below counts groups
  }
  for (int k = 0; k < steps; ++k) {
    cp_async_wait<STAGES - 2>();  // step k's group has landed
    __syncthreads();              // … for every thread; and every warp is done with step k − 1's stage
    const int next = k + STAGES - 1;
    if (next < steps) load(next, next % STAGES);
    cp_async_commit();
    compute(k, k % STAGES);
  }
}

// acc = X_blk·Y_blkᵀ (unscaled logits, fp32) for this warp's 16·MI × 8·NI part of an XR × YR tile, over all
// of D in K slabs through a STAGES-deep pipeline; x, y point at the blocks' first rows, x_rows / y_rows of
// them are real (the rest, and columns past D, read as 0). stages: STAGES × (XR + YR) slab rows.
template <typename T, int XR, int YR, int MI, int NI, int STAGES, bool TF32, bool VEC>
__device__ __forceinline__ void logits_tile(float (&acc)[MI][NI][4], T* stages, const T* x, int x_rows, const T* y,
                                            int y_rows, int64_t d) {
  using G = Geometry<T>;
  constexpr int kWN = YR / (8 * NI);
  static_assert((XR / (16 * MI)) * kWN == kWarps, "the warps tile the block");
  constexpr int kStage = (XR + YR) * G::kLdk;
  const int warp = threadIdx.x / 32, wm = warp / kWN, wn = warp % kWN;
  zero(acc);
  pipeline<STAGES>(
      static_cast<int>(cdiv(d, G::kBK)),
      [&](int step, int stage) {
        T* s = stages + stage * kStage;
        const int64_t k0 = static_cast<int64_t>(step) * G::kBK;
        const int cols = extent(d - k0, G::kBK);
        load_tile<T, XR, G::kBK, kThreads, VEC>(s, G::kLdk, x + k0, d, x_rows, cols);
        load_tile<T, YR, G::kBK, kThreads, VEC>(s + XR * G::kLdk, G::kLdk, y + k0, d, y_rows, cols);
      },
      [&](int, int stage) {
        const T* s = stages + stage * kStage;
        warp_mma<T, MI, NI, true, true, TF32>(acc, s + wm * 16 * MI * G::kLdk, G::kLdk,
                                              s + (XR + wn * 8 * NI) * G::kLdk, G::kLdk, G::kBK);
      });
}

// ---- stats --------------------------------------------------------------------------------------------

// 128 × 128 tiles, warps 4 × 2 of 32 × 64 (MI = 2, NI = 8): 64 fp32 accumulators per thread, and only
// 4 rows per thread whose running statistics live across the column walk (a wider warp tile in rows
// would hold 8). One block of 8 warps per SM: the unrolled epilogue (expf, softplus, fp64 merges) takes
// ptxas to ~240 registers; capped at 128 (two blocks per SM) it spills.
constexpr int kStatsRows = 128, kStatsCols = 128, kStatsMI = 2, kStatsNI = 8, kStatsWN = 2;
constexpr int kStatsWM = kWarps / kStatsWN;
constexpr int kStatsStages = 3;

template <typename T>
struct StatsGeometry {
  static constexpr int kStaging =
      kStatsStages * (kStatsRows + kStatsCols) * Geometry<T>::kLdk * static_cast<int>(sizeof(T));
  // + the rows' exchange between the 2 column warps (Lse, 16 bytes) and the columns' between the 4 row
  // warps ((max, Σ exp) as float2).
  static constexpr int kBytes = kStaging + kStatsWN * kStatsRows * static_cast<int>(sizeof(Lse)) +
                                kStatsWM * kStatsCols * static_cast<int>(sizeof(float2));
};

struct StatsOut {
  float* row_max;   // (Q, N), softmax only
  double* row_sum;  // (Q, N)
  float* col_max;   // (P, M), or null without column statistics
  double* col_sum;  // (P, M)
};

// Two partial row states as one: the online logsumexp merge, or (sigmoid) a plain fp64 sum.
__device__ __forceinline__ Lse combine(Lse x, Lse y, bool sigmoid) {
  return sigmoid ? Lse{x.max, x.sum + y.sum} : lse_merge(x, y);
}

__device__ __forceinline__ Lse shfl_xor(Lse v, int mask) {
  return {__shfl_xor_sync(0xffffffffu, v.max, mask), __shfl_xor_sync(0xffffffffu, v.sum, mask)};
}

template <typename T, bool TF32, bool VEC>
__global__ void __launch_bounds__(kThreads, 1) stats_kernel(Problem<T> p, int64_t split_width, StatsOut out) {
  extern __shared__ __align__(16) unsigned char smem[];
  T* stages = reinterpret_cast<T*>(smem);
  Lse* row_part = reinterpret_cast<Lse*>(smem + StatsGeometry<T>::kStaging);  // [kStatsWN][kStatsRows]
  float2* col_part = reinterpret_cast<float2*>(row_part + kStatsWN * kStatsRows);  // [kStatsWM][kStatsCols]
  const int warp = threadIdx.x / 32, wm = warp / kStatsWN, wn = warp % kStatsWN;
  const int lane = lane_id(), g = lane >> 2, t = lane & 3;
  const float s = *p.scale, bias = p.bias != nullptr ? *p.bias : 0.f;
  const bool with_cols = out.col_max != nullptr;
  const int64_t col_begin = blockIdx.y * split_width, col_end = min(p.m, col_begin + split_width);
  const int64_t row_blocks = cdiv(p.n, kStatsRows);

  for (int64_t rb = blockIdx.x; rb < row_blocks; rb += gridDim.x) {
    const int64_t row0 = rb * kStatsRows;
    const int rows = extent(p.n - row0, kStatsRows);
    Lse state[kStatsMI][2];  // this thread's rows 32·wm + 16·mi + g + 8·h, over its columns so far
#pragma unroll
    for (int mi = 0; mi < kStatsMI; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) state[mi][h] = lse_empty();

    for (int64_t col0 = col_begin; col0 < col_end; col0 += kStatsCols) {
      const int cols = extent(col_end - col0, kStatsCols);
      float z[kStatsMI][kStatsNI][4];
      __syncthreads();  // the previous tile's readers of the stages and of col_part are done
      logits_tile<T, kStatsRows, kStatsCols, kStatsMI, kStatsNI, kStatsStages, TF32, VEC>(
          z, stages, p.a + row0 * p.d, rows, p.b + col0 * p.d, cols, p.d);

      // Z in place; −inf outside the block's rows and the split's columns (exp and softplus give 0 there).
      // Sigmoid: −t·Z, i.e. Z negated at the row's positive, whose loss term is softplus(−Z).
#pragma unroll
      for (int mi = 0; mi < kStatsMI; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = wm * 32 + 16 * mi + g + 8 * h;
          // The positive's column relative to the tile, −1 for none. The subtraction is modular (unsigned):
          // pos − col0 in int64 overflows for a "none" value near INT64_MIN (UB), and a wrapped difference
          // equals a tile column c only if pos = col0 + c exactly, so out-of-range values still match nothing.
          const int64_t positive =
              (p.sigmoid && p.pos != nullptr && r < rows)
                  ? static_cast<int64_t>(static_cast<uint64_t>(p.pos[row0 + r]) - static_cast<uint64_t>(col0))
                  : -1;
#pragma unroll
          for (int ni = 0; ni < kStatsNI; ++ni)
#pragma unroll
            for (int l = 0; l < 2; ++l) {
              const int c = wn * 64 + 8 * ni + 2 * t + l;
              float& v = z[mi][ni][2 * h + l];
              if (r < rows && c < cols) {
                v = fmaf(s, v, bias);
                if (c == positive) v = -v;
              } else {
                v = -INFINITY;
              }
            }
        }

      // The rows: this tile's part of each of the thread's rows, merged into its running state.
#pragma unroll
      for (int mi = 0; mi < kStatsMI; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          Lse tile;
          if (p.sigmoid) {
            float sum = 0.f;
#pragma unroll
            for (int ni = 0; ni < kStatsNI; ++ni)
#pragma unroll
              for (int l = 0; l < 2; ++l) sum += softplus(z[mi][ni][2 * h + l]);
            tile = {0.f, static_cast<double>(sum)};
          } else {
            float mx = -INFINITY;
#pragma unroll
            for (int ni = 0; ni < kStatsNI; ++ni)
#pragma unroll
              for (int l = 0; l < 2; ++l) mx = nan_max(mx, z[mi][ni][2 * h + l]);
            const float ref = mx == -INFINITY ? 0.f : mx;  // an all-padding row part: exp(−inf) = 0
            float sum = 0.f;
#pragma unroll
            for (int ni = 0; ni < kStatsNI; ++ni)
#pragma unroll
              for (int l = 0; l < 2; ++l) sum += expf(z[mi][ni][2 * h + l] - ref);
            tile = {mx, static_cast<double>(sum)};
          }
          state[mi][h] = combine(state[mi][h], tile, p.sigmoid);
        }

      if (!with_cols) continue;  // uniform across the block
      // The columns: each warp's (max, Σ exp) over its 32 rows (the 8 lanes of a column share it by
      // shuffles), the 4 row warps' pairs merged per column in a fixed order, then into this program's
      // partial slot (written by this program alone, by the same thread at every tile).
#pragma unroll
      for (int ni = 0; ni < kStatsNI; ++ni)
#pragma unroll
        for (int l = 0; l < 2; ++l) {
          float mx = -INFINITY;
#pragma unroll
          for (int mi = 0; mi < kStatsMI; ++mi)
#pragma unroll
            for (int h = 0; h < 2; ++h) mx = nan_max(mx, z[mi][ni][2 * h + l]);
#pragma unroll
          for (int mask = 4; mask < 32; mask <<= 1) mx = nan_max(mx, __shfl_xor_sync(0xffffffffu, mx, mask));
          const float ref = mx == -INFINITY ? 0.f : mx;
          float sum = 0.f;
#pragma unroll
          for (int mi = 0; mi < kStatsMI; ++mi)
#pragma unroll
            for (int h = 0; h < 2; ++h) sum += expf(z[mi][ni][2 * h + l] - ref);
#pragma unroll
          for (int mask = 4; mask < 32; mask <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, mask);
          if (g == 0) col_part[wm * kStatsCols + wn * 64 + 8 * ni + 2 * t + l] = make_float2(mx, sum);
        }
      __syncthreads();
      const int c = threadIdx.x;
      if (c < cols) {
        Lse merged = lse_empty();
        for (int w = 0; w < kStatsWM; ++w) {
          const float2 part = col_part[w * kStatsCols + c];
          merged = lse_merge(merged, Lse{part.x, static_cast<double>(part.y)});
        }
        const int64_t slot = static_cast<int64_t>(blockIdx.x) * p.m + col0 + c;
        if (rb != blockIdx.x) merged = lse_merge(Lse{out.col_max[slot], out.col_sum[slot]}, merged);
        out.col_max[slot] = merged.max;
        out.col_sum[slot] = merged.sum;
      }
    }

    // The row block's rows: the 4 lanes of a row (shuffles), then the 2 column warps in a fixed order.
    __syncthreads();  // the previous row block's readers of row_part are done
#pragma unroll
    for (int mi = 0; mi < kStatsMI; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        Lse v = state[mi][h];
        v = combine(v, shfl_xor(v, 1), p.sigmoid);
        v = combine(v, shfl_xor(v, 2), p.sigmoid);
        if (t == 0) row_part[wn * kStatsRows + wm * 32 + 16 * mi + g + 8 * h] = v;
      }
    __syncthreads();
    const int r = threadIdx.x;
    if (r < rows) {
      Lse v = row_part[r];
      for (int w = 1; w < kStatsWN; ++w) v = combine(v, row_part[w * kStatsRows + r], p.sigmoid);
      const int64_t slot = static_cast<int64_t>(blockIdx.y) * p.n + row0 + r;
      if (!p.sigmoid) out.row_max[slot] = v.max;
      out.row_sum[slot] = v.sum;
    }
  }
}

// out_j from the (parts, L) partials of entry j, folded in the order p = 0, 1, …: logsumexp: of the
// (max, Σ exp) pairs (−inf over no parts, NaN if any part is NaN); else (sigmoid) the fp64 sum.
__global__ void __launch_bounds__(kThreads) merge_kernel(const float* mx, const double* sum, double* out,
                                                         int64_t parts, int64_t length, bool logsumexp) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= length) return;
  if (!logsumexp) {
    double total = 0.0;
    for (int64_t q = 0; q < parts; ++q) total += sum[q * length + j];
    out[j] = total;
    return;
  }
  Lse merged = lse_empty();
  for (int64_t q = 0; q < parts; ++q) merged = lse_merge(merged, Lse{mx[q * length + j], sum[q * length + j]});
  out[j] = lse_value(merged);
}

// ---- grad ---------------------------------------------------------------------------------------------

// The owner block is 64 rows (of A in the row sweep, of B in the column sweep), the walked tiles 128: the
// Z tile is 32 accumulators per thread (warps 2 × 4 of 32 × 32), G 16 KB (bf16) / 33 KB (fp32), and 64
// owner rows leave most of the shared memory to the owner's gradient accumulators (64 × chunk fp32).
constexpr int kOwn = 64, kWalk = 128, kGradMI = 2, kGradNI = 4;
constexpr int kGradStages = 3;  // the Z GEMM's K slabs
constexpr int kSlabStages = 2;  // the D slabs of the gradient GEMMs (a D-chunk is a few slabs)

constexpr int cmax(int x, int y) { return x > y ? x : y; }

template <typename T>
struct GradGeometry {
  using G = Geometry<T>;
  // dX_slab (64 × kDS) += G·Y_slab: warps 2 × 4 of 32 × kDS/4.
  static constexpr int kDxNI = G::kDS / 4 / 8;
  // dY_slab (128 × kDS) = Gᵀ·X_slab: warps 4 × 2 of 32 × kDS/2.
  static constexpr int kDyNI = G::kDS / 2 / 8;
  static constexpr int kLdg = kWalk + G::kPad;  // G's row pitch
  static constexpr int kStaging = cmax(kGradStages * (kOwn + kWalk) * G::kLdk, kSlabStages * (kOwn + kWalk) * G::kLds) *
                                  static_cast<int>(sizeof(T));
  static constexpr int kGBytes = kOwn * kLdg * static_cast<int>(sizeof(T));
  static constexpr int kSumsBytes = kWarps * 2 * static_cast<int>(sizeof(double));
  static constexpr int kFixed = kStaging + kGBytes + kSumsBytes;  // + 4 · 64 · chunk for dX
  // dX's accumulators per thread per D slab, as float2 pairs (a fragment's two adjacent columns).
  static constexpr int kDxPairs = kGradMI * kDxNI * 2;
};

struct GradArgs {
  const double* row;  // r (N), softmax only
  const double* col;  // c (M), or null (no column term)
  const float* wr;    // ∂L/∂row (N)
  const float* wc;    // ∂L/∂col (M), with col
  void* dx;           // the owner side's gradient in T, (rows, D): dA in the row sweep, dB in the column sweep; or null
  float* dy;          // the walked side's gradient, fp32, by atomics (row sweep, fast mode), or null
  double* sums;       // (row blocks, 2): Σ G∘(A·Bᵀ), Σ G per row-sweep program; null in the column sweep
  int64_t chunk;      // D columns per program (a multiple of kDS); blockIdx.y picks the chunk
};

// A row's or a column's terms of G: its weight (wr_i or wc_j; 0 for no column term), its statistic as
// hi + lo (r_i or c_j; softmax), and (rows, sigmoid) its positive column.
struct Terms {
  float w;
  HiLo stat;
  int64_t pos;
};

__device__ __forceinline__ Terms row_terms(const GradArgs& g, bool sigmoid, const int64_t* pos, int64_t i, int64_t n) {
  if (i >= n) return {0.f, {0.f, 0.f}, -1};
  return {g.wr[i], sigmoid ? HiLo{0.f, 0.f} : split(g.row[i]), pos != nullptr ? pos[i] : -1};
}

__device__ __forceinline__ Terms col_terms(const GradArgs& g, int64_t j, int64_t m) {
  if (j >= m || g.col == nullptr) return {0.f, {0.f, 0.f}, -1};
  return {g.wc[j], split(g.col[j]), -1};
}

// G_ij for z = Z_ij (numerics.cuh): softmax wr·e^(z − r) + wc·e^(z − c); sigmoid −t·wr·σ(−t·z).
// The column term is added whenever there is one (with_col), even where wc = 0, as the CPU and triton
// backends do: a NaN column statistic then gives NaN (0·NaN), not a silently finite G (softmax_grad
// would skip wc = 0).
__device__ __forceinline__ float gradient(float z, const Terms& row, const Terms& col, int64_t j, bool sigmoid,
                                          bool with_col) {
  if (sigmoid) return sigmoid_grad(z, row.pos == j ? 1.f : -1.f, row.w);
  float g = row.w * exp_minus(z, row.stat);
  if (with_col) g += col.w * exp_minus(z, col.stat);
  return g;
}

// dX's accumulators of D slab `slab`, mi, ni, h of this thread: float2 pairs laid out thread-fastest, so
// every access is conflict-free and each thread touches only its own (no synchronisation needed).
__device__ __forceinline__ int dx_index(int slab, int mi, int ni, int h, int pairs_per_slab, int ni_count) {
  return ((slab * pairs_per_slab + (mi * ni_count + ni) * 2 + h) * kThreads) + threadIdx.x;
}

template <typename T, bool TF32, bool VEC, bool COLUMNS>
__global__ void __launch_bounds__(kThreads, 1) grad_kernel(Problem<T> p, GradArgs args) {
  using G = Geometry<T>;
  using GG = GradGeometry<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  T* stages = reinterpret_cast<T*>(smem);
  T* sg = reinterpret_cast<T*>(smem + GG::kStaging);  // G (64 × 128): [own row][walked column]
  double* sums_part = reinterpret_cast<double*>(smem + GG::kStaging + GG::kGBytes);  // [kWarps][2]
  float2* dx_acc = reinterpret_cast<float2*>(smem + GG::kFixed);

  const int warp = threadIdx.x / 32, lane = lane_id(), g = lane >> 2, t = lane & 3;
  const float s = *p.scale, bias = p.bias != nullptr ? *p.bias : 0.f;
  const int64_t* pos = p.sigmoid ? p.pos : nullptr;
  // Row sweep: X = A (owned), Y = B (walked); column sweep: X = B, Y = A.
  const T* x = COLUMNS ? p.b : p.a;
  const T* y = COLUMNS ? p.a : p.b;
  const int64_t nx = COLUMNS ? p.m : p.n, ny = COLUMNS ? p.n : p.m;
  const int64_t x0 = static_cast<int64_t>(blockIdx.x) * kOwn;
  const int x_rows = extent(nx - x0, kOwn);
  const int64_t d0 = blockIdx.y * args.chunk, d1 = min(p.d, d0 + args.chunk);
  const int slabs = d1 > d0 ? static_cast<int>(cdiv(d1 - d0, G::kDS)) : 0;
  const bool with_slabs = slabs > 0 && (args.dx != nullptr || args.dy != nullptr);

  // dX starts at 0 (this thread's accumulators only).
  if (args.dx != nullptr)
    for (int i = 0; i < slabs * GG::kDxPairs; ++i) dx_acc[i * kThreads + threadIdx.x] = make_float2(0.f, 0.f);

  double sum_gp = 0.0, sum_g = 0.0;  // this thread's Σ G∘(A·Bᵀ), Σ G
  const int64_t walk_blocks = cdiv(ny, kWalk);
  for (int64_t step = 0; step < walk_blocks; ++step) {
    // Each program starts at another tile, so that concurrent dY atomics mostly hit different rows.
    const int64_t y0 = (step + blockIdx.x) % walk_blocks * kWalk;
    const int y_rows = extent(ny - y0, kWalk);
    const T* x_blk = x + x0 * p.d;
    const T* y_blk = y + y0 * p.d;
    float acc[kGradMI][kGradNI][4];
    __syncthreads();  // the previous tile's readers of the stages and of G are done
    logits_tile<T, kOwn, kWalk, kGradMI, kGradNI, kGradStages, TF32, VEC>(acc, stages, x_blk, x_rows, y_blk, y_rows,
                                                                           p.d);

    // G (fp32) from the unscaled logits P = acc: its sums, and its copy in shared memory (0 outside the
    // matrix, so that the padding adds nothing to the GEMMs below).
    {
      const int wm = warp / 4, wn = warp % 4;
      Terms own[kGradMI][2], walked[kGradNI][2];
#pragma unroll
      for (int mi = 0; mi < kGradMI; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int64_t i = x0 + wm * 32 + 16 * mi + g + 8 * h;
          own[mi][h] = COLUMNS ? col_terms(args, i, p.m) : row_terms(args, p.sigmoid, pos, i, p.n);
        }
#pragma unroll
      for (int ni = 0; ni < kGradNI; ++ni)
#pragma unroll
        for (int l = 0; l < 2; ++l) {
          const int64_t j = y0 + wn * 32 + 8 * ni + 2 * t + l;
          walked[ni][l] = COLUMNS ? row_terms(args, p.sigmoid, pos, j, p.n) : col_terms(args, j, p.m);
        }
      float tile_gp = 0.f, tile_g = 0.f;
#pragma unroll
      for (int mi = 0; mi < kGradMI; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int ni = 0; ni < kGradNI; ++ni)
#pragma unroll
            for (int l = 0; l < 2; ++l) {
              const int r = wm * 32 + 16 * mi + g + 8 * h, c = wn * 32 + 8 * ni + 2 * t + l;
              const float pv = acc[mi][ni][2 * h + l];
              float gv = 0.f;
              if (r < x_rows && c < y_rows) {
                const Terms& row = COLUMNS ? walked[ni][l] : own[mi][h];
                const Terms& col = COLUMNS ? own[mi][h] : walked[ni][l];
                gv = gradient(fmaf(s, pv, bias), row, col, COLUMNS ? x0 + r : y0 + c, p.sigmoid, args.col != nullptr);
              }
              tile_gp += gv * pv;
              tile_g += gv;
              sg[r * GG::kLdg + c] = from_float<T>(gv);
            }
      sum_gp += tile_gp;
      sum_g += tile_g;
    }
    __syncthreads();  // G is complete; every warp is done with the logits' stages (reused below)
    if (!with_slabs) continue;

    // Per D slab of the chunk: dX_slab += G·Y_slab (kept on chip), dY_slab += s·Gᵀ·X_slab (atomics).
    constexpr int kSlabStage = (kWalk + kOwn) * G::kLds;
    pipeline<kSlabStages>(
        slabs,
        [&](int slab, int stage) {
          T* sy = stages + stage * kSlabStage;
          const int64_t k0 = d0 + static_cast<int64_t>(slab) * G::kDS;
          const int cols = extent(p.d - k0, G::kDS);
          load_tile<T, kWalk, G::kDS, kThreads, VEC>(sy, G::kLds, y_blk + k0, p.d, y_rows, cols);
          if (args.dy != nullptr)
            load_tile<T, kOwn, G::kDS, kThreads, VEC>(sy + kWalk * G::kLds, G::kLds, x_blk + k0, p.d, x_rows, cols);
        },
        [&](int slab, int stage) {
          const T* sy = stages + stage * kSlabStage;
          if (args.dx != nullptr) {
            // A = G (own row, walked column: k-major), B = Y_slab (d, walked row: stored [k][d]).
            const int wm = warp / 4, wn = warp % 4;
            float dx[kGradMI][GG::kDxNI][4];
#pragma unroll
            for (int mi = 0; mi < kGradMI; ++mi)
#pragma unroll
              for (int ni = 0; ni < GG::kDxNI; ++ni)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                  const float2 v = dx_acc[dx_index(slab, mi, ni, h, GG::kDxPairs, GG::kDxNI)];
                  dx[mi][ni][2 * h] = v.x;
                  dx[mi][ni][2 * h + 1] = v.y;
                }
            warp_mma<T, kGradMI, GG::kDxNI, true, false, TF32>(dx, sg + wm * 32 * GG::kLdg, GG::kLdg,
                                                                sy + wn * (G::kDS / 4), G::kLds, kWalk);
#pragma unroll
            for (int mi = 0; mi < kGradMI; ++mi)
#pragma unroll
              for (int ni = 0; ni < GG::kDxNI; ++ni)
#pragma unroll
                for (int h = 0; h < 2; ++h)
                  dx_acc[dx_index(slab, mi, ni, h, GG::kDxPairs, GG::kDxNI)] =
                      make_float2(dx[mi][ni][2 * h], dx[mi][ni][2 * h + 1]);
          }
          if (args.dy != nullptr) {
            // A = Gᵀ (walked column, own row: G is stored [k][m]), B = X_slab (d, own row: stored [k][d]).
            const int wm = warp / 2, wn = warp % 2;
            float dy[kGradMI][GG::kDyNI][4];
            zero(dy);
            warp_mma<T, kGradMI, GG::kDyNI, false, false, TF32>(dy, sg + wm * 32, GG::kLdg,
                                                                sy + kWalk * G::kLds + wn * (G::kDS / 2), G::kLds, kOwn);
            const int64_t k0 = d0 + static_cast<int64_t>(slab) * G::kDS + wn * (G::kDS / 2);
#pragma unroll
            for (int mi = 0; mi < kGradMI; ++mi)
#pragma unroll
              for (int ni = 0; ni < GG::kDyNI; ++ni)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                  const int r = wm * 32 + frag_row(mi, e);
                  const int64_t k = k0 + frag_col(ni, e);
                  if (r < y_rows && k < p.d) atomicAdd(args.dy + (y0 + r) * p.d + k, s * dy[mi][ni][e]);
                }
          }
        });
  }

  // dX = s · the accumulators, in T, written once.
  if (args.dx != nullptr) {
    T* dx = static_cast<T*>(args.dx);
    const int wm = warp / 4, wn = warp % 4;
    for (int slab = 0; slab < slabs; ++slab)
#pragma unroll
      for (int mi = 0; mi < kGradMI; ++mi)
#pragma unroll
        for (int ni = 0; ni < GG::kDxNI; ++ni)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const float2 v = dx_acc[dx_index(slab, mi, ni, h, GG::kDxPairs, GG::kDxNI)];
            const int r = wm * 32 + frag_row(mi, 2 * h);
            const int64_t k = d0 + static_cast<int64_t>(slab) * G::kDS + wn * (G::kDS / 4) + frag_col(ni, 0);
            if (r >= x_rows) continue;
            T* out = dx + (x0 + r) * p.d + k;
            if (k < p.d) out[0] = from_float<T>(s * v.x);
            if (k + 1 < p.d) out[1] = from_float<T>(s * v.y);
          }
  }

  // ds and db partials: warp shuffles, then the 8 warps in order (chunk 0 of the row sweep only).
  if (args.sums != nullptr && blockIdx.y == 0) {
#pragma unroll
    for (int mask = 1; mask < 32; mask <<= 1) {
      sum_gp += __shfl_xor_sync(0xffffffffu, sum_gp, mask);
      sum_g += __shfl_xor_sync(0xffffffffu, sum_g, mask);
    }
    if (lane == 0) {
      sums_part[2 * warp] = sum_gp;
      sums_part[2 * warp + 1] = sum_g;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      double gp = 0.0, gs = 0.0;
      for (int w = 0; w < kWarps; ++w) gp += sums_part[2 * w], gs += sums_part[2 * w + 1];
      args.sums[2 * blockIdx.x] = gp;
      args.sums[2 * blockIdx.x + 1] = gs;
    }
  }
}

// ---- launchers ----------------------------------------------------------------------------------------

// Calls f(std::integral_constant<bool, TF32>) with TF32 only for fp32 inputs (half inputs ignore the flag).
template <typename T, class F>
int with_precision(bool tf32, F&& f) {
  if constexpr (std::is_same_v<T, float>) {
    if (tf32) return f(std::true_type{});
  }
  return f(std::false_type{});
}

// Launches `kernel` over `grid` with `bytes` of dynamic shared memory (opted in: past 48 KB).
template <class Kernel, class... Args>
int launch(Kernel kernel, dim3 grid, int bytes, cudaStream_t stream, Args... args) {
  const cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (status != cudaSuccess) return static_cast<int>(status);
  kernel<<<grid, kThreads, bytes, stream>>>(args...);
  return launch_status();
}

template <typename T, bool TF32>
int run_stats(cudaStream_t stream, const Problem<T>& p, int64_t programs, int64_t splits, int64_t width,
              const StatsOut& out) {
  if (programs == 0 || splits == 0) return 0;
  const dim3 grid(static_cast<unsigned>(programs), static_cast<unsigned>(splits));
  if (vec16_ok(p.a, p.d) && vec16_ok(p.b, p.d))
    return launch(stats_kernel<T, TF32, true>, grid, StatsGeometry<T>::kBytes, stream, p, width, out);
  return launch(stats_kernel<T, TF32, false>, grid, StatsGeometry<T>::kBytes, stream, p, width, out);
}

int run_merge(cudaStream_t stream, const float* mx, const double* sum, double* out, int64_t parts, int64_t length,
              bool logsumexp) {
  if (length == 0) return 0;
  merge_kernel<<<static_cast<unsigned>(cdiv(length, kThreads)), kThreads, 0, stream>>>(mx, sum, out, parts, length,
                                                                                       logsumexp);
  return launch_status();
}

// One sweep of the gradient: COLUMNS = false the row sweep over cdiv(N, 64) row blocks, true the column
// sweep over cdiv(M, 64) column blocks; args.dx (on chip, chunked) and args.dy, args.sums as given.
template <typename T, bool TF32, bool COLUMNS>
int run_sweep(int device, cudaStream_t stream, const Problem<T>& p, GradArgs args) {
  using G = Geometry<T>;
  using GG = GradGeometry<T>;
  const int64_t owners = cdiv(COLUMNS ? p.m : p.n, kOwn);
  if (owners == 0) return 0;
  int smem_limit = 0, sms = 0;
  cudaError_t status = cudaDeviceGetAttribute(&smem_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (status == cudaSuccess) status = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (status != cudaSuccess) return static_cast<int>(status);
  // D in whole slabs, split into chunks whose dX accumulators fit next to the fixed shared memory.
  const int64_t need = cdiv(p.d, G::kDS) * G::kDS;
  int64_t chunks = 1;
  if (args.dx != nullptr && need > 0) {
    const int64_t cap = (smem_limit - GG::kFixed) / (4 * kOwn) / G::kDS * G::kDS;
    if (cap < G::kDS) return kInvalidArgument;  // never on sm_80 and later (≥ 99 KB per block)
    chunks = cdiv(need, cap);
    if (chunks == 1 && 2 * owners <= sms && need >= 2 * G::kDS) chunks = 2;  // fill the GPU (see the top)
  }
  args.chunk = need > 0 ? cdiv(cdiv(need, chunks), G::kDS) * G::kDS : 0;
  chunks = args.chunk > 0 ? cdiv(need, args.chunk) : 1;
  const int bytes = GG::kFixed + (args.dx != nullptr ? static_cast<int>(4 * kOwn * args.chunk) : 0);
  const dim3 grid(static_cast<unsigned>(owners), static_cast<unsigned>(chunks));
  if (vec16_ok(p.a, p.d) && vec16_ok(p.b, p.d))
    return launch(grad_kernel<T, TF32, true, COLUMNS>, grid, bytes, stream, p, args);
  return launch(grad_kernel<T, TF32, false, COLUMNS>, grid, bytes, stream, p, args);
}

}  // namespace contrastive
}  // namespace mmfast

// Statistics of Z = s·a·bᵀ + bias (see the top of this file). a: (n, d), b: (m, d) contiguous, of dtype
// code `dtype`; scale, bias: device fp32 scalars (bias may be null); positives: (n,) int64 or null
// (sigmoid only). Grid: row_programs × splits, column split `split_width` (a multiple of 128).
// Workspaces: row_max (splits, n) fp32 (softmax), row_sum (splits, n) fp64, col_max / col_sum
// (row_programs, m) fp32 / fp64 (with_cols). Outputs: row (n,) fp64; col (m,) fp64 with_cols.
MMFAST_API int mmfast_contrastive_stats(int device, cudaStream_t stream, int dtype, const void* a, const void* b,
                                        const float* scale, const float* bias, const int64_t* positives, int64_t n,
                                        int64_t m, int64_t d, int64_t row_programs, int64_t splits,
                                        int64_t split_width, int sigmoid, int with_cols, int tf32, float* row_max,
                                        double* row_sum, float* col_max, double* col_sum, double* row, double* col) {
  using namespace mmfast::contrastive;
  // Every program's first row block is its own index (it starts its column partials there), and the
  // splits cover every column.
  if (split_width <= 0 || split_width % kStatsCols != 0 || row_programs > mmfast::cdiv(n, kStatsRows) ||
      splits * split_width < m)
    return mmfast::kInvalidArgument;
  mmfast::DeviceScope scope(device);
  const bool cols = with_cols && !sigmoid;
  MMFAST_DISPATCH_DTYPE(dtype, T, {
    const Problem<T> p{static_cast<const T*>(a), static_cast<const T*>(b), scale, bias, positives, n, m, d,
                       sigmoid != 0};
    const StatsOut out{row_max, row_sum, cols ? col_max : nullptr, col_sum};
    const int status = with_precision<T>(tf32 != 0, [&](auto precision) {
      return run_stats<T, decltype(precision)::value>(stream, p, row_programs, splits, split_width, out);
    });
    if (status != 0) return status;
  });
  int status = run_merge(stream, row_max, row_sum, row, splits, n, !sigmoid);
  if (status == 0 && cols) status = run_merge(stream, col_max, col_sum, col, row_programs, m, true);
  return status;
}

// The gradient pass (see the top of this file): a, b, scale, bias, positives as for stats; row (n,) and
// col (m,) or null: the fp64 statistics; grad_row (n,), grad_col (m,) or null: fp32 weights. Outputs, each
// optional (null: not needed): da (n, d) in the input dtype; db (m, d) in the input dtype, written by the
// deterministic column sweep, or db32 (m, d) fp32, zero-filled by the caller, added into by atomics (at
// most one of db, db32). sums: (cdiv(n, 64), 2) fp64, each row-sweep program's (Σ G∘(a·bᵀ), Σ G).
MMFAST_API int mmfast_contrastive_grad(int device, cudaStream_t stream, int dtype, const void* a, const void* b,
                                       const float* scale, const float* bias, const int64_t* positives,
                                       const double* row, const double* col, const float* grad_row,
                                       const float* grad_col, int64_t n, int64_t m, int64_t d, int sigmoid, int tf32,
                                       void* da, void* db, float* db32, double* sums) {
  using namespace mmfast::contrastive;
  if (db != nullptr && db32 != nullptr) return mmfast::kInvalidArgument;
  mmfast::DeviceScope scope(device);
  MMFAST_DISPATCH_DTYPE(dtype, T, {
    const Problem<T> p{static_cast<const T*>(a), static_cast<const T*>(b), scale, bias, positives, n, m, d,
                       sigmoid != 0};
    const GradArgs rows{row, sigmoid ? nullptr : col, grad_row, grad_col, da, db32, sums, 0};
    const GradArgs columns{row, sigmoid ? nullptr : col, grad_row, grad_col, db, nullptr, nullptr, 0};
    return with_precision<T>(tf32 != 0, [&](auto precision) {
      constexpr bool kTF32 = decltype(precision)::value;
      int status = run_sweep<T, kTF32, false>(device, stream, p, rows);
      if (status == 0 && db != nullptr) status = run_sweep<T, kTF32, true>(device, stream, p, columns);
      return status;
    });
  });
  return 0;
}
