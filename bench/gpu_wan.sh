#!/usr/bin/env bash
# The Wan GPU rows of BENCHMARKS.md (issue 23), in one go (under 10 minutes on an H100/H200; not yet run: no GPU was
# lent to the session that wrote it):
#
#     bash bench/gpu_wan.sh
#
# The Wan 2.1 T2V 1.3B layout with random weights, built in memory (nodes/tiny_checkpoint.py "wan21_1_3b_full": width
# 1536, 30 blocks, 1.4 B parameters), loaded as UNETLoader loads it; 480p-class clips of 33 frames (latents [16, 9, 80,
# 80]: 640 x 640 px, the pixel count of 832 x 480), the UMT5 context of 512 tokens, bf16 autocast, rank 16, attn+ff,
# batch 1, gradient checkpointing per Wan block. Rows: 1. bf16 weights; 2. fp8_e4m3fn weights capped at 24 GiB of
# VRAM (the consumer-card configuration); 3. bf16, 81 frames (latents [16, 21, 80, 80]).
# bench_floor.py prints s/step, GFLOP/step and MFU (PEAK_TFLOPS: 989 = H100/H200 dense bf16) and each row's peak
# torch.cuda.max_memory_allocated. One log per row under $OUT (or bench/results); each row in its own process under
# RUN_TIMEOUT, all under BUDGET. ComfyUI v0.33+: $COMFYUI_PATH, else .comfyui/ (carry it), wheels in .whl/.
# A CPU smoke test of the same script (the tests' tiny Wan 2.1):
#     ROWS="wan21:default:9" LATENT=8 DTYPE=fp32 STEPS="1 2" REPEATS=1 PEAK_TFLOPS=1 bash bench/gpu_wan.sh
set -uo pipefail
cd "$(dirname "$0")/.."

LATENT=${LATENT:-80}
TOKENS=${TOKENS:-512}
RANK=${RANK:-16}
DTYPE=${DTYPE:-bf16}
STEPS=${STEPS:-"2 4"}
REPEATS=${REPEATS:-1}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
# size:weight dtype:frames[@VRAM cap in GiB]
ROWS=${ROWS:-"wan21_1_3b_full:default:33 wan21_1_3b_full:fp8_e4m3fn:33@24 wan21_1_3b_full:default:81"}
RUN_TIMEOUT=${RUN_TIMEOUT:-180}
BUDGET=${BUDGET:-560}
read -r SHORT LONG <<<"$STEPS"
# shellcheck source=bench/gpu_env.sh
source bench/gpu_env.sh

for row in $ROWS; do
    size=${row%%:*}; rest=${row#*:}; dtype=${rest%%:*}; rest=${rest#*:}; frames=${rest%@*}; cap=0
    [ "$rest" != "$frames" ] && cap=${rest#*@}
    log="$LOGS/${size}_${dtype}_f${frames}_cap${cap}.txt"
    cmd=("$PY" bench/bench_floor.py --size "$size" --weight-dtype "$dtype" --vram-cap "$cap" --latent "$LATENT"
         --frames "$frames" --t5-tokens "$TOKENS" --batch 1 --rank "$RANK" --dtype "$DTYPE" --targets attn+ff
         --no-peft --grad-ckpt --peak-tflops "$PEAK_TFLOPS" --short "$SHORT" --long "$LONG" --repeats "$REPEATS")
    run_row "$log" 45 "${cmd[@]}"
done
echo "== done in $(( SECONDS - start )) s; logs in $LOGS"
exit $status
