// The masked-LM softmax's row kernel (cross_entropy_cpu.h). Compiled once per instruction set
// (CMakeLists.txt); CPU_CAPABILITY names the set and the namespace.
#include "cross_entropy_cpu.h"
#include "numerics.cuh"  // kernels/: target_grad, shared with the CUDA kernels

#include "worker_guard.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

namespace mmfast {
namespace CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();
constexpr float kInf = std::numeric_limits<float>::infinity();

// Sums of fp32 terms are kept short (kFlush vectors per lane) and then carried in fp64: a row of
// V = 250k terms keeps the accuracy of a 16-term fp32 sum.
constexpr int64_t kFlush = 16;

float nan_max(float x, float y) { return (std::isnan(x) || x > y) ? x : y; }

float reduce_sum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

// Σ_v f(x_v) over one row in fp64, f applied to vectors (f_vec) and to the scalar tail (f_scalar).
template <class FVec, class FScalar>
double row_sum(const float* x, int64_t n, FVec f_vec, FScalar f_scalar) {
  const int64_t body = n - n % kW;
  double total = 0.0;
  for (int64_t c0 = 0; c0 < body; c0 += kFlush * kW) {
    const int64_t c1 = std::min(body, c0 + kFlush * kW);
    Vec acc(0.f);
    for (int64_t c = c0; c < c1; c += kW) acc = acc + f_vec(Vec::loadu(x + c));
    total += reduce_sum(acc);
  }
  for (int64_t c = body; c < n; ++c) total += f_scalar(x[c]);
  return total;
}

float row_max(const float* x, int64_t n) {
  const int64_t body = n - n % kW;
  float mx = -std::numeric_limits<float>::infinity();
  if (body > 0) {
    Vec acc = Vec::loadu(x);
    for (int64_t c = kW; c < body; c += kW) acc = at::vec::maximum(acc, Vec::loadu(x + c));  // keeps NaN
    mx = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, acc);
  }
  for (int64_t c = body; c < n; ++c) mx = nan_max(mx, x[c]);
  return mx;
}

// Σ_v exp(x_v − mx) over one row whose maximum is mx, in fp64. The entries equal to mx add exactly
// 1 each and are counted apart: summed in fp32 with the rest, that 1 would swamp the small terms of
// a peaked row, whose whole loss, lse − x_y = log(1 + Σ_{v≠y} e^(x_v − x_y)), is made of them.
double sum_exp(const float* x, int64_t n, float mx) {
  const int64_t body = n - n % kW;
  const Vec vmx(mx), one(1.f);
  double rest = 0.0, count = 0.0;
  for (int64_t c0 = 0; c0 < body; c0 += kFlush * kW) {
    const int64_t c1 = std::min(body, c0 + kFlush * kW);
    Vec acc(0.f), tops(0.f);
    for (int64_t c = c0; c < c1; c += kW) {
      const Vec a = Vec::loadu(x + c);
      const Vec top = (a == vmx) & one;  // 1 where a = mx, else 0
      acc = acc + ((a - vmx).exp() - top);
      tops = tops + top;
    }
    rest += reduce_sum(acc);
    count += reduce_sum(tops);
  }
  for (int64_t c = body; c < n; ++c) {
    if (x[c] == mx) {
      count += 1.0;
    } else {
      rest += std::exp(x[c] - mx);
    }
  }
  return count + rest;
}

// g_v = a·exp(x_v − lse) + b over one row (g may be x). lse = hi + lo in fp32 parts: x − hi is
// exact near the row's top, so the softmax keeps the fp64 statistic's accuracy.
void write_grad(const float* x, float* g, int64_t n, double lse, float a, float b) {
  const float hi = float(lse), lo = float(lse - double(hi));
  const int64_t body = n - n % kW;
  const Vec vhi(hi), vlo(lo), va(a), vb(b);
  for (int64_t c = 0; c < body; c += kW) {
    at::vec::fmadd(((Vec::loadu(x + c) - vhi) - vlo).exp(), va, vb).store(g + c);
  }
  for (int64_t c = body; c < n; ++c) g[c] = a * std::exp((x[c] - hi) - lo) + b;
}

void one_row(const CrossEntropyRows& p, int64_t t) {
  const float* x = p.x + t * p.ldx;
  float* g = p.w ? p.g + t * p.ldg : nullptr;
  const int64_t v = p.vocab, y = p.target[t];
  if (y < 0 || y >= v) {  // ignored: no loss, no gradient
    p.loss[t] = 0.f;
    p.lse[t] = 0.0;
    if (g) std::fill(g, g + v, 0.f);
    return;
  }
  const float mx = row_max(x, v);
  const double lse = double(mx) + std::log(sum_exp(x, v, mx));
  const double x_y = x[y];
  double loss = lse - (1.0 - p.eps) * x_y + p.z * lse * lse;
  if (p.eps != 0.f) {
    const double sum_x = row_sum(x, v, [](const Vec& a) { return a; }, [](float a) { return double(a); });
    loss -= p.eps * sum_x / double(v);
  }
  p.loss[t] = float(loss);
  p.lse[t] = lse;
  if (g) {
    const double w = p.w[t];
    write_grad(x, g, v, lse, float(w * (1.0 + 2.0 * p.z * lse)), float(-w * p.eps / double(v)));
    g[y] = target_grad(x_y, lse, w, p.eps, p.z, v);
  }
}

}  // namespace

