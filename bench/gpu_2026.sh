#!/usr/bin/env bash
# The Z-Image and FLUX.2 Klein GPU rows of BENCHMARKS.md (issue 22), in one go (under 10 minutes on an H100/H200; not
# yet run: no GPU was lent to the session that wrote it):
#
#     bash bench/gpu_2026.sh
#
# Full-size layouts with random weights, built in memory (nodes/tiny_checkpoint.py "zimage_full": 6 B, 30 layers +
# 2 + 2 refiners at width 3840; "flux2_klein9b_full": 9 B, 8 + 24 blocks at width 4096), loaded as UNETLoader loads
# them, 1024 px (Z-Image: 128 x 128 latents, FLUX.2: 64 x 64 packed latents), a 77-token Qwen caption (FLUX.2 pads it to
# 512 itself), bf16 autocast, rank 16, attn+ff targets, batch 1, gradient checkpointing on. Rows, in this order:
#   1. Z-Image bf16 weights;  2. Z-Image fp8_e4m3fn weights;  3. Klein 9B bf16;  4. Klein 9B fp8 with the process
#   capped at 24 GiB of VRAM (the consumer-card configuration).
# bench_floor.py prints s/step, GFLOP/step and MFU (PEAK_TFLOPS: 989 = H100/H200 dense bf16) and each row's peak
# torch.cuda.max_memory_allocated. One log per row under $OUT (or bench/results); each row in its own process under
# RUN_TIMEOUT, all under BUDGET. ComfyUI v0.33+: $COMFYUI_PATH, else .comfyui/ (carry it), wheels in .whl/.
# A CPU smoke test of the same script (the tiny FLUX.2 only; Z-Image has no size below 6 B):
#     ROWS="flux2:default" LATENT=8 TOKENS=16 DTYPE=fp32 STEPS="1 2" REPEATS=1 PEAK_TFLOPS=1 bash bench/gpu_2026.sh
set -uo pipefail
cd "$(dirname "$0")/.."

LATENT=${LATENT:-}  # empty: 1024 px for each model
TOKENS=${TOKENS:-77}
RANK=${RANK:-16}
DTYPE=${DTYPE:-bf16}
STEPS=${STEPS:-"2 4"}
REPEATS=${REPEATS:-1}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
# size:weight dtype[@VRAM cap in GiB]
ROWS=${ROWS:-"zimage_full:default zimage_full:fp8_e4m3fn flux2_klein9b_full:default flux2_klein9b_full:fp8_e4m3fn@24"}
RUN_TIMEOUT=${RUN_TIMEOUT:-200}
BUDGET=${BUDGET:-560}
read -r SHORT LONG <<<"$STEPS"
# shellcheck source=bench/gpu_env.sh
source bench/gpu_env.sh

for row in $ROWS; do
    size=${row%%:*}; rest=${row#*:}; dtype=${rest%@*}; cap=0; [ "$rest" != "$dtype" ] && cap=${rest#*@}
    latent=$LATENT
    if [ -z "$latent" ]; then case $size in zimage*) latent=128 ;; *) latent=64 ;; esac; fi
    log="$LOGS/${size}_${dtype}_cap${cap}.txt"
    cmd=("$PY" bench/bench_floor.py --size "$size" --weight-dtype "$dtype" --vram-cap "$cap" --latent "$latent"
         --t5-tokens "$TOKENS" --batch 1 --rank "$RANK" --dtype "$DTYPE" --targets attn+ff --no-peft --grad-ckpt
         --peak-tflops "$PEAK_TFLOPS" --short "$SHORT" --long "$LONG" --repeats "$REPEATS")
    run_row "$log" 60 "${cmd[@]}"  # a row builds a 6-9 B model first: under a minute left is not enough
done
echo "== done in $(( SECONDS - start )) s; logs in $LOGS"
exit $status
