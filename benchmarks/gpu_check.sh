#!/usr/bin/env bash
# One go on a machine with a CUDA GPU, in under 8 minutes, everything written to one folder:
#   1. `symfast info` and nvidia-smi;
#   2. the tests that run on CUDA tensors: every `triton` backend case (tests/conftest.py puts
#      them on the GPU when CUDA is available, compiled instead of interpreted) and the CUDA
#      profiling tests; fuzz examples cut to SYMFAST_FUZZ_EXAMPLES (default 10) to fit the time;
#   3. `symfast bench all --device cuda --quick` (CUDA-event timing, limits measured on the GPU);
#   4. `symfast profile sample --device cuda` (kernel time per category, trace.json);
#   5. `symfast train` on the GPU (a process finds CUDA and takes it): a tiny WT run that writes
#      checkpoints of CUDA tensors, a sample grid, then resumes from its checkpoint to more steps.
# Each stage has its own timeout (30 + 240 + 120 + 40 + 40 s: 7.8 min at most) and the script goes
# on after a failure, so one run reports all of them; it exits non-zero if any stage failed.
# Not run on a GPU yet (written on a CPU-only machine): the timeouts are estimates.
#
#   OUT=/some/folder bash benchmarks/gpu_check.sh      # default: ./gpu-check-<UTC time>
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-check-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's symfast, installed or not

if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check.sh: torch finds no CUDA device here; run it on a GPU machine" >&2
    exit 2
fi

failed=()
stage() {  # stage NAME SECONDS COMMAND...: run with a timeout, log to $OUT/NAME.txt
    local name=$1 seconds=$2
    shift 2
    echo "== $name (at most ${seconds}s): $*"
    local start=$SECONDS
    timeout "$seconds" "$@" 2>&1 | tee "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start))s"
    [ "$rc" -eq 0 ] || failed+=("$name (exit $rc)")
}

stage info 30 python -m symfast info
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
stage tests 240 env SYMFAST_FUZZ_EXAMPLES="${SYMFAST_FUZZ_EXAMPLES:-10}" \
    python -m pytest -q -p no:cacheprovider -k "triton or cuda" --maxfail=30 \
    --junitxml="$OUT/pytest.xml" tests
stage bench 120 python -m symfast bench all --device cuda --quick --out "$OUT/bench"
stage profile 40 python -m symfast profile sample --device cuda --steps 4 --out "$OUT/profile-sample"
train=(python -m symfast train --data digits --image-size 8 --channels 8,16 --heads 2
       --equivariance wt --batch-size 8 --checkpoint-every 3 --sample-every 6 --out "$OUT/train")
stage train 40 bash -c '"$@" --steps 6 && "$@" --steps 9 --resume auto' train "${train[@]}"

echo
echo "results in $OUT"
if [ ${#failed[@]} -gt 0 ]; then
    printf 'failed: %s\n' "${failed[@]}"
    exit 1
fi
echo "all stages passed"
