// Tile kernels of the contrastive primitives (contrastive_cpu.h). Compiled once per instruction set
// (CMakeLists.txt); CPU_CAPABILITY names the set and the namespace.
#include "contrastive_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <cmath>
#include <limits>
#include <vector>

namespace mmfast {
namespace CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();
constexpr float kInf = std::numeric_limits<float>::infinity();

// A tile of Z is kRows x kCols fp32 (128 KB): with its A rows and B rows it stays in a 1-2 MB L2
// for D up to ~512, and MKL runs a 128x256xD GEMM at ~90% of its large-matrix rate.
constexpr int64_t kRows = 128;
constexpr int64_t kCols = 256;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// max that keeps a NaN from either side, so NaN features give a NaN loss.
float nan_max(float x, float y) { return (std::isnan(x) || x > y) ? x : y; }

float reduce_max(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, v);
}
float reduce_sum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, v);
}

// One tile: rows [i0, i0 + rows) x columns [j0, j0 + cols) of Z. p holds the unscaled A·Bᵀ,
// row-major with row stride ld (a multiple of the vector width), 0 in columns [cols, ld).
// z_at adds mask (0, or -inf past cols), so Z there is -inf and every exp or sigmoid of it is
// exactly 0 (and G·P is 0·0): the loops need no tail handling.
struct Tile {
  int64_t i0, rows, j0, cols, ld;
  float* p;
  const float* mask;
};

// Z = s·P + b (+ the padding mask) for the vector at p[c], mask[c].
inline Vec z_at(const float* p, const float* mask, int64_t c, const Vec& s, const Vec& b) {
  return at::vec::fmadd(Vec::loadu(p + c), s, b) + Vec::loadu(mask + c);
}

// Walks every tile of Z with no barrier between tiles. Tiles are handed out one at a time, column
// stripe by column stripe, to whichever thread is free (the machine may be shared: static chunks
// leave threads waiting). A thread's tiles therefore go through the stripes in order, and
// per-thread state for column-owned outputs is flushed when its stripe changes:
//   pass.tile(thread, tile)           for each tile (row-owned outputs under row_lock(i0));
//   pass.flush(thread, j0, cols)      when the thread leaves a stripe (under a global lock);
// a thread starts a stripe with pass.start(thread, ld).
template <class Pass>
void sweep(const at::Tensor& a, const at::Tensor& b, Pass& pass) {
  const int64_t n = a.size(0), m = b.size(0);
  const int64_t row_blocks = (n + kRows - 1) / kRows, stripes = (m + kCols - 1) / kCols;
  const int64_t ld_max = round_up(std::min(m, kCols), kW);
  const int nthreads = at::get_num_threads();
  std::atomic<int64_t> next{0};
  std::mutex flush_lock;
  at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) {
    const int thread = at::get_thread_num();
    std::vector<float> buffer(kRows * ld_max), mask(ld_max);
    float* p = buffer.data();
    int64_t stripe = -1;
    auto leave_stripe = [&] {
      if (stripe < 0) return;
      std::lock_guard<std::mutex> guard(flush_lock);
      pass.flush(thread, stripe * kCols, std::min(kCols, m - stripe * kCols));
    };
    for (int64_t t = next++; t < row_blocks * stripes; t = next++) {
      const int64_t j0 = t / row_blocks * kCols, i0 = t % row_blocks * kRows;
      const int64_t cols = std::min(kCols, m - j0), rows = std::min(kRows, n - i0), ld = round_up(cols, kW);
      if (t / row_blocks != stripe) {
        leave_stripe();
        stripe = t / row_blocks;
        std::fill(std::fill_n(mask.begin(), cols, 0.f), mask.begin() + ld, -kInf);
        pass.start(thread, ld);
      }
      at::Tensor p_view = at::from_blob(p, {rows, cols}, {ld, 1}, a.options());
      at::mm_out(p_view, a.narrow(0, i0, rows), b.narrow(0, j0, cols).t());
      for (int64_t r = 0; r < rows; ++r) std::fill(p + r * ld + cols, p + (r + 1) * ld, 0.f);
      pass.tile(thread, Tile{i0, rows, j0, cols, ld, p, mask.data()});
    }
    leave_stripe();
  });
}

