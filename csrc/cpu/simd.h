// 8 floats as one value (GCC vector extensions): one AVX register in the AVX2 clone of a
// SYMFAST_MULTIVERSION function, two SSE registers in the baseline clone. Helpers are
// always_inline so they compile into whichever clone calls them.
#pragma once
#include <cstring>

namespace symfast {

typedef float v8f __attribute__((vector_size(32)));
typedef int v8i __attribute__((vector_size(32)));

__attribute__((always_inline)) inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

__attribute__((always_inline)) inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof v); }

}  // namespace symfast
