// Tile kernels of the contrastive primitives (contrastive_cpu.h). Compiled once per instruction set
// (CMakeLists.txt); CPU_CAPABILITY names the set and the namespace.
#include "contrastive_cpu.h"

#include "worker_guard.h"

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

// A tile of Z is kRows x kCols fp32 (256 KB); with its A rows and B rows (512 KB each at D = 512)
// it stays in a 2 MB L2. Measured on a 2-core AVX-512 Xeon at N = 8192, D = 512: 256 x 256 tiles
// run the tile GEMMs at the speed of one large torch.mm, 128 x 256 ones ~20% slower (MKL packs the
// B block anew for every tile, so taller tiles amortise it).
constexpr int64_t kRows = 256;
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

// How sweep hands out the tiles of Z, stripe by stripe (t = stripe · row_blocks + row block):
//   kAny:    one tile at a time to whichever thread is free, with no barrier between tiles (the
//            default: the machine may be shared, and static chunks leave threads waiting);
//   kByRows: a whole row block to one thread, which walks its stripes in order;
//   kByCols: a whole stripe to one thread, which walks its row blocks in order.
// Under kByRows every row-owned output is formed by one thread in one fixed order, under kByCols
// every column-owned one: torch.use_deterministic_algorithms runs a pass once in each (its row
// outputs in the first, its column outputs in the second) instead of once in kAny.
enum class Order { kAny, kByRows, kByCols };