// Two threads can hold tiles of the same row block (in different stripes) only when a stripe has
// few row blocks; a lock per row block keeps the row-owned outputs right then, uncontended otherwise.
struct RowLocks {
  std::vector<std::mutex> locks;
  explicit RowLocks(int64_t n) : locks((n + kRows - 1) / kRows) {}
  std::mutex& operator()(int64_t i0) { return locks[i0 / kRows]; }
};

// Softmax statistics. Rows: running (max, sum of exp) per row, merged tile by tile. Columns: each
// thread keeps running (max, sum) over the tiles it saw of its current stripe, merged into the
// shared column state when it leaves the stripe.
struct SoftmaxStats {
  float s, b;
  bool with_cols;
  std::vector<float> row_max, row_sum, col_max, col_sum;
  RowLocks row_lock;
  std::vector<std::vector<float>> t_max, t_sum, t_prev;  // per thread, one stripe

  SoftmaxStats(float s, float b, int64_t n, int64_t m, bool with_cols, int nthreads)
      : s(s), b(b), with_cols(with_cols), row_max(n, -kInf), row_sum(n, 0.f),
        col_max(with_cols ? m : 0, -kInf), col_sum(with_cols ? m : 0, 0.f), row_lock(n),
        t_max(nthreads), t_sum(nthreads), t_prev(nthreads) {}

  void start(int thread, int64_t ld) {
    if (!with_cols) return;
    t_max[thread].assign(ld, -kInf);
    t_sum[thread].assign(ld, 0.f);
    t_prev[thread].resize(ld);
  }

  void tile(int thread, const Tile& T) {
    float* cmax = t_max[thread].data();
    float* csum = t_sum[thread].data();
    const Vec vs(s), vb(b);
    float tile_row_max[kRows];
    if (with_cols) std::copy(cmax, cmax + T.ld, t_prev[thread].data());
    // Pass 1: Z = s·P + b in place; row and column maxima.
    for (int64_t r = 0; r < T.rows; ++r) {
      float* z = T.p + r * T.ld;
      Vec vmax(-kInf);
      for (int64_t c = 0; c < T.ld; c += kW) {
        const Vec zc = z_at(z, T.mask, c, vs, vb);
        zc.store(z + c);
        vmax = at::vec::maximum(vmax, zc);
        if (with_cols) at::vec::maximum(Vec::loadu(cmax + c), zc).store(cmax + c);
      }
      tile_row_max[r] = reduce_max(vmax);
    }
    // The column sums so far were taken against the old maxima.
    if (with_cols) {
      const float* cprev = t_prev[thread].data();
      for (int64_t c = 0; c < T.ld; c += kW) {
        const Vec rescale = (Vec::loadu(cprev + c) - Vec::loadu(cmax + c)).exp();
        (Vec::loadu(csum + c) * rescale).store(csum + c);
      }
    }
    // Pass 2: sums of exp against the row maxima and the column maxima.
    float tile_row_sum[kRows];
    for (int64_t r = 0; r < T.rows; ++r) {
      const float* z = T.p + r * T.ld;
      const Vec vmax(tile_row_max[r]);
      Vec vsum(0.f);
      for (int64_t c = 0; c < T.ld; c += kW) {
        const Vec zc = Vec::loadu(z + c);
        vsum = vsum + (zc - vmax).exp();
        if (with_cols) (Vec::loadu(csum + c) + (zc - Vec::loadu(cmax + c)).exp()).store(csum + c);
      }
      tile_row_sum[r] = reduce_sum(vsum);
    }
    std::lock_guard<std::mutex> guard(row_lock(T.i0));
    for (int64_t r = 0; r < T.rows; ++r)
      merge(row_max[T.i0 + r], row_sum[T.i0 + r], tile_row_max[r], tile_row_sum[r]);
  }

