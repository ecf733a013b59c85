// The masked-LM softmax's row kernel (cross_entropy_cpu.h). Compiled once per instruction set
// (CMakeLists.txt); CPU_CAPABILITY names the set and the namespace.
#include "cross_entropy_cpu.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace mmfast {
namespace CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();

// Sums of fp32 terms are kept short (kFlush vectors per lane) and then carried in fp64: a row of
// V = 250k terms keeps the accuracy of a 16-term fp32 sum.
constexpr int64_t kFlush = 16;

float nan_max(float x, float y) { return (std::isnan(x) || x > y) ? x : y; }

// Σ_v f(x_v) over one row in fp64, f applied to vectors (f_vec) and to the scalar tail (f_scalar).
template <class FVec, class FScalar>
double row_sum(const float* x, int64_t n, FVec f_vec, FScalar f_scalar) {
  const int64_t body = n - n % kW;
  double total = 0.0;
  for (int64_t c0 = 0; c0 < body; c0 += kFlush * kW) {
    const int64_t c1 = std::min(body, c0 + kFlush * kW);
    Vec acc(0.f);
    for (int64_t c = c0; c < c1; c += kW) acc = acc + f_vec(Vec::loadu(x + c));
    total += at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
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
  const Vec vmx(mx);
  const double sum_exp = row_sum(x, v, [&](const Vec& a) { return (a - vmx).exp(); },
                                 [&](float a) { return std::exp(a - mx); });
  const double lse = double(mx) + std::log(sum_exp);
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
    const double a = w * (1.0 + 2.0 * p.z * lse);
    write_grad(x, g, v, lse, float(a), float(-w * p.eps / double(v)));
    // The target's entry in fp64, with softmax_y − 1 as expm1: in a peaked row (softmax_y → 1) it
    // is the small difference that carries the row's whole gradient.
    g[y] = float(a * std::expm1(x_y - lse) + w * (2.0 * p.z * lse + p.eps * (1.0 - 1.0 / double(v))));
  }
}

}  // namespace

void cross_entropy_rows(const CrossEntropyRows& args) {
  // A row is V floats of work (≥ 10^4 in practice): split rows evenly over the threads.
  at::parallel_for(0, args.rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) one_row(args, t);
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace mmfast
