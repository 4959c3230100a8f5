#!/usr/bin/env bash
# Segment the evaluation volumes of ../shared/data with a model and score them with
# `meddiffseg evaluate`. Usage: bash bench/evaluate_model.sh [MODEL] [OUTDIR] [SAMPLES]
# The numbers in a model card come from this script (see the card for the exact call); each
# volume's scores go to OUTDIR/<case>/scores.json and its time to OUTDIR/<case>.time.json, which
# bench/record_evaluation.py turns into the card's tables and the package's "metrics".
set -euo pipefail
MODEL=${1:-abdomen-ct-guided}
OUT=${2:-bench/results/eval-$(basename "$MODEL")}
SAMPLES=${3:-5}
ONLY=${ONLY:-}   # space-separated case names to run (default: all), e.g. ONLY=dcmqi-ct-3slice
DATA=${MEDDIFFSEG_DATA:-$(cd "$(dirname "$0")/../.." && pwd)/shared/data}
TS=$DATA/totalsegmentator
ORGANS=(liver spleen kidney_right kidney_left pancreas stomach gallbladder aorta)
TS_CODES=(5 1 2 3 7 6 4 52)   # TotalSegmentator CT code table, same order
organ_args=(); label_args=()
for i in "${!ORGANS[@]}"; do
  organ_args+=(--organ "${ORGANS[$i]}")
  label_args+=("${ORGANS[$i]}=$((i + 1)):${TS_CODES[$i]}")
done
mkdir -p "$OUT"
run() {  # name input gt labels...
  local name=$1 input=$2 gt=$3; shift 3
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
  local dir=$OUT/$name
  rm -rf "$dir"
  /usr/bin/time -o "$OUT/$name.time.json" -f '{"wall_s": %e, "peak_rss_kb": %M}' \
    meddiffseg segment "$input" "${organ_args[@]}" --model "$MODEL" --samples "$SAMPLES" --seed 0 \
      --device cpu --quiet --save-probabilities --out "$dir"
  echo "$name: $(cat "$OUT/$name.time.json")" >&2
  local probs=() spec
  for spec in "$@"; do probs+=("${spec%%=*}=$dir/probability_${spec%%=*}.nii.gz"); done
  meddiffseg evaluate --pred "$dir/segmentation.nii.gz" --gt "$gt" --labels "$@" \
    --uncertainty "$dir/uncertainty.nii.gz" --probabilities "${probs[@]}" --json "$dir/scores.json"
}
# Training patients (TotalSegmentator test CTs): how well the model fits what it saw.
run ts-ct "$TS/example_ct.nii.gz" "$TS/example_seg_fast_force_split.nii.gz" "${label_args[@]}"
run ts-ct-dicom "$TS/example_ct_dicom" "$TS/example_seg_dicom.nii.gz" "${label_args[@]}"
# Unseen patient from another source (dcmqi test data): liver only is labelled (value 1).
run dcmqi-ct-3slice "$DATA/dcmqi/ct-3slice" "$DATA/dcmqi/liver_spine_seg.nrrd" "liver=1:1"
