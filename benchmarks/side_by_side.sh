#!/usr/bin/env bash
# Training runs side by side, each into its own folder, then one results table (report.md and
# report.csv in OUT, a mean row per model when several categories are present).
#
#   benchmarks/side_by_side.sh OUT PARALLEL "NAME OVERRIDES..." ["NAME OVERRIDES..." ...]
#
# Each row is a run name (its folder OUT/NAME, its log OUT/NAME.log) and train.py overrides.
# PARALLEL rows run at once, each with 2 / PARALLEL threads (at least 1). A row that fails is
# named with its log; the report still covers the others, and the script exits 1. For example,
# both categories of the shared data with the Model II preset, one core each:
#
#   benchmarks/side_by_side.sh /tmp/categories 2 \
#     "capsule experiment=capsule_sdc_ccm_cpu data.root=R data.dtd_root=D data.category=capsule" \
#     "bottle experiment=capsule_sdc_ccm_cpu data.root=R data.dtd_root=D data.category=bottle"
set -euo pipefail
out=$1 parallel=$2
shift 2
export OMP_NUM_THREADS=$(( 2 / parallel > 0 ? 2 / parallel : 1 ))
run_row() {
  read -r name overrides <<< "$1"
  # shellcheck disable=SC2086  # the overrides are separate words
  if python train.py hydra.run.dir="$out/$name" $overrides > "$out/$name.log" 2>&1; then
    echo "done: $name"
  else
    echo "failed: $name (see $out/$name.log)" >&2
    return 1
  fi
}
export -f run_row
export out
mkdir -p "$out"
failed=0
printf '%s\n' "$@" | xargs -P "$parallel" -I{} bash -c 'run_row "{}"' || failed=1
python -m anomaly.report "$out"
exit "$failed"
