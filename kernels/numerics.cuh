// The numerics every backend shares, as __host__ __device__ functions: the CUDA kernels use them on
// the device, the CPU kernels (csrc/) and tests/test_cuda_numerics.py compile them as host C++, so
// they are checked against float64 without a GPU.
//
//   Lse            online logsumexp: running max (fp32) and Σ exp(x − max) (fp64), mergeable
//   split / exp_minus   an fp64 statistic as hi + lo fp32 parts, and exp(x − stat) through them
//   target_grad    a peaked row's target gradient via expm1 (the small difference that carries it)
//   softplus, sigmoid  the stable forms used by the sigmoid (SigLIP) loss
//   ordered_key, ranks_before  top-k's order: larger first, NaN above every number, then lower column
#pragma once

#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define MMFAST_HD __host__ __device__ __forceinline__
#else
#define MMFAST_HD inline
#endif

namespace mmfast {

// ---- online logsumexp ---------------------------------------------------------------------------

// A running logsumexp: max over what was seen (fp32, as the logits) and Σ exp(x − max) in fp64, so
// that long rows (10^5 terms) and peaked rows (one term ≈ 1, the rest ≈ 1e-8) keep their small terms.
// The empty state is (−inf, 0). NaN anywhere makes max NaN, and the result NaN.
struct Lse {
  float max;
  double sum;
};

MMFAST_HD Lse lse_empty() { return {-INFINITY, 0.0}; }

// max(a, b) that keeps NaN (fmaxf would drop it).
MMFAST_HD float nan_max(float a, float b) { return (a != a || a > b) ? a : b; }

// The merge of two partial states (blocks of columns, splits of a row): exact in the order given,
// so merging partials in a fixed order is deterministic. exp of the max gap is taken in fp64: merges
// are per tile, not per element, so the cost is small and no fp32 rounding enters the sum.
MMFAST_HD Lse lse_merge(Lse a, Lse b) {
  const float m = nan_max(a.max, b.max);
  if (m != m) return {m, (double)NAN};
  if (m == -INFINITY) return lse_empty();
  return {m, a.sum * exp((double)a.max - (double)m) + b.sum * exp((double)b.max - (double)m)};
}

// log Σ exp: −inf for an empty (or all −inf) state, NaN if any term was NaN.
MMFAST_HD double lse_value(Lse s) {
  if (s.max != s.max) return (double)s.max;
  if (s.max == -INFINITY) return -INFINITY;
  return (double)s.max + log(s.sum);
}

// One term's share of Σ exp(x − ref) for ref ≥ x, split as (rest, top): an entry equal to ref adds
// exactly 1 to `top` and nothing to `rest`. Summed in fp32 with the rest, that 1 would swamp the
// small terms of a peaked row, whose whole loss, lse − x_y = log(1 + Σ_{v≠y} e^(x_v − x_y)), is made
// of them. −inf entries (masked) add 0 to both; ref = −inf (an all-masked row) adds nothing.
MMFAST_HD float exp_rest(float x, float ref) { return (x == ref) ? 0.f : expf(x - ref); }
MMFAST_HD float exp_top(float x, float ref) { return (x == ref && ref != -INFINITY) ? 1.f : 0.f; }

// ---- fp64 statistics applied to fp32 logits -------------------------------------------------------

// stat = hi + lo with hi = fp32(stat): x − hi is exact near the top of a row (Sterbenz), so
// exp((x − hi) − lo) keeps the fp64 statistic's accuracy where softmax is large.
struct HiLo {
  float hi, lo;
};

MMFAST_HD HiLo split(double stat) {
  const float hi = (float)stat;
  // hi = ±inf or NaN: lo = 0 keeps exp((x − hi) − lo) = exp(x − hi) (0 below +inf, NaN for NaN).
  const bool finite = hi - hi == 0.f;
  return {hi, finite ? (float)(stat - (double)hi) : 0.f};
}

MMFAST_HD float exp_minus(float x, HiLo s) { return expf((x - s.hi) - s.lo); }

// The softmax family's dL/dZ_ij: wr·exp(z − r) + wc·exp(z − c), r and c the row's and column's
// logsumexp (wc = 0 when no column statistic is used).
MMFAST_HD float softmax_grad(float z, HiLo r, float wr, HiLo c, float wc) {
  float g = wr * exp_minus(z, r);
  if (wc != 0.f) g += wc * exp_minus(z, c);
  return g;
}

// The target's entry of the masked-LM gradient, in fp64:
//   w·(1 + 2z·lse)·(softmax_y − 1) + w·(2z·lse + ε·(1 − 1/V)),  softmax_y − 1 = expm1(x_y − lse).
// In a peaked row (softmax_y → 1) expm1 keeps the small difference that carries the row's gradient.
MMFAST_HD float target_grad(double x_y, double lse, double w, float eps, float z, int64_t v) {
  return (float)(w * (1.0 + 2.0 * z * lse) * expm1(x_y - lse) + w * (2.0 * z * lse + eps * (1.0 - 1.0 / (double)v)));
}

// ---- the sigmoid loss -------------------------------------------------------------------------------

// log(1 + e^z) = max(z, 0) + log1p(e^−|z|): no overflow for large z, full precision for very negative z.
MMFAST_HD float softplus(float z) { return fmaxf(z, 0.f) + log1pf(expf(-fabsf(z))); }

// σ(z) = 1 / (1 + e^−z), formed from e^−|z| ≤ 1 so that neither side overflows; σ(NaN) = NaN.
MMFAST_HD float sigmoid(float z) {
  const float e = expf(-fabsf(z));
  return z >= 0.f ? 1.f / (1.f + e) : e / (1.f + e);
}

// The sigmoid family's dL/dZ_ij for t = ±1: −t·w·σ(−t·z); its loss term is softplus(−t·z).
MMFAST_HD float sigmoid_grad(float z, float t, float w) { return -t * w * sigmoid(-t * z); }

// ---- top-k's order --------------------------------------------------------------------------------

// fp32 → int32 keys that sort like the floats (mmfast/similarity/order.py): negative floats have their
// magnitude bits flipped, −0.0 and +0.0 map to 0, NaN to the largest key 2^31 − 1 (above +inf's).
MMFAST_HD int32_t ordered_key(float x) {
  if (x != x) return 0x7FFFFFFF;
  if (x == 0.f) return 0;
  union {
    float f;
    int32_t i;
  } u;
  u.f = x;
  return u.i ^ ((u.i >> 31) & 0x7FFFFFFF);
}

// The inverse of ordered_key (NaN comes back as the NaN with bits 0x7FFFFFFF, −0.0 as +0.0).
MMFAST_HD float key_value(int32_t key) {
  union {
    int32_t i;
    float f;
  } u;
  u.i = key ^ ((key >> 31) & 0x7FFFFFFF);
  return u.f;
}

// (key a, column a) ranks before (key b, column b): the larger key, then the lower column.
MMFAST_HD bool ranks_before(int32_t ka, int64_t ca, int32_t kb, int64_t cb) { return ka > kb || (ka == kb && ca < cb); }

}  // namespace mmfast
