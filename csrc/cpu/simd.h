// 8 floats as one value (GCC vector extensions): one AVX register in the AVX2 clone of a
// SYMFAST_MULTIVERSION function, two SSE registers in the baseline clone. Helpers are
// always_inline so they compile into whichever clone calls them.
#pragma once
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace symfast {

// Orders this thread's non-temporal (streaming) stores before whatever follows (a parallel
// region's barrier): they bypass the cache and are not ordered by the usual store rules.
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

typedef float v8f __attribute__((vector_size(32)));
typedef int v8i __attribute__((vector_size(32)));

__attribute__((always_inline)) inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

__attribute__((always_inline)) inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof v); }

typedef uint16_t v8u16 __attribute__((vector_size(16)));
typedef uint32_t v8u32 __attribute__((vector_size(32)));

// 8 elements as floats: fp32 as they are, bf16 widened (its bits are the top half of an fp32).
__attribute__((always_inline)) inline v8f load8_as_float(const float* p) { return load8(p); }

__attribute__((always_inline)) inline v8f load8_as_float(const c10::BFloat16* p) {
  v8u16 h;
  std::memcpy(&h, p, sizeof h);
  const v8u32 bits = __builtin_convertvector(h, v8u32) << 16;
  v8f v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

}  // namespace symfast
