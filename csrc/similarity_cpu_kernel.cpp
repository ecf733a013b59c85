// Tile kernels of the similarity family (similarity_cpu.h). Compiled once per instruction set
// (CMakeLists.txt); CPU_CAPABILITY names the set and the namespace.
#include "similarity_cpu.h"
#include "numerics.cuh"  // kernels/: top-k's order, shared with the CUDA kernels

#include "worker_guard.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

namespace mmfast {
namespace CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();

// A work unit is kRows rows of S against a column segment, walked in tiles of kRows × kCols: one
// single-threaded ATen GEMM (MKL) per tile into the thread's buffer, then the selection scan over
// it. 256 × 512 (512 KB) leaves the tile, MKL's packed A (256 KB at D = 256) and B (512 KB) in a
// 2 MB L2, so the scan reads the tile from L2: at N = 4096, M = 262144, D = 256 on 2 cores it ran
// at 0.87× the bare matmul, 512 × 1024 at 1.05×, 256 × 1024 at 1.12× (medians of 3, one run
// each).
constexpr int64_t kRows = 256;
constexpr int64_t kCols = 512;

struct Entry {
  float v;
  int64_t i;
};

// a ranks before b: larger value first, NaN above every number, then the lower index (the order
// kernels/numerics.cuh defines for every backend).
inline bool better(const Entry& a, const Entry& b) {
  return ranks_before(ordered_key(a.v), a.i, ordered_key(b.v), b.i);
}

// The running top-k of one row: an unsorted candidate buffer of capacity cap > k. Until it first
// fills, every entry is taken; then it is compacted to its best k (nth_element) and `thr`, the
// k-th best value, gates the scan: columns come in increasing order, so a later column with a
// value equal to thr ranks below all k kept entries and is rejected.
struct RowTopK {
  Entry* buf;
  int64_t count = 0;
  float thr = 0.f;
  bool gated = false;

  void compact(int64_t k) {
    std::nth_element(buf, buf + (k - 1), buf + count, better);
    count = k;
    thr = buf[k - 1].v;
    gated = true;
  }
  void push(float v, int64_t i, int64_t k, int64_t cap) {
    if (count == cap) {
      compact(k);
      if (!passes(v)) return;
    }
    buf[count++] = Entry{v, i};
  }
  bool passes(float v) const { return v > thr || (std::isnan(v) && !std::isnan(thr)); }
  // The best min(k, count) entries, sorted, into out; returns how many.
  int64_t finish(int64_t k, Entry* out) {
    const int64_t n = std::min(k, count);
    std::partial_sort(buf, buf + n, buf + count, better);
    std::copy(buf, buf + n, out);
    return n;
  }
};

// Offers the kW values of one vector (columns j…) to the row's top-k; `lanes` has a bit set for
// each lane that may pass the row's gate.
inline void offer(RowTopK& row, const Vec& v, int lanes, int64_t j, int64_t k, int64_t cap) {
  alignas(64) float tmp[kW];
  v.store(tmp);
  for (int64_t l = 0; l < kW; ++l)
    if ((lanes >> l) & 1 && (!row.gated || row.passes(tmp[l]))) row.push(tmp[l], j + l, k, cap);
}

inline Vec load_scaled(const float* z, const float* col_scale, int64_t c) {
  const Vec v = Vec::loadu(z + c);
  return col_scale != nullptr ? v * Vec::loadu(col_scale + c) : v;
}

// Lanes of v that are not <= thr (greater, or NaN): all lanes until the row is gated.
inline int open_lanes(const RowTopK& row, const Vec& v) {
  return row.gated ? (v <= Vec(row.thr)).zero_mask() : (1 << kW) - 1;
}

// Scans one tile row (cols values of S for columns j0…; col_scale already offset to j0) into the
// row's top-k. Most blocks of 4 vectors are rejected by one compare of their element-wise maximum
// against the gate (at::vec::maximum propagates NaN, so a NaN always opens its block).
void scan_row(RowTopK& row, const float* z, const float* col_scale, int64_t j0, int64_t cols, int64_t k,
              int64_t cap) {
  int64_t c = 0;
  for (; c + 4 * kW <= cols; c += 4 * kW) {
    const Vec v0 = load_scaled(z, col_scale, c), v1 = load_scaled(z, col_scale, c + kW);
    const Vec v2 = load_scaled(z, col_scale, c + 2 * kW), v3 = load_scaled(z, col_scale, c + 3 * kW);
    const Vec top = at::vec::maximum(at::vec::maximum(v0, v1), at::vec::maximum(v2, v3));
    if (open_lanes(row, top) == 0) continue;
    offer(row, v0, open_lanes(row, v0), j0 + c, k, cap);
    offer(row, v1, open_lanes(row, v1), j0 + c + kW, k, cap);
    offer(row, v2, open_lanes(row, v2), j0 + c + 2 * kW, k, cap);
    offer(row, v3, open_lanes(row, v3), j0 + c + 3 * kW, k, cap);
  }
  for (; c + kW <= cols; c += kW) {
    const Vec v = load_scaled(z, col_scale, c);
    offer(row, v, open_lanes(row, v), j0 + c, k, cap);
  }
  for (; c < cols; ++c) {
    const float v = col_scale != nullptr ? z[c] * col_scale[c] : z[c];
    if (!row.gated || row.passes(v)) row.push(v, j0 + c, k, cap);
  }
}

}  // namespace

