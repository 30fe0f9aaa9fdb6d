// Shared boilerplate for the per-op CPU extension modules.
//
// Each csrc/cpu/<op>.cpp is built into its own Python module (symfast._cpu_<op> by setup.py,
// or by torch.utils.cpp_extension.load on first use). Importing the module runs the static
// TORCH_LIBRARY_FRAGMENT registrations; the module itself exports nothing, so it is a bare
// CPython module rather than a pybind11 one (pybind11 headers would double the compile time).
#pragma once
#include <Python.h>

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
