#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md in one go (issue 7): kernel tests and timings,
# ours vs diffusers (DiT, DC-AE, whole pipeline: latency and throughput), 4096² memory, W8A8.
# Parts: kernels, sweeps, graphs, dit, dcae, pipeline, latency, pipeline-cl, memory, w8a8,
# compile.
# Run from the repository root on a CUDA machine with diffusers installed:
#
#   scripts/bench_gpu.sh [OUTDIR] [PARTS]     # PARTS: comma list, default "all" (see below)
#
# Every step is time-limited and a failing step does not stop the next; all output goes to
# OUTDIR/log.txt, and the benchmark harness updates docs/benchmarks.{md,json} (copied to
# OUTDIR at the end).
set -uo pipefail
OUTDIR=${1:-bench-gpu-out}
PARTS=${2:-all}
mkdir -p "$OUTDIR"
LOG="$OUTDIR/log.txt"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PY:-python3}

want() { [[ "$PARTS" == all || ",$PARTS," == *",$1,"* ]]; }
step() {  # step SECONDS TITLE COMMAND...
    local limit=$1 title=$2
    shift 2
    echo -e "\n### $title\n\$ $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    echo "[exit ${PIPESTATUS[0]}, $((SECONDS - t0)) s]" | tee -a "$LOG"
}

step 30 "machine" nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
    --format=csv
step 30 "versions" $PY -c "import torch, triton, diffusers, transformers; print(torch.__version__,
torch.version.cuda, triton.__version__, diffusers.__version__, transformers.__version__)"
if want kernels; then
    step 240 "kernel tests, compiled for this GPU" $PY -m pytest -q -p no:cacheprovider \
        tests/test_kernels.py
    step 120 "kernel timings" $PY bench/kernels.py --sizes 1024,2048,4096
fi
if want sweeps; then
    step 120 "dwconv + GLU kernel tiles" $PY bench/kernels.py --sweep-conv-tiles
    step 120 "int8 GEMM kernel tiles" $PY -m bench.quantize --device cuda --dtype bf16 \
        --tokens 2048,8192 --repeats 20 --sweep-tiles
fi
if want graphs; then
    step 120 "CUDA graph tests" $PY -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py
fi
if want dit; then
    step 240 "DiT forward, bf16" $PY -m bench compare --device cuda --what dit \
        --models sana-0.6b,sana-1.6b --sizes 512,1024,2048 --repeats 10
    step 120 "DiT forward, fp16" $PY -m bench compare --device cuda --what dit --dtype fp16 \
        --sizes 1024 --repeats 10
fi
if want dcae; then
    step 150 "DC-AE decode, bf16" $PY -m bench compare --device cuda --what dcae \
        --ae-sizes 512,1024 --repeats 5
fi
if want pipeline; then
    step 180 "pipeline latency, batch 1 (ours with CUDA graphs)" $PY -m bench compare \
        --device cuda --what pipeline --pipeline-repeats 3 --name compare-pipeline-bf16-cuda-batch1
    step 180 "pipeline throughput, batch 4" $PY -m bench compare --device cuda --what pipeline \
        --batch 4 --pipeline-repeats 2 --name compare-pipeline-bf16-cuda-batch4
    for flag in "" --no-cuda-graphs; do
        step 90 "ours ${flag:-with CUDA graphs}, batch 1" $PY -m bench.pipeline_run --impl ours \
            --device cuda --px 1024 --steps 20 --repeats 3 $flag
    done
fi
if want latency; then
    # Ours alone, batch 1, 1024², 20 steps, CUDA graphs: what each change buys.
    for flags in "" "--vae-channels-last" "--vae-channels-last --compile blocks"; do
        # shellcheck disable=SC2086  # flags holds several words on purpose
        step 240 "latency: ours ${flags:-(graphs only)}" $PY -m bench.pipeline_run --impl ours \
            --device cuda --px 1024 --steps 20 --repeats 5 $flags
    done
fi
if want pipeline-cl; then
    step 180 "pipeline latency, batch 1, both decoders channels-last" $PY -m bench compare \
        --device cuda --what pipeline --pipeline-repeats 3 --pipeline-vae-channels-last \
        --name compare-pipeline-bf16-cuda-batch1-cl
    step 180 "pipeline throughput, batch 4, both decoders channels-last" $PY -m bench compare \
        --device cuda --what pipeline --batch 4 --pipeline-repeats 2 \
        --pipeline-vae-channels-last --name compare-pipeline-bf16-cuda-batch4-cl
fi
if want memory; then
    step 150 "4096² image, ours, bf16: time and peak GPU memory" $PY -m bench.pipeline_run \
        --impl ours --device cuda --px 4096 --steps 20
fi
if want w8a8; then
    step 60 "W8A8 layers" $PY -m bench.quantize --device cuda --dtype bf16 --tokens 2048,8192 \
        --repeats 20
    step 120 "W8A8 pipeline, 1024² Sana-0.6B" $PY -m bench.pipeline_run --impl ours \
        --device cuda --px 1024 --steps 20 --repeats 3 --quantize w8a8
    step 200 "W8A8 quality, embedded model" $PY bench/quantize_quality.py --dtype bf16 \
        --seeds 0,1,2,3 --bench-prompts 8
fi
if want compile; then
    step 300 "pipeline latency, blocks compiled with CUDA graphs" $PY -m bench compare \
        --device cuda --what pipeline --pipeline-repeats 3 --pipeline-compile blocks-cudagraphs \
        --name compare-pipeline-bf16-cuda-batch1-cudagraphs
fi
cp docs/benchmarks.md docs/benchmarks.json "$OUTDIR"/ 2>/dev/null
echo "done" | tee -a "$LOG"
