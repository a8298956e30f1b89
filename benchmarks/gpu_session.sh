#!/usr/bin/env bash
# One GPU session's checks, in the order that tells the most per minute, within a time
# budget (a lent GPU machine gives one command 10 minutes and a whole session 15):
#
#   bash benchmarks/gpu_session.sh [OUT_DIR] [BUDGET_S]      # defaults: $OUT or gpu_session, 480
#
# Steps: offline install (and, from $WHEELS if set, DeepSpeed and the loss peers of the
# [peers] extra where they are missing), `jrcl-fast doctor`, the loss benchmark at issue
# 11's rows (N = 16,384 and 131,072, C = 8,142), the GPU tests of the kernels and of the
# GPU rules, the cRT stage, digits-lt runs side by side, 30 epochs each: the default config (bf16
# through DeepSpeed, or fp32 on the local engine where DeepSpeed does not import), group
# norm, and, with DeepSpeed, fp16 at ZeRO stage 1; NCCL through the bounded multi-node
# start-up (tests_nccl_startup); then the peers (Inf-CL, Liger-Kernel,
# CCE) beside ours at the same rows, bf16 and fp32 (bench_losses.py --peers); last, the
# GPU decode rates (torchvision's decode_jpeg, then DALI's mixed decoder per format and
# size, benchmarks/bench_decode.py). A step starts only if its time limit fits in what
# is left of the budget; each writes OUT_DIR/NAME.txt (and its JSON), and
# OUT_DIR/summary.txt lists every step with its exit status and time.
# OUT_DIR/machine.txt names the card. STEPS="install peers_16k ..." runs only the steps
# named (e.g. the peers alone, in a call of their own).
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
    if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then
        return
    fi
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

missing() {  # missing MODULE...: true when one of them does not import
    local module
    for module; do python -c "import $module" 2>/dev/null || return 0; done
    return 1
}
install_offline() {  # install_offline NAME LIMIT_S PIP_ARGS...: a step installing from $WHEELS alone, no dependencies
    step "$1" "$2" pip install --no-index --find-links "$WHEELS" --no-build-isolation --no-deps "${@:3}"
}
step install 120 pip install --no-build-isolation --no-deps -e .
if [ -n "${WHEELS:-}" ]; then  # what is missing, offline: each package's dependencies are listed beside it
    # The wheels of DeepSpeed's pure-Python dependencies, and its sdist (built here).
    missing deepspeed && install_offline install_deepspeed 180 "$WHEELS"/*.whl "$WHEELS"/deepspeed-*.tar.gz
    # setup.py's [peers] pins (tests/test_peers.py keeps the two lists equal); their own
    # requirements (torch, triton, numpy) are ours.
    missing inf_cl liger_kernel cut_cross_entropy &&
        install_offline install_peers 60 inf-cl==1.2.1 liger-kernel==0.8.5 cut-cross-entropy==25.1.1
fi
ENGINE=()
missing deepspeed && ENGINE=(--set train.engine=local)

step doctor 90 jrcl-fast doctor --out "$OUT/doctor.json"
step bench_losses_16k 150 python benchmarks/bench_losses.py --quick --sizes 16384 --classes 8142 \
    --impls eager triton --out "$OUT/bench_losses_16k.json"
step tests_kernels 150 python -m pytest -q -p no:cacheprovider tests/test_kernel_o2a.py tests/test_kernel_ce_bdc.py \
    tests/test_speed_contracts.py
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
# NCCL through the bounded multi-node start-up (issue 20): device-bound init, first all-reduce.
step tests_nccl_startup 60 python -m pytest -q -p no:cacheprovider tests/test_multinode.py -k bounded_start_up
# cRT through DeepSpeed bf16 on the GPU: frozen parameters outside the optimizer, the
# backbone bit-identical after the classifier-only stage (issue 23; CPU-tested on the local engine)
step tests_crt 120 python -m pytest -q -p no:cacheprovider tests/test_init_from.py
# The peers beside ours, each on its closest problem, after their correctness checks
# (which run first and fail the step if a peer and ours disagree).
step peers_16k 150 python benchmarks/bench_losses.py --peers --sizes 16384 --classes 8142 --dtypes bf16 fp32 \
    --out "$OUT/peers_16k.json"
step peers_131k 240 python benchmarks/bench_losses.py --peers --sizes 131072 --classes 8142 --dtypes bf16 fp32 \
    --repeats 5 --out "$OUT/peers_131k.json"
# Decode on the GPU (issue 22): JPEG through torchvision (no DALI needed), then DALI's mixed
# decoder per format (PNG, JPEG, lossless JPEG 2000 at 1024/512/256 px) where DALI imports.
step bench_decode_torchvision 90 python benchmarks/bench_decode.py --gpu torchvision --images 64 --repeats 5 \
    --json "$OUT/bench_decode_torchvision.json"
step bench_decode_dali 150 python benchmarks/bench_decode.py --gpu dali --images 48 --repeats 5 \
    --json "$OUT/bench_decode_dali.json"
echo "total $(($(date +%s) - START))s of $BUDGET" | tee -a "$OUT/summary.txt"
