#!/usr/bin/env bash
# The FLUX.1 GPU rows of BENCHMARKS.md (issue 13), in one go (under 10 minutes on an H100/H200; not yet run: no GPU
# was lent to the session that wrote it):
#
#     bash bench/gpu_flux.sh
#
# The full FLUX.1-dev layout (nodes/tiny_checkpoint.py "flux_full": 19 + 38 blocks, 12 B parameters, random weights,
# built in memory: no 24 GB file), loaded as UNETLoader loads it, 1024 px (128x128 latents), 256 T5 tokens, bf16
# autocast, rank 16, attn+ff targets, batch 1, gradient checkpointing on. Rows, in this order:
#   1. bf16 weights (24 GB);  2. fp8_e4m3fn weights (12 GB, cast per layer);  3. fp8 weights with the process capped at
#   24 GiB of VRAM (torch's per-process fraction): the consumer-card configuration.
# bench_floor.py prints s/step, GFLOP/step and MFU (FlopCounterMode's count for one step over PEAK_TFLOPS: 989 =
# H100/H200 dense bf16) and each row's peak torch.cuda.max_memory_allocated. One log per row under $OUT (or
# bench/results). Each row runs in its own process under RUN_TIMEOUT, all under BUDGET; what does not fit is skipped
# and said so. ComfyUI: $COMFYUI_PATH, else .comfyui/ (carry it), wheels in .whl/ as for gpu_sdxl.sh.
# A CPU smoke test of the same script:
#     SIZE=flux LATENT=8 T5=32 DTYPE=fp32 STEPS="1 2" REPEATS=1 PEAK_TFLOPS=1 ROWS="default fp8_e4m3fn" \
#         bash bench/gpu_flux.sh
set -uo pipefail
cd "$(dirname "$0")/.."

SIZE=${SIZE:-flux_full}
LATENT=${LATENT:-128}
T5=${T5:-256}
RANK=${RANK:-16}
DTYPE=${DTYPE:-bf16}
STEPS=${STEPS:-"2 4"}
REPEATS=${REPEATS:-1}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
ROWS=${ROWS:-"default fp8_e4m3fn fp8_e4m3fn@24"}  # weight dtype[@VRAM cap in GiB]
RUN_TIMEOUT=${RUN_TIMEOUT:-200}
BUDGET=${BUDGET:-560}
read -r SHORT LONG <<<"$STEPS"
# shellcheck source=bench/gpu_env.sh
source bench/gpu_env.sh

for row in $ROWS; do
    dtype=${row%@*}; cap=0; [ "$row" != "$dtype" ] && cap=${row#*@}
    log="$LOGS/flux_${SIZE}_${dtype}_cap${cap}.txt"
    cmd=("$PY" bench/bench_floor.py --size "$SIZE" --weight-dtype "$dtype" --vram-cap "$cap" --latent "$LATENT"
         --t5-tokens "$T5" --batch 1 --rank "$RANK" --dtype "$DTYPE" --targets attn+ff --no-peft --grad-ckpt
         --peak-tflops "$PEAK_TFLOPS" --short "$SHORT" --long "$LONG" --repeats "$REPEATS")
    run_row "$log" 60 "${cmd[@]}"  # a row builds the 12 B model first: under a minute left is not enough
done
echo "== done in $(( SECONDS - start )) s; logs in $LOGS"
exit $status
