#!/usr/bin/env bash
# Build the C++ CPU kernels with AddressSanitizer + UndefinedBehaviorSanitizer and run the op
# tests (CPU backend against the reference) under them.
#
#   bash csrc/sanitize.sh                       # every op's tests and the fuzz suite
#   bash csrc/sanitize.sh tests/test_fused_step.py -k cpu   # any pytest arguments
#
# The sanitized modules are compiled on first use (SYMFAST_FORCE_JIT=1, flags from
# symfast/_build.py with SYMFAST_SANITIZE=1) into their own cache folder, so they never replace
# the normal build. Python itself is not instrumented, so the ASan runtime is preloaded; leak
# checking is off (CPython's own allocations at exit would drown the report). Any sanitizer
# report aborts the process, which fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."

export SYMFAST_FORCE_JIT=1 SYMFAST_SANITIZE=1
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${TMPDIR:-/tmp}/symfast-sanitize-ext}"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_odr_violation=0"
export UBSAN_OPTIONS="halt_on_error=1:abort_on_error=1:print_stacktrace=1"
asan="$(${CXX:-g++} -print-file-name=libasan.so)"
ubsan="$(${CXX:-g++} -print-file-name=libubsan.so)"
[ -f "$asan" ] || { echo "sanitize.sh: no libasan.so for ${CXX:-g++}" >&2; exit 1; }

if [ $# -eq 0 ]; then
  set -- tests/test_group_average.py tests/test_fused_step.py tests/test_tied_conv2d.py \
         tests/test_attention_pool.py tests/test_classifier_select.py tests/test_group_norm_silu.py \
         tests/test_fuzz_ops.py
fi
# Compile and import every module before the tests: a failed build is an error here, not a
# silent fallback to the reference. The runtime is preloaded for this step too (torch's own
# allocations must go through it from the start, or the first free of one is a "bad-free");
# the compiler it runs inherits the preload, harmlessly.
export LD_PRELOAD="$asan:$ubsan"
python - <<'PY'
from symfast._build import CPU_OPS
from symfast._ext import load_cpu_kernels, load_errors
bad = {op: load_errors.get(op) for op in CPU_OPS if not load_cpu_kernels(op)}
if bad:
    raise SystemExit(f"sanitize.sh: sanitized build failed: {bad}")
print("sanitize.sh: built", ", ".join(CPU_OPS))
PY
python -m pytest -q -p no:cacheprovider "$@"
