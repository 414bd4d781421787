#!/usr/bin/env bash
# Continue training the embedded default model's DiT on one GPU: fresh Shapes data at 256 and
# 512 px, stage 1 (configs/train/shapes-gpu-stage1.yaml), stage 2 (shapes-gpu-stage2.yaml),
# then ShapesBench on the stage-2 export. Run from the repository root; docs/shapes.md
# ("GPU training") has the results of each run. Writes into data/, cache/, runs/ and out/.
#
#   scripts/train_shapes_gpu.sh [PHASES]     # comma list of data256,data512,stage1,stage2,bench
#                                            # ("data" = both data phases; default: all)
#
# Every phase can run on its own (e.g. two variants share the data phases, then train side by
# side: a model this small leaves the GPU mostly idle). A dataset that is complete
# (shapes_info.json written) is not made again; caching skips what is cached.
#
#   scripts/train_shapes_gpu.sh data                        # then, side by side:
#   TAG=a scripts/train_shapes_gpu.sh stage1,stage2,bench &
#   TAG=b SET="objective.high_sigma_fraction=0.3" scripts/train_shapes_gpu.sh stage1,stage2,bench
#   N256=200 N512=100 STEPS1=10 STEPS2=5 BATCH1=32 BATCH2=16 BENCH_ARGS="--images-per-prompt 1" \
#       scripts/train_shapes_gpu.sh          # a rehearsal in a few minutes on a CPU
#
# Both stage configs keep the sin-cos PE on (interpolation_scale 1.0, base grid 16): the
# shipped model has had it since session 18, after CPU stages that taught it the relation
# order (docs/shapes.md, sessions 12-18). The layout is learnt only from samples at σ next to 1, so
# the next GPU run should draw many there on relation-rich data with the relation caption
# nearly always drawn: stage 1 then sees ≈ 10⁵ relation captions at σ ≥ 0.95 (the CPU
# stages saw a few 10⁴). Keep the default scene kinds in the mix: on the CPU, data that was
# nearly all relation pairs lost the object rendering (sessions 13-15) and the default mix
# brought it back (sessions 16-17).
#   SCENE_MIX=pair=0.45,mixed=0.1,relation=0.8 scripts/train_shapes_gpu.sh data
#   L="data.caption_temperature=0.02 checkpointing.every=500"
#   SCENE_MIX=pair=0.45,mixed=0.1,relation=0.8 TAG=layout-30 \
#       SET="$L objective.high_sigma_fraction=0.3" scripts/train_shapes_gpu.sh stage1,stage2,bench &
#   SCENE_MIX=pair=0.45,mixed=0.1,relation=0.8 TAG=layout-50 \
#       SET="$L objective.high_sigma_fraction=0.5" scripts/train_shapes_gpu.sh stage1,stage2,bench
set -euo pipefail
PHASES=${1:-all}
FASTSANA=${FASTSANA:-fastsana}           # e.g. "python3 -m fastsana.cli" without an install
TAG=${TAG:-gpu}                          # runs/$TAG-stage1, runs/$TAG-stage2, out/$TAG-bench
SET=${SET:-}                             # extra "key=value" overrides for both stages
# Defaults: the session-5 GPU recipe (docs/shapes.md, "GPU continuation (session 5)");
# session 4 used N256=30000 SEED256=10 SEED512=11 STEPS1=4000 BATCH1=128 STEPS2=800 BATCH2=64.
N256=${N256:-40000}                      # stage-1 scenes (the CPU run had 5,000)
N512=${N512:-20000}                      # stage-2 scenes (the CPU run had 800)
SEED256=${SEED256:-20}                   # dataset seeds: fresh scenes for every session
SEED512=${SEED512:-21}
STEPS1=${STEPS1:-3000}
STEPS2=${STEPS2:-1500}
BATCH1=${BATCH1:-256}
BATCH2=${BATCH2:-128}
SCENE_MIX=${SCENE_MIX:-}                 # e.g. "pair=0.55,mixed=0,relation=0.9" (shapes make)
WORKERS=${WORKERS:-$(nproc)}
BENCH_ARGS=${BENCH_ARGS:-}
PARTS=src/fastsana/assets/sana-shapes    # the shipped VAE, text encoder and tokenizer
CACHE_ARGS=(--pipeline "$PARTS" --text-max-length 24 --no-instruction)
MIX_TAG=${SCENE_MIX:+-mix$(echo "$SCENE_MIX" | tr -c 'a-z0-9.\n' '_')}   # other data, other folders
D256=data/shapes-256-s$SEED256-n$N256$MIX_TAG
D512=data/shapes-512-s$SEED512-n$N512$MIX_TAG
C256=cache/shapes-256-s$SEED256-n$N256$MIX_TAG
C512=cache/shapes-512-s$SEED512-n$N512$MIX_TAG

want() {  # want NAME... : is any of these phases asked for?
    local name
    for name in "$@"; do [[ "$PHASES" == all || ",$PHASES," == *",$name,"* ]] && return 0; done
    return 1
}
make_data() {  # make_data DIR SIZE SEED N
    [[ -f "$1/shapes_info.json" ]] || $FASTSANA shapes make "$1" --n "$4" --size "$2" \
        --seed "$3" --workers "$WORKERS" ${SCENE_MIX:+--scene-mix "$SCENE_MIX"}
}
sets=()
for kv in $SET; do sets+=(--set "$kv"); done
mkdir -p runs

# Rendered on the CPU, then encoded (VAE latents, text states) on the GPU.
if want data256 data; then
    make_data "$D256" 256 "$SEED256" "$N256"
    $FASTSANA cache "$D256" "$C256" "${CACHE_ARGS[@]}" --base-size 256 --batch-size 256
fi
if want data512 data; then
    make_data "$D512" 512 "$SEED512" "$N512"
    $FASTSANA cache "$D512" "$C512" "${CACHE_ARGS[@]}" --base-size 512 --batch-size 128
fi
if want stage1; then
    $FASTSANA train configs/train/shapes-gpu-stage1.yaml --set output_dir="runs/$TAG-stage1" \
        --set data.cache_dir="$C256" --set data.batch_size="$BATCH1" \
        --set schedule.max_steps="$STEPS1" "${sets[@]}"
fi
if want stage2; then
    $FASTSANA train configs/train/shapes-gpu-stage2.yaml --set output_dir="runs/$TAG-stage2" \
        --set model.init_from="runs/$TAG-stage1" --set data.cache_dir="$C512" \
        --set data.batch_size="$BATCH2" --set schedule.max_steps="$STEPS2" "${sets[@]}"
fi
if want bench; then
    # shellcheck disable=SC2086  # BENCH_ARGS holds several words on purpose
    $FASTSANA shapes bench --model "runs/$TAG-stage2/export" --images-per-prompt 4 \
        --batch-size 64 --out "out/$TAG-bench" $BENCH_ARGS
fi