// Walks every tile of Z in the given order:
//   pass.tile(thread, tile)           for each tile (row-owned outputs under row_lock(i0));
//   pass.flush(thread, j0, cols)      when the thread leaves a stripe (under a global lock);
// a thread starts a stripe with pass.start(thread, ld). Under kAny a thread's tiles go through the
// stripes in order, so per-thread state for column-owned outputs is flushed when its stripe changes.
template <class Pass>
void sweep(const at::Tensor& a, const at::Tensor& b, Pass& pass, Order order = Order::kAny) {
  const int64_t n = a.size(0), m = b.size(0);
  const int64_t row_blocks = (n + kRows - 1) / kRows, stripes = (m + kCols - 1) / kCols;
  const int64_t units = order == Order::kAny ? row_blocks * stripes : order == Order::kByRows ? row_blocks : stripes;
  const int64_t tiles_per_unit = order == Order::kAny ? 1 : order == Order::kByRows ? stripes : row_blocks;
  const int64_t ld_max = round_up(std::min(m, kCols), kW);
  std::atomic<int64_t> next{0};
  std::mutex flush_lock;
  const at::ThreadLocalState caller;
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    const WorkerGuard worker(caller);
    const int thread = at::get_thread_num();
    // From torch's allocator (64-byte aligned): MKL's results depend on its operands' alignment.
    at::Tensor buffer = at::empty({kRows * ld_max}, a.options());
    std::vector<float> mask(ld_max);
    float* p = buffer.data_ptr<float>();
    int64_t stripe = -1;
    auto leave_stripe = [&] {
      if (stripe < 0) return;
      std::lock_guard<std::mutex> guard(flush_lock);
      pass.flush(thread, stripe * kCols, std::min(kCols, m - stripe * kCols));
    };
    for (int64_t u = next++; u < units; u = next++) {
      for (int64_t q = 0; q < tiles_per_unit; ++q) {
        const int64_t t = order == Order::kByRows ? q * row_blocks + u : u * tiles_per_unit + q;
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

// (mx, sum) ← the pair for the union of two sets of exp terms, each summed against its own max.
void merge(float& mx, double& sum, float other_mx, double other_sum) {
  const float new_mx = nan_max(mx, other_mx);
  if (new_mx == -kInf) return;  // both empty
  sum = sum * std::exp(double(mx) - new_mx) + other_sum * std::exp(double(other_mx) - new_mx);
  mx = new_mx;
}

// Sums of fp32 terms are kept short (at most kFlush per vector lane) before they go into fp64, so
// a statistic over N or M terms carries fp32 rounding of ~kFlush terms, not of N or M.
constexpr int64_t kFlush = 16;

// Softmax statistics. Rows (when with_rows): (max, sum of exp) per row, merged tile by tile under
// the row block's lock. Columns (when with_cols): each tile's (max, sum) merged into the thread's
// running pair for its current stripe, merged into the shared column state when the thread leaves
// the stripe.
struct SoftmaxStats {
  float s, b;
  bool with_rows, with_cols;
  std::vector<float> row_max, col_max;
  std::vector<double> row_sum, col_sum;
  RowLocks row_lock;
  std::vector<std::vector<float>> t_max;  // per thread, its current stripe
  std::vector<std::vector<double>> t_sum;

  SoftmaxStats(float s, float b, int64_t n, int64_t m, bool with_rows, bool with_cols, int nthreads)
      : s(s), b(b), with_rows(with_rows), with_cols(with_cols), row_max(n, -kInf), col_max(with_cols ? m : 0, -kInf),
        row_sum(n, 0.0), col_sum(with_cols ? m : 0, 0.0), row_lock(n), t_max(nthreads), t_sum(nthreads) {}

  void start(int thread, int64_t ld) {
    if (!with_cols) return;
    t_max[thread].assign(ld, -kInf);
    t_sum[thread].assign(ld, 0.0);
  }

  void tile(int thread, const Tile& T) {
    const Vec vs(s), vb(b);
    float tile_row_max[kRows], tile_row_sum[kRows];
    alignas(64) float col_max_tile[kCols], col_part[kCols];
    double col_sum_tile[kCols];
    std::fill_n(col_max_tile, T.ld, -kInf);
    std::fill_n(col_part, T.ld, 0.f);
    std::fill_n(col_sum_tile, T.ld, 0.0);
    // Pass 1: Z = s·P + b in place; row and column maxima of the tile.
    for (int64_t r = 0; r < T.rows; ++r) {
      float* z = T.p + r * T.ld;
      Vec vmax(-kInf);
      for (int64_t c = 0; c < T.ld; c += kW) {
        const Vec zc = z_at(z, T.mask, c, vs, vb);
        zc.store(z + c);
        vmax = at::vec::maximum(vmax, zc);
        if (with_cols) at::vec::maximum(Vec::loadu(col_max_tile + c), zc).store(col_max_tile + c);
      }
      tile_row_max[r] = reduce_max(vmax);
    }
    // Pass 2: sums of exp against the row maxima and the column maxima.
    for (int64_t r = 0; r < T.rows; ++r) {
      const float* z = T.p + r * T.ld;
      const Vec vmax(tile_row_max[r]);
      Vec vsum(0.f);
      for (int64_t c = 0; c < T.ld; c += kW) {
        const Vec zc = Vec::loadu(z + c);
        if (with_rows) vsum = vsum + (zc - vmax).exp();
        if (with_cols) (Vec::loadu(col_part + c) + (zc - Vec::loadu(col_max_tile + c)).exp()).store(col_part + c);
      }
      tile_row_sum[r] = reduce_sum(vsum);
      if (with_cols && ((r + 1) % kFlush == 0 || r + 1 == T.rows)) {
        for (int64_t c = 0; c < T.ld; ++c) col_sum_tile[c] += col_part[c];
        std::fill_n(col_part, T.ld, 0.f);
      }
    }
    if (with_cols)
      for (int64_t c = 0; c < T.cols; ++c) merge(t_max[thread][c], t_sum[thread][c], col_max_tile[c], col_sum_tile[c]);
    if (!with_rows) return;
    std::lock_guard<std::mutex> guard(row_lock(T.i0));
    for (int64_t r = 0; r < T.rows; ++r)
      merge(row_max[T.i0 + r], row_sum[T.i0 + r], tile_row_max[r], tile_row_sum[r]);
  }

  void flush(int thread, int64_t j0, int64_t cols) {
    if (!with_cols) return;
    for (int64_t c = 0; c < cols; ++c) merge(col_max[j0 + c], col_sum[j0 + c], t_max[thread][c], t_sum[thread][c]);
  }
};

// For the sigmoid loss a row's positive column has label +1 and the others -1; the element's loss
// is softplus(-t·z). The vector holding the positive gets that lane's z negated (and, in the grad
// pass, that lane's G negated), so a confident positive keeps its full precision instead of being
// recovered by cancellation from softplus(z) - z.
struct Positive {
  int64_t vec = -1;  // offset in the tile row of the vector holding the positive, or -1
  int64_t lane = 0;

  Positive(const int64_t* pos, int64_t i, const Tile& T) {
    const int64_t c = pos != nullptr ? pos[i] - T.j0 : -1;
    if (c >= 0 && c < T.cols) vec = c / kW * kW, lane = c % kW;
  }
  Vec flip(const Vec& v) const {
    alignas(64) float tmp[kW];
    v.store(tmp);
    tmp[lane] = -tmp[lane];
    return Vec::loadu(tmp);
  }
};

// Sigmoid statistics: Σ_j softplus(-t_ij·Z_ij) per row, softplus(z) = max(z, 0) + log1p(exp(-|z|)).
struct SigmoidStats {
  float s, b;
  const int64_t* pos;  // positive column per row (N), or null
  std::vector<double> row_acc;
  RowLocks row_lock;

  SigmoidStats(float s, float b, const int64_t* pos, int64_t n)
      : s(s), b(b), pos(pos), row_acc(n, 0.0), row_lock(n) {}
  void start(int, int64_t) {}
  void flush(int, int64_t, int64_t) {}

  void tile(int, const Tile& T) {
    const Vec vs(s), vb(b), zero(0.f);
    float tile_row_sum[kRows];
    for (int64_t r = 0; r < T.rows; ++r) {
      const float* p = T.p + r * T.ld;
      const Positive positive(pos, T.i0 + r, T);
      Vec vsum(0.f);
      for (int64_t c = 0; c < T.ld; c += kW) {
        Vec z = z_at(p, T.mask, c, vs, vb);
        if (c == positive.vec) z = positive.flip(z);
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
// thread leaves the stripe (each only when defined). The scale and bias gradients (when with_sums)
// are summed per row block (per stripe when by_stripe) and the partials added in order at the end.
struct Grad {
  float s, b;
  bool sigmoid;
  const double* row;   // r (N), softmax only
  const float* row_w;  // wr (N)
  const double* col;   // c (M) or null
  const float* col_w;  // wc (M) or null
  const int64_t* pos;  // sigmoid: positive column per row (N), or null
  const at::Tensor& a;
  const at::Tensor& bmat;
  at::Tensor& da;
  at::Tensor& db;
  bool with_sums, by_stripe;
  RowLocks row_lock;
  std::vector<at::Tensor> db_part;  // per thread: (kCols, D)
  std::vector<double> scale_grad;   // per row block (or stripe): Σ G∘P
  std::vector<double> bias_grad;    // per row block (or stripe): Σ G

  void start(int thread, int64_t) {
    if (db.defined()) db_part[thread].zero_();
  }

  void tile(int thread, const Tile& T) {
    const Vec vs(s), vb(b), one(1.f);
    // c (as hi + lo) and wc of this tile's columns, padded with c = +inf, wc = 0 so the padding's G is 0.
    alignas(64) float c_hi[kCols], c_lo[kCols], wc_pad[kCols];
    if (col != nullptr) {
      for (int64_t c = 0; c < T.ld; ++c) {
        const bool real = c < T.cols;
        c_hi[c] = real ? static_cast<float>(col[T.j0 + c]) : kInf;
        c_lo[c] = real ? static_cast<float>(col[T.j0 + c] - c_hi[c]) : 0.f;
        wc_pad[c] = real ? col_w[T.j0 + c] : 0.f;
      }
    }
    double gp_sum = 0.0, g_sum = 0.0;
    for (int64_t r = 0; r < T.rows; ++r) {
      float* p = T.p + r * T.ld;
      const int64_t i = T.i0 + r;
      const Vec wi(row_w[i]);
      const Positive positive(sigmoid ? pos : nullptr, i, T);
      const Vec r_hi(sigmoid ? 0.f : static_cast<float>(row[i]));
      const Vec r_lo(sigmoid ? 0.f : static_cast<float>(row[i] - static_cast<float>(row[i])));
      Vec vg(0.f), vgp(0.f);
      for (int64_t c = 0; c < T.ld; c += kW) {
        const Vec pc = Vec::loadu(p + c);
        Vec z = at::vec::fmadd(pc, vs, vb) + Vec::loadu(T.mask + c);
        Vec g;
        if (sigmoid) {
          // d softplus(-t·z)/dz = -t·σ(-t·z): σ(z) for negatives, -σ(-z) for the positive.
          if (c == positive.vec) z = positive.flip(z);
          g = wi / (one + z.neg().exp());
          if (c == positive.vec) g = positive.flip(g);
        } else {
          g = wi * ((z - r_hi) - r_lo).exp();
          if (col != nullptr)
            g = g + Vec::loadu(wc_pad + c) * ((z - Vec::loadu(c_hi + c)) - Vec::loadu(c_lo + c)).exp();
        }
        g.store(p + c);
        vg = vg + g;
        vgp = at::vec::fmadd(g, pc, vgp);
      }
      g_sum += reduce_sum(vg);
      gp_sum += reduce_sum(vgp);
    }
    const at::Tensor g = at::from_blob(T.p, {T.rows, T.cols}, {T.ld, 1}, a.options());
    if (db.defined()) db_part[thread].narrow(0, 0, T.cols).addmm_(g.t(), a.narrow(0, T.i0, T.rows));
    std::lock_guard<std::mutex> guard(row_lock(T.i0));
    if (with_sums) {
      const int64_t slot = by_stripe ? T.j0 / kCols : T.i0 / kRows;
      bias_grad[slot] += g_sum;
      scale_grad[slot] += gp_sum;
    }
    if (da.defined()) da.narrow(0, T.i0, T.rows).addmm_(g, bmat.narrow(0, T.j0, T.cols), 1.f, s);
  }

  void flush(int thread, int64_t j0, int64_t cols) {
    if (db.defined()) db.narrow(0, j0, cols).add_(db_part[thread].narrow(0, 0, cols), s);
  }
};

}  // namespace

void contrastive_stats(const at::Tensor& a, const at::Tensor& b, float scale, float bias, bool sigmoid,
                       const at::Tensor& pos, at::Tensor& row, at::Tensor& col) {
  const int64_t n = a.size(0), m = b.size(0);
  const bool fixed = at::globalContext().deterministicAlgorithms();
  double* row_out = row.data_ptr<double>();
  if (sigmoid) {
    SigmoidStats pass(scale, bias, pos.defined() ? pos.data_ptr<int64_t>() : nullptr, n);
    sweep(a, b, pass, fixed ? Order::kByRows : Order::kAny);
    std::copy(pass.row_acc.begin(), pass.row_acc.end(), row_out);
    return;
  }
  const int nthreads = at::get_num_threads();
  SoftmaxStats pass(scale, bias, n, m, true, col.defined() && !fixed, nthreads);
  sweep(a, b, pass, fixed ? Order::kByRows : Order::kAny);
  for (int64_t i = 0; i < n; ++i) row_out[i] = pass.row_max[i] + std::log(pass.row_sum[i]);
  if (!col.defined()) return;
  auto write_cols = [&](const SoftmaxStats& stats) {
    double* col_out = col.data_ptr<double>();
    for (int64_t j = 0; j < m; ++j) col_out[j] = stats.col_max[j] + std::log(stats.col_sum[j]);
  };
  if (!fixed) return write_cols(pass);
  SoftmaxStats col_pass(scale, bias, n, m, false, true, nthreads);
  sweep(a, b, col_pass, Order::kByCols);
  write_cols(col_pass);
}

std::pair<double, double> contrastive_grad(const at::Tensor& a, const at::Tensor& b, float scale, float bias,
                                           bool sigmoid, const at::Tensor& pos, const at::Tensor& row,
                                           const at::Tensor& col, const at::Tensor& wr, const at::Tensor& wc,
                                           at::Tensor& da, at::Tensor& db) {
  const int nthreads = at::get_num_threads();
  const bool with_cols = !sigmoid && col.defined();
  const int64_t row_blocks = (a.size(0) + kRows - 1) / kRows, stripes = (b.size(0) + kCols - 1) / kCols;
  at::Tensor none;
  auto run = [&](at::Tensor& da_out, at::Tensor& db_out, bool with_sums, Order order) {
    std::vector<at::Tensor> db_part;
    if (db_out.defined())
      for (int t = 0; t < nthreads; ++t) db_part.push_back(at::empty({kCols, a.size(1)}, a.options()));
    const bool by_stripe = order == Order::kByCols;
    const int64_t slots = with_sums ? (by_stripe ? stripes : row_blocks) : 0;
    Grad pass{scale, bias, sigmoid,
              sigmoid ? nullptr : row.data_ptr<double>(), wr.data_ptr<float>(),
              with_cols ? col.data_ptr<double>() : nullptr, with_cols ? wc.data_ptr<float>() : nullptr,
              pos.defined() ? pos.data_ptr<int64_t>() : nullptr,
              a, b, da_out, db_out, with_sums, by_stripe, RowLocks(a.size(0)), std::move(db_part),
              std::vector<double>(slots, 0.0), std::vector<double>(slots, 0.0)};
    sweep(a, b, pass, order);
    double scale_grad = 0.0, bias_grad = 0.0;
    for (int64_t i = 0; i < slots; ++i) scale_grad += pass.scale_grad[i], bias_grad += pass.bias_grad[i];
    return std::make_pair(scale_grad, bias_grad);
  };
  if (!at::globalContext().deterministicAlgorithms()) return run(da, db, true, Order::kAny);
  // A fixed order: dA and the sums with whole row blocks per thread, then dB with whole stripes.
  if (!db.defined()) return run(da, none, true, Order::kByRows);
  if (!da.defined()) return run(none, db, true, Order::kByCols);
  const auto sums = run(da, none, true, Order::kByRows);
  run(none, db, false, Order::kByCols);
  return sums;
}

}  // namespace CPU_CAPABILITY
}  // namespace mmfast
