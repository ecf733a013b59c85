// Which of the compiled instruction-set builds of the tile kernels (CMakeLists.txt) to run: the one
// ATen itself runs, so ATEN_CPU_CAPABILITY=avx2 or =default selects a narrower build, as for ATen.
#pragma once

#include <ATen/Version.h>

#include <string>

namespace mmfast {

enum class Capability { DEFAULT, AVX2, AVX512 };

inline Capability cpu_capability() {
  static const Capability cap = [] {
    const std::string name = at::get_cpu_capability();
#ifdef MMFAST_HAS_AVX512
    if (name == "AVX512") return Capability::AVX512;
#endif
#ifdef MMFAST_HAS_AVX2
    if (name == "AVX512" || name == "AVX2") return Capability::AVX2;
#endif
    return Capability::DEFAULT;
  }();
  return cap;
}

inline const char* capability_name(Capability cap) {
  switch (cap) {
    case Capability::AVX512: return "avx512";
    case Capability::AVX2: return "avx2";
    default: return "default";
  }
}

// Calls NS::fn(args...) for the capability chosen above, NS one of DEFAULT, AVX2, AVX512.
#if defined(MMFAST_HAS_AVX512) && defined(MMFAST_HAS_AVX2)
#define MMFAST_CPU_DISPATCH(fn, ...)                                              \
  (::mmfast::cpu_capability() == ::mmfast::Capability::AVX512 ? AVX512::fn(__VA_ARGS__) \
   : ::mmfast::cpu_capability() == ::mmfast::Capability::AVX2 ? AVX2::fn(__VA_ARGS__)   \
                                                               : DEFAULT::fn(__VA_ARGS__))
#else
#define MMFAST_CPU_DISPATCH(fn, ...) DEFAULT::fn(__VA_ARGS__)
#endif

}  // namespace mmfast