void cross_entropy_rows(const CrossEntropyRows& args) {
  // A row is V floats of work (≥ 10^4 in practice): split rows evenly over the threads.
  at::parallel_for(0, args.rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) one_row(args, t);
  });
}

// ---- linear + cross-entropy: tiles of kept rows × vocabulary chunks ----------------------------

namespace {

// A tile is kBlockRows kept rows × kChunk vocabulary entries (512 KB fp32). Its GEMM reads the
// block's hidden rows (768 KB at Dh = 768) and the chunk's weight rows (1.5 MB): with the tile they
// stay in a 2 MB L2. Measured on a 2-core AVX-512 Xeon at Dh = 768: chunks of 256 to 2048 columns
// run the tile's three GEMMs at the same speed (~120 GFLOP/s per core, that of one large torch.mm).
constexpr int64_t kBlockRows = kLinearBlockRows;
constexpr int64_t kChunk = 512;

// x[r, :cols] += v for each of the rows of x (row stride ld).
void add_to_rows(float* x, int64_t ld, int64_t rows, int64_t cols, const float* v) {
  const int64_t body = cols - cols % kW;
  for (int64_t r = 0; r < rows; ++r) {
    float* xr = x + r * ld;
    for (int64_t c = 0; c < body; c += kW) (Vec::loadu(xr + c) + Vec::loadu(v + c)).store(xr + c);
    for (int64_t c = body; c < cols; ++c) xr[c] += v[c];
  }
}

// Calls f(slot, chunk) for chunk = 0 … chunks − 1, where slot < at::get_num_threads() names the
// per-thread partials the call may add to (one thread at a time per slot). By default chunks go to
// whichever thread is free (the machines are shared: static splits leave a thread waiting on a
// slower one). Under torch.use_deterministic_algorithms slot s takes chunks s, s + slots, … in
// order, so every partial sums the same terms in the same order in every run.
template <class F>
void for_each_chunk(int64_t chunks, F&& f) {
  const int slots = at::get_num_threads();
  const at::ThreadLocalState caller;
  if (at::globalContext().deterministicAlgorithms()) {
    at::parallel_for(0, slots, 1, [&](int64_t begin, int64_t end) {
      const WorkerGuard worker(caller);
      for (int64_t s = begin; s < end; ++s)
        for (int64_t c = s; c < chunks; c += slots) f(int(s), c);
    });
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, slots, 1, [&](int64_t, int64_t) {
    const WorkerGuard worker(caller);
    const int thread = at::get_thread_num();
    for (int64_t c = next++; c < chunks; c = next++) f(thread, c);
  });
}

// (mx, sum) ← the pair for the union of two sets of exp terms, each summed against its own max. A
// set whose max is −inf (a tile of −inf logits: a masked vocabulary) holds no terms.
void merge(float& mx, double& sum, float other_mx, double other_sum) {
  const float new_mx = nan_max(mx, other_mx);
  if (new_mx == -std::numeric_limits<float>::infinity()) return;  // both empty
  sum = (mx == new_mx ? sum : sum * std::exp(double(mx) - new_mx)) +
        (other_mx == new_mx ? other_sum : other_sum * std::exp(double(other_mx) - new_mx));
  mx = new_mx;
}

// One block of kept rows: its hidden rows hb (rows, Dh) and, chunk by chunk, its logits
// x = hb·w_chunkᵀ + bias_chunk, written into `out` (row stride ld).
struct Block {
  const LinearCrossEntropy& p;
  int64_t b0, rows;
  at::Tensor hb;

  Block(const LinearCrossEntropy& p, int64_t b0, int64_t rows)
      : p(p), b0(b0), rows(rows), hb(p.h.index_select(0, p.kept.slice(0, b0, b0 + rows))) {}

  int64_t row(int64_t r) const { return p.kept.data_ptr<int64_t>()[b0 + r]; }

