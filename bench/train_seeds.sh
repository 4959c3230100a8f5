#!/usr/bin/env bash
# Train the seed methods (issue #24) under one wall-time budget, resumable across sessions.
#
#   MEDDIFFSEG_DATA=../shared/data bash bench/train_seeds.sh [RUNS_DIR]      (default runs/seeds)
#
# Two queues side by side, one process and one thread each (both cores busy, no DDP), bf16 autocast;
# each config's steps were set so that a run takes about 80 core-minutes on this 2-core CPU
# (docs/methods.md, "Training budget"). Every run resumes from its newest checkpoint and a finished
# run is skipped, so the same command continues after a session ends. The latent methods take
# abdomen-ct 2.0's mask autoencoder: install that package (it is the built-in CT default) first.
# Logs: RUNS_DIR/<config>.log.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/seeds}
CONFIGS=MedDiffSegLib/training/configs/seeds
mkdir -p "$RUNS"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

train() {  # train CONFIG_STEM: resumes, or returns at once when the package is there
    python -m MedDiffSegLib train --config "$CONFIGS/$1.json" --out "$RUNS/$1" --resume --amp bf16 --quiet \
        >>"$RUNS/$1.log" 2>&1 && echo "$1: done" || { echo "$1: failed or stopped (see $RUNS/$1.log)"; return 1; }
}

queue_a() { train sdseg && train medsegdiff-v2 && train guided; }
queue_b() {
    if [ ! -f "$RUNS/dts-ssl-pretrain/encoder.safetensors" ]; then
        python -m MedDiffSegLib pretrain --config "$CONFIGS/dts-ssl-pretrain.json" --out "$RUNS/dts-ssl-pretrain" \
            --force --quiet >>"$RUNS/dts-ssl-pretrain.log" 2>&1
    fi
    # dts-ssl.json names runs/seeds/dts-ssl-pretrain; another RUNS_DIR gets its own copy of the config
    if [ "$RUNS" != runs/seeds ]; then
        sed "s#runs/seeds/dts-ssl-pretrain#$RUNS/dts-ssl-pretrain#" "$CONFIGS/dts-ssl.json" >"$RUNS/dts-ssl.config.json"
        python -m MedDiffSegLib train --config "$RUNS/dts-ssl.config.json" --out "$RUNS/dts-ssl" --resume --amp bf16 \
            --quiet >>"$RUNS/dts-ssl.log" 2>&1
    else
        train dts-ssl
    fi
    train dts && train meddelinea
}

# Ctrl-C (or kill -INT -- -PGID of this script) stops both trainings after their current step, with a
# checkpoint each; the same command resumes them.
queue_a & a=$!
queue_b & b=$!
status=0
wait $a || status=1
wait $b || status=1
exit $status