  void flush(int thread, int64_t j0, int64_t cols) {
    if (!with_cols) return;
    for (int64_t c = 0; c < cols; ++c) merge(col_max[j0 + c], col_sum[j0 + c], t_max[thread][c], t_sum[thread][c]);
  }

  // (mx, sum) ← the pair for the union of two sets of exp terms, each summed against its own max.
  static void merge(float& mx, float& sum, float other_mx, float other_sum) {
    const float new_mx = nan_max(mx, other_mx);
    if (new_mx == -kInf) return;  // both empty
    sum = sum * std::exp(mx - new_mx) + other_sum * std::exp(other_mx - new_mx);
    mx = new_mx;
  }
};

// Sigmoid statistics: Σ_j softplus(Z_ij) per row, softplus(z) = max(z, 0) + log1p(exp(-|z|)).
struct SigmoidStats {
  float s, b;
  std::vector<double> row_acc;
  RowLocks row_lock;

  SigmoidStats(float s, float b, int64_t n) : s(s), b(b), row_acc(n, 0.0), row_lock(n) {}
  void start(int, int64_t) {}
  void flush(int, int64_t, int64_t) {}

  void tile(int, const Tile& T) {
    const Vec vs(s), vb(b), zero(0.f);
    float tile_row_sum[kRows];
    for (int64_t r = 0; r < T.rows; ++r) {
      const float* p = T.p + r * T.ld;
      Vec vsum(0.f);
      for (int64_t c = 0; c < T.ld; c += kW) {
        const Vec z = z_at(p, T.mask, c, vs, vb);
        vsum = vsum + at::vec::maximum(z, zero) + (zero - z.abs()).exp().log1p();
      }
      tile_row_sum[r] = reduce_sum(vsum);
    }
    std::lock_guard<std::mutex> guard(row_lock(T.i0));
    for (int64_t r = 0; r < T.rows; ++r) row_acc[T.i0 + r] += tile_row_sum[r];
  }
};

// Gradient pass: forms G tile by tile in place of P, then dA rows += s·G·B_cols (under the row
// block's lock) and the thread's stripe partial of dB += Gᵀ·A_rows, added into dB's rows when the
// thread leaves the stripe.
struct Grad {
  float s, b;
  bool sigmoid;
  const float* row;    // r (N), softmax only
  const float* row_w;  // wr (N)
  const float* col;    // c (M) or null
  const float* col_w;  // wc (M) or null
  const at::Tensor& a;
  const at::Tensor& bmat;
  at::Tensor& da;
  at::Tensor& db;
  RowLocks row_lock;
  std::vector<at::Tensor> db_part;  // per thread: (kCols, D)
  std::vector<double> bias_grad;    // per thread: Σ G
  std::vector<double> scale_grad;   // per thread: Σ G∘P

  void start(int thread, int64_t) {
    if (db.defined()) db_part[thread].zero_();
  }