void topk_similarity(const at::Tensor& a, const at::Tensor& b, const float* col_scale, int64_t k,
                     at::Tensor& values, at::Tensor& indices) {
  const int64_t n = a.size(0), m = b.size(0);
  if (n == 0) return;
  const int64_t row_blocks = (n + kRows - 1) / kRows;
  const int nthreads = at::get_num_threads();
  // Rows are independent, so a thread that owns a row block walks all its columns alone. With
  // fewer row blocks than ~2 per thread, the columns are split too and the partial lists merged.
  int64_t segments = 1;
  if (row_blocks < 2 * nthreads) {
    const int64_t by_threads = (2 * nthreads + row_blocks - 1) / row_blocks;
    segments = std::max<int64_t>(1, std::min(by_threads, m / std::max<int64_t>(kCols, k)));
  }
  const int64_t seg_cols = (m + segments - 1) / segments;
  const int64_t cap = k + std::max<int64_t>(k, 32);  // compaction every >= max(k, 32) candidates
  // Per row and segment, that segment's sorted top min(k, its columns) and how many.
  std::vector<Entry> partial(segments > 1 ? n * segments * k : 0);
  std::vector<int64_t> partial_count(segments > 1 ? n * segments : 0);
  float* out_v = values.data_ptr<float>();
  int64_t* out_i = indices.data_ptr<int64_t>();

  auto emit = [&](int64_t i, int64_t seg, const Entry* best, int64_t count) {
    if (segments == 1) {
      for (int64_t t = 0; t < count; ++t) out_v[i * k + t] = best[t].v, out_i[i * k + t] = best[t].i;
    } else {
      std::copy(best, best + count, partial.begin() + (i * segments + seg) * k);
      partial_count[i * segments + seg] = count;
    }
  };

  std::atomic<int64_t> next{0};
  const int64_t units = row_blocks * segments;
  const at::ThreadLocalState caller;
  at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) {
    const WorkerGuard worker(caller);
    // From torch's allocator (64-byte aligned): MKL's results depend on its operands' alignment.
    const at::Tensor tile = at::empty({kRows * std::min(kCols, seg_cols)}, a.options());
    std::vector<Entry> cand(kRows * cap), best(k);
    std::vector<RowTopK> rows(kRows);
    for (int64_t u = next++; u < units; u = next++) {
      const int64_t i0 = u / segments * kRows, seg = u % segments;
      const int64_t nr = std::min(kRows, n - i0);
      const int64_t c0 = seg * seg_cols, c1 = std::min(m, c0 + seg_cols);
      for (int64_t r = 0; r < nr; ++r) rows[r] = RowTopK{cand.data() + r * cap};
      const at::Tensor a_rows = a.narrow(0, i0, nr);
      for (int64_t j0 = c0; j0 < c1; j0 += kCols) {
        const int64_t cols = std::min(kCols, c1 - j0);
        at::Tensor z = at::from_blob(tile.data_ptr<float>(), {nr, cols}, a.options());
        at::mm_out(z, a_rows, b.narrow(0, j0, cols).t());
        for (int64_t r = 0; r < nr; ++r) scan_row(rows[r], tile.data_ptr<float>() + r * cols, col_scale != nullptr ? col_scale + j0 : nullptr, j0, cols, k, cap);
      }
      for (int64_t r = 0; r < nr; ++r) emit(i0 + r, seg, best.data(), rows[r].finish(k, best.data()));
    }
  });
  if (segments == 1) return;
  // Merge: each row's segment lists hold every candidate for its top k (ties resolved by index).
  at::parallel_for(0, n, 64, [&](int64_t lo, int64_t hi) {
    std::vector<Entry> all(segments * k);
    for (int64_t i = lo; i < hi; ++i) {
      int64_t count = 0;
      for (int64_t s = 0; s < segments; ++s) {
        const Entry* src = partial.data() + (i * segments + s) * k;
        count = std::copy(src, src + partial_count[i * segments + s], all.begin() + count) - all.begin();
      }
      std::partial_sort(all.begin(), all.begin() + k, all.begin() + count, better);
      for (int64_t t = 0; t < k; ++t) out_v[i * k + t] = all[t].v, out_i[i * k + t] = all[t].i;
    }
  });
}

void similarity_rows(const at::Tensor& a, const at::Tensor& b, at::Tensor& out) {
  const int64_t n = a.size(0), m = b.size(0);
  if (out.scalar_type() == at::kFloat) {  // the output is the GEMM's: one multithreaded call
    at::mm_out(out, a, b.t());
    return;
  }
  // bf16/fp16 out: row blocks through an fp32 buffer (kRows × M), converted with at::vec.
  const int64_t rows_per_block = std::max<int64_t>(1, std::min<int64_t>(kRows, (1 << 20) / std::max<int64_t>(m, 1)));
  const at::ThreadLocalState caller;
  at::parallel_for(0, (n + rows_per_block - 1) / rows_per_block, 1, [&](int64_t lo, int64_t hi) {
    const WorkerGuard worker(caller);
    const at::Tensor buf = at::empty({rows_per_block * m}, a.options());
    for (int64_t blk = lo; blk < hi; ++blk) {
      const int64_t i0 = blk * rows_per_block, nr = std::min(rows_per_block, n - i0);
      at::Tensor z = at::from_blob(buf.data_ptr<float>(), {nr, m}, a.options());
      at::mm_out(z, a.narrow(0, i0, nr), b.t());
      if (out.scalar_type() == at::kBFloat16)
        at::vec::convert(buf.data_ptr<float>(), out.data_ptr<at::BFloat16>() + i0 * m, nr * m);
      else
        at::vec::convert(buf.data_ptr<float>(), out.data_ptr<at::Half>() + i0 * m, nr * m);
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace mmfast
