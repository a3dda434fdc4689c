#!/usr/bin/env bash
# Ablations of Model II on real capsule at 128 px, every row with the same CPU budget, then one
# results table (report.md / report.csv in the output folder).
#
#   benchmarks/capsule_ablations.sh MVTEC_ROOT DTD_ROOT [BUDGET] [OUT] [PARALLEL]
#
# BUDGET is a trainer.max_time (default 00:00:08:00); PARALLEL rows run at once, each with
# 2 / PARALLEL threads (default 2 rows, one core each).
set -euo pipefail
root=$1 dtd=$2 budget=${3:-00:00:08:00} out=${4:-logs/ablations} parallel=${5:-2}
export OMP_NUM_THREADS=$(( 2 / parallel > 0 ? 2 / parallel : 1 ))
rows=(
  "full"
  "no_corruption model.objective.corruption.prob=0"
  "textures_only model.objective.corruption.texture_prob=1 model.objective.corruption.elastic_prob=0"
  "elastic_only model.objective.corruption.texture_prob=0 model.objective.corruption.elastic_prob=1"
  "concat_skips model.net.skip=concat"
  "no_skips model.net.skip=none"
  "no_sdc model.net.sdc=false"
)
run_row() {
  read -r name overrides <<< "$1"
  python train.py experiment=capsule_sdc_ccm_cpu data.root="$root" data.dtd_root="$dtd" \
    trainer.max_time="$budget" hydra.run.dir="$out/$name" $overrides > "$out/$name.log" 2>&1
  echo "done: $name"
}
export -f run_row
export root dtd budget out
mkdir -p "$out"
printf '%s\n' "${rows[@]}" | xargs -P "$parallel" -I{} bash -c 'run_row "{}"'
python -m anomaly.report "$out"
