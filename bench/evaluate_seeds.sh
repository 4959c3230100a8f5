#!/usr/bin/env bash
# Score the seed-method packages of bench/train_seeds.sh under the protocol (issue #24), resumable.
#
#   MEDDIFFSEG_DATA=../shared/data bash bench/evaluate_seeds.sh [RUNS_DIR]      (default runs/seeds)
#
# Every package in RUNS_DIR/<config>/<name>/ is scored on the protocol's test patients with all its
# organs prompted together, 1 sample, its default steps, seeds 0 1 2 (bench/evaluate_protocol.py
# --record writes the scores into the package's model.json); two queues side by side, one thread
# each. Then, for them and the CT default, the uncertainty at 1 step × 5 samples
# (bench/evaluate_uncertainty.py, seed 0, into RUNS_DIR/uncertainty/<name>/) on the same queues; last,
# alone on the machine, the seconds and peak memory per 512×512×200 CT (bench/bench_segment.py, 1
# sample: the liver, then all organs; RUNS_DIR/speed/<name>.{one,all}.json). Whatever is already
# there is skipped, and a package's scoring continues from its case reports (evaluate_protocol.py --resume), so
# the same command resumes. Then
#   python bench/compare_models.py RUNS_DIR/*/abdomen-ct-* MedDiffSegLib/models/abdomen-ct --extras RUNS_DIR
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
    python bench/evaluate_protocol.py "$1" --seeds 0 1 2 --record --resume --out "$RUNS/eval/$(basename "$1")" \
        >>"$RUNS/eval-$(basename "$1").log" 2>&1 && echo "$1: scored" || { echo "$1: failed (see log)"; return 1; }
}

uncertainty() {  # uncertainty PACKAGE_DIR: the 1x5 setting on every test patient
    local name out
    name=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['name'])" "$1/model.json")
    out="$RUNS/uncertainty/$name"
    if python -c "import json,sys; sys.exit(0 if len(json.load(open(sys.argv[1])).get('cases', [])) >= 6 else 1)" \
        "$out/summary.json" 2>/dev/null; then
        echo "$name: uncertainty already measured"
        return 0
    fi
    python bench/evaluate_uncertainty.py "$1" --settings 1x5 --seed 0 --out "$out" >>"$RUNS/uncertainty-$name.log" 2>&1 \
        && echo "$name: uncertainty measured" || { echo "$name: uncertainty failed (see log)"; return 1; }
}

speed() {  # speed PACKAGE_DIR: one organ and all organs, 1 sample, each in a fresh process
    local name
    name=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['name'])" "$1/model.json")
    mkdir -p "$RUNS/speed"
    [ -f "$RUNS/speed/$name.one.json" ] || OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 python bench/bench_segment.py \
        --model "$1" --organ liver --samples 1 --json-out "$RUNS/speed/$name.one.json" >>"$RUNS/speed.log" 2>&1
    [ -f "$RUNS/speed/$name.all.json" ] || OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 python bench/bench_segment.py \
        --model "$1" --organ all --samples 1 --json-out "$RUNS/speed/$name.all.json" >>"$RUNS/speed.log" 2>&1
    echo "$name: speed measured"
}

mapfile -t packages < <(find "$RUNS" -mindepth 3 -maxdepth 3 -name model.json -path "$RUNS/*/abdomen-ct-*" \
    -printf '%h\n' | sort)
[ ${#packages[@]} -gt 0 ] || { echo "no packages in $RUNS (run bench/train_seeds.sh first)" >&2; exit 1; }
mkdir -p "$RUNS/eval"
a=() b=()
for i in "${!packages[@]}"; do
    if (( i % 2 )); then b+=("${packages[$i]}"); else a+=("${packages[$i]}"); fi
done
b+=(MedDiffSegLib/models/abdomen-ct)  # the default: its uncertainty under the same command (not re-scored)
( for p in "${a[@]}"; do score "$p"; done; for p in "${a[@]}"; do uncertainty "$p"; done ) & pa=$!
( for p in "${b[@]}"; do [ "$p" = MedDiffSegLib/models/abdomen-ct ] || score "$p"; done
  for p in "${b[@]}"; do uncertainty "$p"; done ) & pb=$!
status=0
wait $pa || status=1
wait $pb || status=1
for p in "${packages[@]}" MedDiffSegLib/models/abdomen-ct; do speed "$p" || status=1; done
exit $status