  void tile(int thread, const Tile& T) {
    const Vec vs(s), vb(b), one(1.f);
    // c and wc of this tile's columns, padded with c = +inf, wc = 0 so the padding's G is 0.
    float c_pad[kCols], wc_pad[kCols];
    if (col != nullptr) {
      std::fill(std::copy(col + T.j0, col + T.j0 + T.cols, c_pad), c_pad + T.ld, kInf);
      std::fill(std::copy(col_w + T.j0, col_w + T.j0 + T.cols, wc_pad), wc_pad + T.ld, 0.f);
    }
    Vec vgsum(0.f), vgpsum(0.f);
    for (int64_t r = 0; r < T.rows; ++r) {
      float* p = T.p + r * T.ld;
      const int64_t i = T.i0 + r;
      const Vec wi(row_w[i]);
      for (int64_t c = 0; c < T.ld; c += kW) {
        const Vec pc = Vec::loadu(p + c);
        const Vec z = at::vec::fmadd(pc, vs, vb) + Vec::loadu(T.mask + c);
        Vec g;
        if (sigmoid) {
          g = wi / (one + z.neg().exp());
        } else {
          g = wi * (z - Vec(row[i])).exp();
          if (col != nullptr) g = g + Vec::loadu(wc_pad + c) * (z - Vec::loadu(c_pad + c)).exp();
        }
        g.store(p + c);
        vgsum = vgsum + g;
        vgpsum = at::vec::fmadd(g, pc, vgpsum);
      }
    }
    bias_grad[thread] += reduce_sum(vgsum);
    scale_grad[thread] += reduce_sum(vgpsum);
    const at::Tensor g = at::from_blob(T.p, {T.rows, T.cols}, {T.ld, 1}, a.options());
    if (db.defined()) db_part[thread].narrow(0, 0, T.cols).addmm_(g.t(), a.narrow(0, T.i0, T.rows));
    if (da.defined()) {
      std::lock_guard<std::mutex> guard(row_lock(T.i0));
      da.narrow(0, T.i0, T.rows).addmm_(g, bmat.narrow(0, T.j0, T.cols), 1.f, s);
    }
  }

  void flush(int thread, int64_t j0, int64_t cols) {
    if (db.defined()) db.narrow(0, j0, cols).add_(db_part[thread].narrow(0, 0, cols), s);
  }
};

}  // namespace

void contrastive_stats(const at::Tensor& a, const at::Tensor& b, float scale, float bias,
                       bool sigmoid, at::Tensor& row, at::Tensor& col) {
  const int64_t n = a.size(0), m = b.size(0);
  float* row_out = row.data_ptr<float>();
  if (sigmoid) {
    SigmoidStats pass(scale, bias, n);
    sweep(a, b, pass);
    for (int64_t i = 0; i < n; ++i) row_out[i] = static_cast<float>(pass.row_acc[i]);
    return;
  }
  SoftmaxStats pass(scale, bias, n, m, col.defined(), at::get_num_threads());
  sweep(a, b, pass);
  for (int64_t i = 0; i < n; ++i) row_out[i] = pass.row_max[i] + std::log(pass.row_sum[i]);
  if (col.defined()) {
    float* col_out = col.data_ptr<float>();
    for (int64_t j = 0; j < m; ++j) col_out[j] = pass.col_max[j] + std::log(pass.col_sum[j]);
  }
}

std::pair<double, double> contrastive_grad(const at::Tensor& a, const at::Tensor& b, float scale, float bias,
                                           bool sigmoid, const at::Tensor& row, const at::Tensor& col,
                        const at::Tensor& wr, const at::Tensor& wc, at::Tensor& da, at::Tensor& db) {
  const int nthreads = at::get_num_threads();
  std::vector<at::Tensor> db_part;
  if (db.defined())
    for (int t = 0; t < nthreads; ++t) db_part.push_back(at::empty({kCols, a.size(1)}, a.options()));
  const bool with_cols = !sigmoid && col.defined();
  Grad pass{scale, bias, sigmoid,
            sigmoid ? nullptr : row.data_ptr<float>(), wr.data_ptr<float>(),
            with_cols ? col.data_ptr<float>() : nullptr, with_cols ? wc.data_ptr<float>() : nullptr,
            a, b, da, db, RowLocks(a.size(0)), std::move(db_part), std::vector<double>(nthreads, 0.0),
            std::vector<double>(nthreads, 0.0)};
  sweep(a, b, pass);
  double scale_grad = 0.0, bias_grad = 0.0;
  for (int t = 0; t < nthreads; ++t) scale_grad += pass.scale_grad[t], bias_grad += pass.bias_grad[t];
  return {scale_grad, bias_grad};
}

}  // namespace CPU_CAPABILITY
}  // namespace mmfast
