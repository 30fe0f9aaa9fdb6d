// Shared boilerplate for the per-op CPU extension modules.
//
// Each csrc/cpu/<op>.cpp is built into its own Python module (symfast._cpu_<op> by setup.py,
// or by torch.utils.cpp_extension.load on first use). Importing the module runs the static
// TORCH_LIBRARY_FRAGMENT registrations; the module itself exports nothing, so it is a bare
// CPython module rather than a pybind11 one (pybind11 headers would double the compile time).
#pragma once
#include <Python.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <time.h>

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

// Kernels with an AVX-512 variant (target("avx512f,...") functions) run it only where this says
// so; SYMFAST_ISA=avx2 (SYMFAST_NO_AVX512) builds without them.
inline bool cpu_has_avx512() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(SYMFAST_BASELINE_ISA) && \
    !defined(SYMFAST_NO_AVX512)
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512dq") && cpu_has_avx2_fma();
  }();
  return has;
#else
  return false;
#endif
}

// Parallel regions that notice a busy machine. On a machine where another process holds a core, a
// team of as many threads as cores waits at every region's end for the thread that shares its core
// (OpenMP spins there, so the waiting thread even keeps the other one off the CPU): orbit ran 3.5x
// slower at 2 threads than at 1 with one core busy (benchmarks/bench_threads_under_load.py). Each
// region therefore measures how long its threads were runnable but not running (wall time since the
// region started minus the thread's own CPU time, which also counts a late start); when that
// exceeds a quarter of the region (and kMinLostNs), and the region took over 3/4 of the CPU time
// its threads spent in it (about what one thread would have taken: below that the team, though
// slowed, still beats one thread; a quiet team takes about half), in kBusyInARow team regions in a
// row (one alone can be a quiet machine waking a sleeping thread), the following regions run on the
// calling thread alone, for a back-off that doubles while the machine stays busy (from kMinSoloNs
// to kMaxSoloNs; one team region probes the machine after each) and starts again from zero after a
// region that ran clean. The bits of every result are the same either way: work is cut into fixed
// chunks whose partial results never depend on which thread, or how many, took them, and the ATen
// calls inside a region (per-sample GEMMs) run on one thread in both (nested in a team, or with the
// calling thread's team size set to 1 when alone). The ATen calls between regions keep torch's
// thread count: MKL's results can depend on it (a GEMM with a long inner dimension splits it over
// threads), so running those alone too would change bits from one call to the next on a machine
// whose load comes and goes.
namespace team_detail {

constexpr int64_t kMinLostNs = 200'000;
constexpr int64_t kMinSoloNs = 20'000'000;
constexpr int64_t kMaxSoloNs = 1'000'000'000;
constexpr int64_t kBusyInARow = 2;

inline int64_t clock_ns(clockid_t clock) {
  timespec ts;
  clock_gettime(clock, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

// One record per process (GCC makes an inline function's static unique across the modules).
struct Record {
  std::atomic<int64_t> solo_until_ns{0}, backoff_ns{0}, busy_in_a_row{0};
  std::atomic<int64_t> team_regions{0}, busy_regions{0}, solo_regions{0};
};

inline Record& record() {
  static Record r;
  return r;
}

// omp_set_num_threads sets the calling thread's own team size, which ATen and MKL read.
class OneThread {
 public:
  OneThread() : previous_(omp_get_max_threads()) { omp_set_num_threads(1); }
  ~OneThread() { omp_set_num_threads(previous_); }
  OneThread(const OneThread&) = delete;
  OneThread& operator=(const OneThread&) = delete;

 private:
  int previous_;
};

}  // namespace team_detail

// Runs body() once on each thread of a team of at most max_threads (the calling thread alone when
// the machine was found busy, see above); the threads share the work through their own counter.
template <typename F>
void parallel_team(int64_t max_threads, const F& body) {
  using namespace team_detail;
  const int64_t threads = std::min<int64_t>(max_threads, at::get_num_threads());
  if (threads <= 1 || at::in_parallel_region()) {
    body();
    return;
  }
  Record& rec = record();
  const int64_t start = clock_ns(CLOCK_MONOTONIC);
  if (start < rec.solo_until_ns.load(std::memory_order_relaxed)) {
    rec.solo_regions.fetch_add(1, std::memory_order_relaxed);
    const OneThread one;
    body();
    return;
  }
  std::atomic<int64_t> lost{0}, work{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    const int64_t cpu0 = clock_ns(CLOCK_THREAD_CPUTIME_ID);
    body();
    const int64_t cpu = clock_ns(CLOCK_THREAD_CPUTIME_ID) - cpu0;
    const int64_t off_cpu = (clock_ns(CLOCK_MONOTONIC) - start) - cpu;
    work.fetch_add(cpu, std::memory_order_relaxed);
    int64_t seen = lost.load();
    while (off_cpu > seen && !lost.compare_exchange_weak(seen, off_cpu)) {
    }
  });
  const int64_t end = clock_ns(CLOCK_MONOTONIC);
  rec.team_regions.fetch_add(1, std::memory_order_relaxed);
  const int64_t wall = end - start;
  if (lost.load() > std::max(kMinLostNs, wall / 4) && 4 * wall > 3 * work.load()) {
    rec.busy_regions.fetch_add(1, std::memory_order_relaxed);
    if (rec.busy_in_a_row.fetch_add(1, std::memory_order_relaxed) + 1 >= kBusyInARow) {
      const int64_t doubled = 2 * rec.backoff_ns.load(std::memory_order_relaxed);
      const int64_t next = std::clamp(doubled, kMinSoloNs, kMaxSoloNs);
      rec.backoff_ns.store(next, std::memory_order_relaxed);
      rec.solo_until_ns.store(end + next, std::memory_order_relaxed);
    }
  } else {
    rec.busy_in_a_row.store(0, std::memory_order_relaxed);
    rec.backoff_ns.store(0, std::memory_order_relaxed);
  }
}

// Fixed chunks [begin, end) of [0, n), cut every `size`, handed out by an atomic counter: a
// thread slowed by another process on its core takes fewer chunks instead of holding the others
// at the end of the region, and a caller can keep partial results per chunk index.
class Chunks {
 public:
  Chunks(int64_t n, int64_t size) : n_(n), size_(size), count_(n > 0 ? (n + size - 1) / size : 0) {}
  int64_t count() const { return count_; }
  // The next chunk not yet taken by any thread (its index only); false when none is left.
  bool take(int64_t& chunk) {
    chunk = next_.fetch_add(1, std::memory_order_relaxed);
    return chunk < count_;
  }
  // The next chunk and its range [begin, end); false when none is left.
  bool take(int64_t& chunk, int64_t& begin, int64_t& end) {
    chunk = next_.fetch_add(1, std::memory_order_relaxed);
    if (chunk >= count_) return false;
    begin = chunk * size_;
    end = std::min(n_, begin + size_);
    return true;
  }

 private:
  int64_t n_, size_, count_;
  std::atomic<int64_t> next_{0};
};

// fn(chunk, begin, end) for each chunk of [0, n) cut every `chunk_size`, on a team (parallel_team).
template <typename F>
void parallel_chunks(int64_t n, int64_t chunk_size, const F& fn) {
  Chunks chunks(n, chunk_size);
  if (chunks.count() == 0) return;
  parallel_team(chunks.count(), [&] {
    for (int64_t c, begin, end; chunks.take(c, begin, end);) fn(c, begin, end);
  });
}
