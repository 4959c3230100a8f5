#!/usr/bin/env bash
# One seed method from training to a package ready to commit, inside one working session (issue #24).
#
#   MEDDIFFSEG_DATA=../shared/data bash bench/seed_session.sh CONFIG_STEM [RUNS_DIR]    (default runs/seeds)
#
# bench/train_seeds.sh trains all the seed methods side by side, one thread each, over several
# sessions; that needs the checkpoints outside git to survive from one session to the next, and
# they do not always (docs/methods.md). This runs one config (MedDiffSegLib/training/configs/seeds/
# CONFIG_STEM.json) with both cores on the training (OMP 2 threads: 0.38 s per DTS step on the
# 2-core Xeon, against 0.50 s with one thread), then:
#   1. the fp16 copy (bench/release_model.sh ... fp16) into RUNS_DIR/release/CONFIG_STEM/<name>;
#   2. that package scored on the protocol's test patients, seeds 0 1 2, two processes side by side
#      (seeds 0 1 | seed 2, then the fp32-against-fp16 check), then the three seeds recorded in its
#      model.json (bench/evaluate_protocol.py --record --resume: nothing is computed twice);
#   3. its near-organ uncertainty at 1 step x 5 samples (RUNS_DIR/uncertainty/<name>/) and its
#      seconds and peak memory per 512x512x200 CT (RUNS_DIR/speed/<name>.{one,all}.json), the
#      extras of bench/compare_models.py and bench/model_card.py.
# Each step resumes or is skipped when its output is there, so the same command continues.
# Nothing else CPU-heavy should run beside it: its two OpenMP threads take both cores.
# TRAIN_THREADS=1 trains (and pretrains) on one core instead, leaving the other for other work
# (one 1-thread DTS step takes about 0.50 s against 0.38 s with two threads).
set -euo pipefail
cd "$(dirname "$0")/.."
STEM=${1:?usage: seed_session.sh CONFIG_STEM [RUNS_DIR]}
RUNS=${2:-runs/seeds}
CONFIGS=MedDiffSegLib/training/configs/seeds
[ -f "$CONFIGS/$STEM.json" ] || { echo "no config $CONFIGS/$STEM.json" >&2; exit 2; }
mkdir -p "$RUNS"
log() { echo "== $* ($(date -u +%H:%M:%S))"; }
two() { OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 "$@"; }
TRAIN_THREADS=${TRAIN_THREADS:-2}
trainer() { OMP_NUM_THREADS=$TRAIN_THREADS MKL_NUM_THREADS=$TRAIN_THREADS "$@"; }

config=$CONFIGS/$STEM.json
if python -c "import json,sys; sys.exit(0 if 'init_from' in json.load(open(sys.argv[1])) else 1)" "$config"; then
    # DTS-SSL: the self-supervised pretraining first (its time counts in the method's budget)
    pre=$RUNS/$STEM-pretrain
    if [ ! -f "$pre/encoder.safetensors" ]; then
        log "pretrain $STEM"
        trainer python -m MedDiffSegLib pretrain --config "$CONFIGS/$STEM-pretrain.json" --out "$pre" --force --quiet \
            >>"$RUNS/$STEM-pretrain.log" 2>&1
    fi
    if [ "$RUNS" != runs/seeds ]; then  # the config names runs/seeds/<stem>-pretrain
        sed "s#runs/seeds/$STEM-pretrain#$pre#" "$config" >"$RUNS/$STEM.config.json"
        config=$RUNS/$STEM.config.json
    fi
fi
log "train $STEM"
trainer python -m MedDiffSegLib train --config "$config" --out "$RUNS/$STEM" --resume --amp bf16 --quiet \
    >>"$RUNS/$STEM.log" 2>&1 || { log "training stopped (see $RUNS/$STEM.log)"; exit 1; }

name=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['name'])" "$config")
pkg=$RUNS/$STEM/$name
rel=$RUNS/release/$STEM
ship=$rel/$name
ev=$RUNS/eval/$name
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
log fp16
bash bench/release_model.sh "$pkg" "$rel" fp16
log "score $name"
python bench/evaluate_protocol.py "$ship" --seeds 0 1 --resume --out "$ev" >"$RUNS/eval-$name-a.log" 2>&1 & a=$!
( python bench/evaluate_protocol.py "$ship" --seeds 2 --resume --out "$ev" >"$RUNS/eval-$name-b.log" 2>&1
  bash bench/release_model.sh "$pkg" "$rel" fp16check >"$RUNS/fp16check-$name.log" 2>&1 ) & b=$!
status=0
wait $a || status=1
wait $b || { log "fp16check failed or scoring stopped (see $RUNS/fp16check-$name.log)"; status=1; }
[ $status = 0 ] || exit 1
python bench/evaluate_protocol.py "$ship" --seeds 0 1 2 --record --resume --out "$ev" >"$RUNS/eval-$name.log" 2>&1
log "uncertainty $name"
if [ ! -f "$RUNS/uncertainty/$name/summary.json" ]; then
    two python bench/evaluate_uncertainty.py "$ship" --settings 1x5 --seed 0 --out "$RUNS/uncertainty/$name" \
        >"$RUNS/uncertainty-$name.log" 2>&1
fi
log "speed $name"
mkdir -p "$RUNS/speed"
for organ in one all; do
    [ -f "$RUNS/speed/$name.$organ.json" ] || two python bench/bench_segment.py --model "$ship" \
        --organ "$([ $organ = one ] && echo liver || echo all)" --samples 1 --json-out "$RUNS/speed/$name.$organ.json" \
        >>"$RUNS/speed.log" 2>&1
done
log "done: $ship (then bench/model_card.py $ship --limitations F --extras $RUNS; copy it over MedDiffSegLib/models/$name)"
