#!/usr/bin/env bash
# Re-measure every committed result in benchmarks/results/ and regenerate the README's tables
# from them. Run it on a machine with nothing else running (about 40 minutes on 2 cores): the
# README's figures are then all from one machine, named beside each of them.
#
#   bash benchmarks/refresh_results.sh            # everything
#   bash benchmarks/refresh_results.sh attention  # only the scripts whose name holds a word given
set -euo pipefail
cd "$(dirname "$0")/.."
logs="${TMPDIR:-/tmp}/symfast-refresh"
mkdir -p "$logs"

run() {  # run NAME COMMAND...: skipped unless NAME matches a word given on the command line
  local name="$1"; shift
  if [ "${#WANT[@]}" -gt 0 ] && ! printf '%s\n' "${WANT[@]}" | grep -qx "$name"; then return; fi
  echo "== $name: $* ($(date -u +%H:%M:%S))"
  local t0=$SECONDS
  "$@" > "$logs/$name.log" 2>&1 || { echo "$name failed; see $logs/$name.log"; tail -20 "$logs/$name.log"; exit 1; }
  echo "   done in $((SECONDS - t0)) s"
}

WANT=("$@")
run group_average python benchmarks/bench_group_average.py
run sampler python benchmarks/bench_sampler.py
run classifier_select python benchmarks/bench_classifier_select.py
run attention python benchmarks/bench_attention.py
run group_norm_silu python benchmarks/bench_group_norm_silu.py
run tied_conv python benchmarks/bench_tied_conv.py
run integrations python benchmarks/bench_integrations.py  # 5 repeats: 2 (--quick) swing ±6%
run sfbd python benchmarks/bench_sfbd.py
run train python benchmarks/bench_train.py
run bench_all python -m symfast bench all --sizes readme --dtypes fp32 \
    --backends reference,compile,cpu --out "$logs/bench_all"
if [ -f "$logs/bench_all/bench.csv" ]; then
  python benchmarks/readme_tables.py "$logs/bench_all/bench.csv" --commit-results
else
  python benchmarks/readme_tables.py benchmarks/results/bench_all.csv
fi
