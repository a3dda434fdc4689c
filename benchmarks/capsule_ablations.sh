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
common="experiment=capsule_sdc_ccm_cpu data.root=$root data.dtd_root=$dtd trainer.max_time=$budget"
corruption=model.objective.corruption
exec "$(dirname "$0")/side_by_side.sh" "$out" "$parallel" \
  "full $common" \
  "no_corruption $common $corruption.prob=0" \
  "textures_only $common $corruption.texture_prob=1 $corruption.elastic_prob=0" \
  "elastic_only $common $corruption.texture_prob=0 $corruption.elastic_prob=1" \
  "concat_skips $common model.net.skip=concat" \
  "no_skips $common model.net.skip=none" \
  "no_sdc $common model.net.sdc=false"
