#!/usr/bin/env bash
# From a finished training run to a package ready to ship: fp16 storage, choices on held-out
# training patients, then scores on the test patients. Each step writes into the staged package's
# model.json or into the docs; the steps up to protocol are skipped when their output is already
# there, so the same command continues after an interruption (name the steps to run only those).
#
#   MEDDIFFSEG_DATA=../shared/data bash bench/release_model.sh RUN_PACKAGE_DIR OUT_DIR [STEP ...]
#
# RUN_PACKAGE_DIR: the package the training wrote (e.g. runs/abdomen-ct-2/abdomen-ct).
# OUT_DIR: the staged fp16 package goes to OUT_DIR/<name>, reports to OUT_DIR/reports/.
# STEPs (default: all, in this order):
#   fp16          copy with weights stored in fp16 (registry.package.convert_weights)
#   fp16check     the fp32 and fp16 packages on two test patients: per-organ Dice must agree
#   postprocess   bench/choose_postprocessing.py --record   (the config's validation patients)
#   calibrate     bench/fit_calibration.py --held-out --record (the same held-out patients)
#   protocol      bench/evaluate_protocol.py --seeds 0 1 --precision fp32 --record --doc docs/evaluation.md
#   uncertainty   bench/evaluate_uncertainty.py --settings 1x5 1x10 --doc docs/uncertainty.md
#   interactive   bench/evaluate_interactive.py: oracle clicks (auto, box; 1 sample), then suggested and model-free
#                 clicks against the oracle (5 samples, the benchmark organs)
# Then copy OUT_DIR/<name> over MedDiffSegLib/models/<name>, write its MODEL_CARD.md, and commit once.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${1:?usage: release_model.sh RUN_PACKAGE_DIR OUT_DIR [STEP ...]}
OUT=${2:?usage: release_model.sh RUN_PACKAGE_DIR OUT_DIR [STEP ...]}
shift 2
STEPS=${*:-fp16 fp16check postprocess calibrate protocol uncertainty interactive}
NAME=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['name'])" "$SRC/model.json")
PKG="$OUT/$NAME"
MODALITY=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['preprocessing']['modality'])" "$SRC/model.json")
BENCHMARK=$(python -c "import json,sys; d=json.load(open('bench/protocol.json'))['datasets']; \
print(' '.join(next(v['organs'] for v in d.values() if v['modality'] == sys.argv[1])))" "$MODALITY")
REPORTS="$OUT/reports"
mkdir -p "$REPORTS"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

has() {  # has KEY.PATH: the staged model.json holds that (dotted) key
    python - "$PKG/model.json" "$1" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
for k in sys.argv[2].split("."):
    if not isinstance(d, dict) or k not in d:
        sys.exit(1)
    d = d[k]
EOF
}

step() { echo "== $1 ($(date -u +%H:%M:%S))"; }

for s in $STEPS; do
    case $s in
    fp16)
        step fp16
        [ -f "$PKG/model.json" ] || python -c "import sys; from MedDiffSegLib.registry.package import convert_weights; \
convert_weights(sys.argv[1], sys.argv[2], 'float16')" "$SRC" "$PKG" ;;
    fp16check)
        step fp16check
        for p in "$SRC" "$PKG"; do
            tag=$([ "$p" = "$SRC" ] && echo fp32 || echo fp16)
            [ -f "$REPORTS/fp16check-$tag/summary.json" ] || python bench/evaluate_protocol.py "$p" \
                --cases btcv_0007 btcv_0021 chaos_t2_05 chaos_t2_15 --precision fp32 --out "$REPORTS/fp16check-$tag"
        done
        python - "$REPORTS" <<'EOF'
import json, sys
from pathlib import Path
r = Path(sys.argv[1])
a, b = (json.loads((r / f"fp16check-{t}" / "summary.json").read_text()) for t in ("fp32", "fp16"))
worst = 0.0
for ds, res in a["results"].items():
    for seed, s in res["per_seed"].items():
        for organ, v in s["organs"].items():
            worst = max(worst, abs(v["dice_mean"] - b["results"][ds]["per_seed"][seed]["organs"][organ]["dice_mean"]))
print(f"fp16 against fp32: largest difference in an organ's mean Dice {worst:.4f}")
sys.exit(0 if worst <= 0.005 else 1)
EOF
        ;;
    postprocess)
        step postprocess
        has inference.largest_component || python bench/choose_postprocessing.py "$PKG" --record \
            --json-out "$REPORTS/postprocessing.json" ;;
    calibrate)
        step calibrate
        has inference.calibration || python bench/fit_calibration.py "$PKG" --held-out --record ;;
    protocol)
        step protocol
        has metrics.protocol || python bench/evaluate_protocol.py "$PKG" --seeds 0 1 --precision fp32 --record \
            --doc docs/evaluation.md --out "$REPORTS/protocol" ;;
    uncertainty)
        step uncertainty
        python bench/evaluate_uncertainty.py "$PKG" \
            --settings 1x5 1x10 --doc docs/uncertainty.md --label calibrated --out "$REPORTS/uncertainty" ;;
    interactive)
        step interactive
        # the challenge's protocol (automatic result or box, then 5 oracle clicks), 1 sample; then the suggested
        # and the model-free clicks against the oracle at 5 samples (suggestions need a variance)
        python bench/evaluate_interactive.py "$PKG" --samples 1 --variants auto box --doc docs/interactive.md \
            --label oracle --out "$REPORTS/interactive-oracle"
        python bench/evaluate_interactive.py "$PKG" --samples 5 --variants auto suggested model-free \
            --organs $BENCHMARK --doc docs/interactive.md --label suggestions --out "$REPORTS/interactive-suggestions" ;;
    *)
        echo "unknown step $s" >&2; exit 2 ;;
    esac
done
echo "staged: $PKG (reports in $REPORTS)"