  at::Tensor logits(int64_t c0, int64_t cols, float* out, int64_t ld) const {
    at::Tensor x = at::from_blob(out, {rows, cols}, {ld, 1}, p.h.options());
    at::mm_out(x, hb, p.w.slice(0, c0, c0 + cols).t());
    // The bias row by row (at::addmm_out would take another GEMM path, which starts threads of its own).
    if (p.bias.defined()) add_to_rows(out, ld, rows, cols, p.bias.data_ptr<float>() + c0);
    return x;
  }
};

// Per thread and row of a block: (max, sum of exp against it) over the chunks the thread took,
// the target's logit if it was in one of them, and Σ_v x (for label smoothing).
struct RowStats {
  int nthreads;
  std::vector<std::vector<float>> mx, x_y;
  std::vector<std::vector<double>> sum, sum_x;

  explicit RowStats(int nthreads) : nthreads(nthreads), mx(nthreads), x_y(nthreads), sum(nthreads), sum_x(nthreads) {
    reset();
  }

  void reset() {
    for (int t = 0; t < nthreads; ++t) {
      mx[t].assign(kBlockRows, -std::numeric_limits<float>::infinity());
      x_y[t].assign(kBlockRows, 0.f);
      sum[t].assign(kBlockRows, 0.0);
      sum_x[t].assign(kBlockRows, 0.0);
    }
  }

  // Adds a tile's rows: x (rows × cols, row stride ld) holds the logits of columns c0 ….
  void add(int thread, const Block& blk, int64_t c0, int64_t cols, const float* x, int64_t ld) {
    for (int64_t r = 0; r < blk.rows; ++r) {
      const float* xr = x + r * ld;
      const float tile_max = row_max(xr, cols);
      merge(mx[thread][r], sum[thread][r], tile_max, tile_max == -kInf ? 0.0 : sum_exp(xr, cols, tile_max));
      const int64_t y = blk.p.target[blk.row(r)];
      if (y >= c0 && y < c0 + cols) x_y[thread][r] = xr[y - c0];
      if (blk.p.eps != 0.f) sum_x[thread][r] += row_sum(xr, cols, [](const Vec& a) { return a; }, [](float a) { return double(a); });
    }
  }

  // Merges the threads' partials: loss and lse of the block's rows, at their indices in [0, T).
  void finish(const Block& blk, float* loss, double* lse) {
    const int64_t vocab = blk.p.w.size(0);
    for (int64_t r = 0; r < blk.rows; ++r) {
      float m = -kInf;
      double s = 0.0, xy = 0.0, sx = 0.0;
      for (int t = 0; t < nthreads; ++t) {
        merge(m, s, mx[t][r], sum[t][r]);
        xy += x_y[t][r];
        sx += sum_x[t][r];
      }
      const double row_lse = double(m) + std::log(s);
      const float eps = blk.p.eps, z = blk.p.z;
      lse[blk.row(r)] = row_lse;
      loss[blk.row(r)] = float(row_lse - (1.0 - eps) * xy - eps * sx / double(vocab) + z * row_lse * row_lse);
    }
    reset();
  }
};

// Per thread: its share of a block's dh from the chunks it took, summed when the block is done.
struct BlockGrads {
  std::vector<at::Tensor> dh_part;

  BlockGrads(int nthreads, const at::Tensor& h) : dh_part(nthreads) {
    for (auto& d : dh_part) d = at::zeros({kBlockRows, h.size(1)}, h.options());
  }

  // Turns a tile of logits x (rows × cols from column c0, row stride ld) into G in place and adds
  // its terms: dw[c0 : c0 + cols] += Gᵀ·hb (the chunk is this thread's for the whole block),
  // dh_part += G·w_chunk, dbias[c0 : c0 + cols] += Σ_rows G.
  void add(int thread, const Block& blk, int64_t c0, int64_t cols, float* x, int64_t ld, const double* lse,
           const float* weight, at::Tensor& dw, float* db) {
    const LinearCrossEntropy& p = blk.p;
    const int64_t vocab = p.w.size(0);
    for (int64_t r = 0; r < blk.rows; ++r) {
      float* xr = x + r * ld;
      const int64_t t_row = blk.row(r), y = p.target[t_row];
      const double row_lse = lse[t_row], wt = weight[t_row];
      const bool has_y = y >= c0 && y < c0 + cols;
      const float x_y = has_y ? xr[y - c0] : 0.f;
      write_grad(xr, xr, cols, row_lse, float(wt * (1.0 + 2.0 * p.z * row_lse)), float(-wt * p.eps / double(vocab)));
      if (has_y) xr[y - c0] = target_grad(x_y, row_lse, wt, p.eps, p.z, vocab);
    }
    if (db) add_column_sums(x, ld, blk.rows, cols, db + c0);
    const at::Tensor g = at::from_blob(x, {blk.rows, cols}, {ld, 1}, p.h.options());
    dw.slice(0, c0, c0 + cols).addmm_(g.t(), blk.hb);
    dh_part[thread].slice(0, 0, blk.rows).addmm_(g, p.w.slice(0, c0, c0 + cols));
  }

