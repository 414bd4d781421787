#!/usr/bin/env bash
# Continue training the embedded default model's DiT on one GPU: fresh Shapes data at 256 and
# 512 px, stage 1 (configs/train/shapes-gpu-stage1.yaml), stage 2 (shapes-gpu-stage2.yaml),
# then ShapesBench on the stage-2 export. Run from the repository root; docs/shapes.md
# ("GPU training") has the results of a run. Writes into data/, cache/, runs/ and out/.
#
#   scripts/train_shapes_gpu.sh
#   N256=200 N512=100 STEPS1=10 STEPS2=5 BENCH_ARGS="--prompts-per-category 1" \
#       scripts/train_shapes_gpu.sh          # a rehearsal in a few minutes on a CPU
set -euo pipefail
FASTSANA=${FASTSANA:-fastsana}           # e.g. "python3 -m fastsana.cli" without an install
N256=${N256:-30000}                      # stage-1 scenes (the CPU run had 5,000)
N512=${N512:-20000}                      # stage-2 scenes (the CPU run had 800)
STEPS1=${STEPS1:-6000}
STEPS2=${STEPS2:-2500}
WORKERS=${WORKERS:-$(nproc)}
BENCH_ARGS=${BENCH_ARGS:-}
PARTS=src/fastsana/assets/sana-shapes    # the shipped VAE, text encoder and tokenizer
CACHE_ARGS=(--pipeline "$PARTS" --text-max-length 24 --no-instruction)

# Both datasets are rendered on the CPU; the 512-px one in the background during stage 1.
mkdir -p runs
$FASTSANA shapes make data/gpu-256 --n "$N256" --size 256 --seed 10 --workers "$WORKERS"
$FASTSANA shapes make data/gpu-512 --n "$N512" --size 512 --seed 11 --workers "$WORKERS" \
    > runs/make-512.log 2>&1 &
make512=$!
$FASTSANA cache data/gpu-256 cache/gpu-256 "${CACHE_ARGS[@]}" --base-size 256 --batch-size 256
$FASTSANA train configs/train/shapes-gpu-stage1.yaml --set schedule.max_steps="$STEPS1"
wait "$make512"
$FASTSANA cache data/gpu-512 cache/gpu-512 "${CACHE_ARGS[@]}" --base-size 512 --batch-size 128
$FASTSANA train configs/train/shapes-gpu-stage2.yaml --set schedule.max_steps="$STEPS2"
# shellcheck disable=SC2086  # BENCH_ARGS holds several words on purpose
$FASTSANA shapes bench --model runs/gpu-stage2/export --images-per-prompt 2 --batch-size 64 \
    --out out/shapes-bench-gpu-stage2 $BENCH_ARGS
