#!/usr/bin/env bash
# Every GPU figure issues 3 and 8 ask for, in one call of a lent H100/H200 (about 9 minutes).
#
# Here (once):   make gpu-wheels          # .whl/: diffusers, pydantic(-settings) for Python 3.12
# On the GPU:    bash benchmarks/gpu_session.sh   (device tool: carry [".whl"], timeout_s 600)
#
# The machine has torch + CUDA and no network; the wheels go to /tmp/site. Each benchmark has
# its own time bound, so one that runs long costs its own figures only. Results land in
# benchmarks/results/ (naming the card and the command) and are copied to $OUT to come back.
set -u
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DO_NOT_TRACK=true
OUT="${OUT:-/tmp/gpu-out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/card.txt"

run() {  # run SECONDS CMD...: bounded, logged, never stops the session
    local limit=$1
    shift
    echo "== $* (at most ${limit}s)"
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/session.log" | tail -30
    echo "== exit ${PIPESTATUS[0]}"
}

# issue 3: sd21 shapes, bf16: personalization (solo, pack 8) and tiled restore memory growth
run 200 python3 benchmarks/gpu_check.py --base sd21 --device cuda --dtype bfloat16 --pack 8
# issue 8: packs 1/4/8/16, restore 50 steps batch 1/8/32 eager + CUDA graphs, adapter swaps
run 200 python3 benchmarks/bench_perf.py --base sd21 --device cuda --dtype bfloat16 --compile-mode reduce-overhead
# issue 8: fp32 base under bf16 autocast with gradient checkpointing (memory per pack)
run 120 python3 benchmarks/bench_perf.py --base sd21 --device cuda --autocast-bf16 --gradient-checkpointing

cp benchmarks/results/gpu_check_* benchmarks/results/perf_gpu_* "$OUT/" 2>/dev/null
ls -l "$OUT"