  void finish(const Block& blk, at::Tensor& dh) {
    at::Tensor total = dh_part[0].slice(0, 0, blk.rows);
    for (size_t t = 1; t < dh_part.size(); ++t) total.add_(dh_part[t].slice(0, 0, blk.rows));
    dh.index_copy_(0, blk.p.kept.slice(0, blk.b0, blk.b0 + blk.rows), total);
    for (auto& d : dh_part) d.zero_();
  }

  // out[c] += Σ_r x[r, c].
  static void add_column_sums(const float* x, int64_t ld, int64_t rows, int64_t cols, float* out) {
    const int64_t body = cols - cols % kW;
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = x + r * ld;
      for (int64_t c = 0; c < body; c += kW) (Vec::loadu(out + c) + Vec::loadu(xr + c)).store(out + c);
      for (int64_t c = body; c < cols; ++c) out[c] += xr[c];
    }
  }
};

// The blocks of kept rows, each walked chunk by chunk in parallel: f(block) for each.
template <class F>
void for_each_block(const LinearCrossEntropy& p, F&& f) {
  const int64_t n = p.kept.size(0);
  for (int64_t b0 = 0; b0 < n; b0 += kBlockRows) f(Block(p, b0, std::min(kBlockRows, n - b0)));
}

// count buffers of n floats each, from torch's allocator: 64-byte aligned, as MKL's results depend
// on its operands' alignment (bit-for-bit repeatable runs need the same alignment each time).
at::Tensor tile_buffers(int64_t count, int64_t n) { return at::empty({count, n}, at::TensorOptions(at::kFloat)); }

int64_t chunks_of(const LinearCrossEntropy& p) { return (p.w.size(0) + kChunk - 1) / kChunk; }

}  // namespace

void linear_cross_entropy_forward(const LinearCrossEntropy& p, float* loss, double* lse) {
  const int nthreads = at::get_num_threads();
  const at::Tensor tiles = tile_buffers(nthreads, kBlockRows * kChunk);
  RowStats stats(nthreads);
  for_each_block(p, [&](const Block& blk) {
    for_each_chunk(chunks_of(p), [&](int thread, int64_t c) {
      const int64_t c0 = c * kChunk, cols = std::min(kChunk, p.w.size(0) - c0);
      float* tile = tiles.data_ptr<float>() + thread * tiles.size(1);
      blk.logits(c0, cols, tile, cols);
      stats.add(thread, blk, c0, cols, tile, cols);
    });
    stats.finish(blk, loss, lse);
  });
}

void linear_cross_entropy_backward(const LinearCrossEntropy& p, const double* lse, const float* w, at::Tensor& dh,
                                   at::Tensor& dw, at::Tensor& dbias) {
  const int nthreads = at::get_num_threads();
  const at::Tensor tiles = tile_buffers(nthreads, kBlockRows * kChunk);
  BlockGrads grads(nthreads, p.h);
  float* db = dbias.defined() ? dbias.data_ptr<float>() : nullptr;
  for_each_block(p, [&](const Block& blk) {
    for_each_chunk(chunks_of(p), [&](int thread, int64_t c) {
      const int64_t c0 = c * kChunk, cols = std::min(kChunk, p.w.size(0) - c0);
      float* tile = tiles.data_ptr<float>() + thread * tiles.size(1);
      blk.logits(c0, cols, tile, cols);
      grads.add(thread, blk, c0, cols, tile, cols, lse, w, dw, db);
    });
    grads.finish(blk, dh);
  });
}

void linear_cross_entropy_fused(const LinearCrossEntropy& p, const float* w, float* loss, double* lse, at::Tensor& dh,
                                at::Tensor& dw, at::Tensor& dbias) {
  const int nthreads = at::get_num_threads();
  const int64_t vocab = p.w.size(0);
  const at::Tensor block_logits = tile_buffers(1, std::min(kBlockRows, p.kept.size(0)) * vocab);
  RowStats stats(nthreads);
  BlockGrads grads(nthreads, p.h);
  float* db = dbias.defined() ? dbias.data_ptr<float>() : nullptr;
  for_each_block(p, [&](const Block& blk) {
    float* x = block_logits.data_ptr<float>();
    for_each_chunk(chunks_of(p), [&](int thread, int64_t c) {
      const int64_t c0 = c * kChunk, cols = std::min(kChunk, vocab - c0);
      blk.logits(c0, cols, x + c0, vocab);
      stats.add(thread, blk, c0, cols, x + c0, vocab);
    });
    stats.finish(blk, loss, lse);
    for_each_chunk(chunks_of(p), [&](int thread, int64_t c) {
      const int64_t c0 = c * kChunk, cols = std::min(kChunk, vocab - c0);
      grads.add(thread, blk, c0, cols, x + c0, vocab, lse, w, dw, db);
    });
    grads.finish(blk, dh);
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace mmfast
