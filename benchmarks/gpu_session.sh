#!/usr/bin/env bash
# One GPU session's checks, in the order that tells the most per minute, within a time
# budget (a lent GPU machine gives one command 10 minutes and a whole session 15):
#
#   bash benchmarks/gpu_session.sh [OUT_DIR] [BUDGET_S]      # defaults: $OUT or gpu_session, 480
#
# Steps: offline install (and DeepSpeed from $WHEELS, if set and DeepSpeed is missing),
# `jrcl-fast doctor`, the loss benchmark at issue 11's rows (N = 16,384 and 131,072,
# C = 8,142), the GPU tests of the kernels and of the GPU rules, and digits-lt runs side
# by side, 30 epochs each: the default config (bf16 through DeepSpeed, or fp32 on the
# local engine where DeepSpeed does not import), group norm, and, with DeepSpeed, fp16
# at ZeRO stage 1. A step starts only if its time limit fits in what is left of the
# budget; each writes OUT_DIR/NAME.txt (and its JSON), and OUT_DIR/summary.txt lists
# every step with its exit status and time. OUT_DIR/machine.txt names the card.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-gpu_session}}
BUDGET=${2:-480}
if ! nvidia-smi -L >/dev/null 2>&1 && [ -z "${GPU_SESSION_ON_CPU:-}" ]; then
    echo "gpu_session.sh: no GPU here (nvidia-smi -L failed); run it on the GPU machine" >&2
    exit 1
fi
mkdir -p "$OUT"
START=$(date +%s)

step() {  # step NAME LIMIT_S COMMAND...: run it, killed after LIMIT_S, if LIMIT_S still fits
    local name=$1 limit=$2 began rc
    shift 2
    if (($(date +%s) - START + limit > BUDGET)); then
        echo "$name skipped (budget)" | tee -a "$OUT/summary.txt"
        return
    fi
    began=$(date +%s)
    if [ "$(type -t "$1")" = function ]; then  # a function applies LIMIT to what it starts
        LIMIT=$limit "$@" >"$OUT/$name.txt" 2>&1
    else
        timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    fi
    rc=$?
    echo "$name rc=$rc $(($(date +%s) - began))s" | tee -a "$OUT/summary.txt"
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__)"
    git rev-parse --short HEAD 2>/dev/null
} >"$OUT/machine.txt" 2>&1

step install 120 pip install --no-build-isolation --no-deps -e .
if ! python -c "import deepspeed" 2>/dev/null && [ -n "${WHEELS:-}" ]; then
    # The wheels of DeepSpeed's pure-Python dependencies, and its sdist (built here).
    step install_deepspeed 180 pip install --no-index --find-links "$WHEELS" --no-build-isolation --no-deps \
        "$WHEELS"/*.whl "$WHEELS"/deepspeed-*.tar.gz
fi
ENGINE=()
python -c "import deepspeed" 2>/dev/null || ENGINE=(--set train.engine=local)

step doctor 90 jrcl-fast doctor --out "$OUT/doctor.json"
step bench_losses_16k 150 python benchmarks/bench_losses.py --quick --sizes 16384 --classes 8142 \
    --impls eager triton --out "$OUT/bench_losses_16k.json"
step tests_kernels 150 python -m pytest -q -p no:cacheprovider tests/test_kernel_o2a.py tests/test_kernel_ce_bdc.py
step bench_o2a_131k 60 python benchmarks/bench_losses.py --quick --sizes 131072 --classes 8142 --dtypes bf16 \
    --losses o2a --impls triton --repeats 5 --out "$OUT/bench_o2a_131k.json"
train_digits() {  # the digits-lt runs side by side on the one GPU (each took ~1 minute alone on an H100)
    local run pids=() rc=0
    local runs=(default group)
    [ ${#ENGINE[@]} -eq 0 ] && runs+=(fp16)  # fp16 is DeepSpeed's: the local engine would run fp32
    for run in "${runs[@]}"; do
        case $run in
            default) extra=() ;;
            fp16) extra=(--set train.deepspeed_config=configs/ds_config_fp16.json) ;;
            group) extra=(--set model.norm=group) ;;
        esac
        timeout "$LIMIT" jrcl-fast train --config configs/digits_lt.yaml --set "train.output_dir=$OUT/digits_$run" \
            "${ENGINE[@]}" "${extra[@]}" >"$OUT/digits_$run.txt" 2>&1 &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
    return $rc
}
step train_digits 180 train_digits
step tests_gpu_rules 120 python -m pytest -q -p no:cacheprovider tests/test_gpu_rules.py tests/test_doctor.py
echo "total $(($(date +%s) - START))s of $BUDGET" | tee -a "$OUT/summary.txt"
