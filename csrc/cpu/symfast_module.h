// Shared boilerplate for the per-op CPU extension modules.
//
// Each csrc/cpu/<op>.cpp is built into its own Python module (symfast._cpu_<op> by setup.py,
// or by torch.utils.cpp_extension.load on first use). Importing the module runs the static
// TORCH_LIBRARY_FRAGMENT registrations; the module itself exports nothing, so it is a bare
// CPython module rather than a pybind11 one (pybind11 headers would double the compile time).
#pragma once
#include <Python.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#define SYMFAST_STR_(x) #x
#define SYMFAST_STR(x) SYMFAST_STR_(x)
#define SYMFAST_CAT_(a, b) a##b
#define SYMFAST_CAT(a, b) SYMFAST_CAT_(a, b)

#define SYMFAST_PY_MODULE()                                                                 \
  extern "C" PyMODINIT_FUNC SYMFAST_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {              \
    static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT,                           \
                                            SYMFAST_STR(TORCH_EXTENSION_NAME), nullptr, -1, \
                                            nullptr};                                        \
    return PyModule_Create(&module_def);                                                     \
  }

// Hot loops are compiled twice, for AVX2+FMA and for the baseline ISA, and picked at load
// time (GCC function multi-versioning): portable binaries that still use wide gathers/FMAs.
// SYMFAST_BASELINE_ISA (a build with SYMFAST_ISA=baseline, symfast/_build.py) keeps only the
// baseline code, so that the variant a CPU without AVX2 runs is tested on a machine with AVX2.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__AVX2__) && \
    !defined(SYMFAST_BASELINE_ISA)
#define SYMFAST_MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define SYMFAST_MULTIVERSION
#endif

// Kernels written with AVX2/FMA intrinsics (target("avx2,fma") functions) run only where this
// says so; otherwise their portable twin runs.
inline bool cpu_has_avx2_fma() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(SYMFAST_BASELINE_ISA)
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
#else
  return false;
#endif
}

// fn(chunk, begin, end) for each chunk [begin, end) of [0, n) cut every `chunk_size`, handed out
// by an atomic counter to the threads of one parallel region. A thread slowed by another process
// on its core takes fewer chunks instead of holding the others at the end of the region: with a
// static split, 2 threads with one core busy ran orbit at 1.9x and attention_pool at 1.3x the
// time of 1 thread (benchmarks/bench_threads_under_load.py). The chunk index lets a caller keep
// partial sums per chunk, so results do not depend on which thread took which chunk.
template <typename F>
void parallel_chunks(int64_t n, int64_t chunk_size, const F& fn) {
  if (n <= 0) return;
  const int64_t chunks = (n + chunk_size - 1) / chunk_size;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(chunks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t c = next++; c < chunks; c = next++)
      fn(c, c * chunk_size, std::min(n, (c + 1) * chunk_size));
  });
}
