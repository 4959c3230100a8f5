#!/usr/bin/env bash
# Score the seed-method packages of bench/train_seeds.sh under the protocol (issue #24), resumable.
#
#   MEDDIFFSEG_DATA=../shared/data bash bench/evaluate_seeds.sh [RUNS_DIR]      (default runs/seeds)
#
# Every package in RUNS_DIR/<config>/<name>/ is scored on the protocol's test patients with all its
# organs prompted together, 1 sample, its default steps, seeds 0 1 2 (bench/evaluate_protocol.py
# --record writes the scores into the package's model.json); two queues side by side, one thread
# each. A package whose model.json already holds protocol scores is skipped. Then
#   python bench/compare_models.py RUNS_DIR/*/abdomen-ct-* MedDiffSegLib/models/abdomen-ct
# prints the comparison of docs/methods.md.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/seeds}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

score() {  # score PACKAGE_DIR
    if python -c "import json,sys; sys.exit(0 if json.load(open(sys.argv[1])).get('metrics', {}).get('protocol') else 1)" \
        "$1/model.json"; then
        echo "$1: already scored"
        return 0
    fi
    python bench/evaluate_protocol.py "$1" --seeds 0 1 2 --record --out "$RUNS/eval/$(basename "$1")" \
        >>"$RUNS/eval-$(basename "$1").log" 2>&1 && echo "$1: scored" || { echo "$1: failed (see log)"; return 1; }
}

mapfile -t packages < <(find "$RUNS" -mindepth 3 -maxdepth 3 -name model.json -path "$RUNS/*/abdomen-ct-*" \
    -printf '%h\n' | sort)
[ ${#packages[@]} -gt 0 ] || { echo "no packages in $RUNS (run bench/train_seeds.sh first)" >&2; exit 1; }
mkdir -p "$RUNS/eval"
a=() b=()
for i in "${!packages[@]}"; do
    if (( i % 2 )); then b+=("${packages[$i]}"); else a+=("${packages[$i]}"); fi
done
( for p in "${a[@]}"; do score "$p"; done ) & pa=$!
( for p in "${b[@]}"; do score "$p"; done ) & pb=$!
status=0
wait $pa || status=1
wait $pb || status=1
exit $status
