#!/usr/bin/env bash
# The Dynamic VRAM check of BENCHMARKS.md (README "ComfyUI versions"), on a GPU machine with ComfyUI >= 0.3.7x
# (about 3 minutes on an H100/H200):
#
#     bash bench/gpu_dynamic_vram.sh
#
# Two ComfyUI servers, one with Dynamic VRAM (ComfyUI's default on NVIDIA) and one with --disable-dynamic-vram, train the
# SD1.5 layout (random weights) one SGD step from the same seeded adapters: the gradients must agree within bf16
# rounding; s/step and peak VRAM (nvidia-smi) of each, and whether the dynamic server trained on a non-dynamic copy
# (Kiln's policy). ComfyUI, Python and wheels as for the other GPU scripts (bench/gpu_env.sh).
# CPU smoke test: SIZE=tiny RES=64 PRECISION=fp32 EXTRA=--cpu bash bench/gpu_dynamic_vram.sh
set -uo pipefail
cd "$(dirname "$0")/.."
SIZE=${SIZE:-sd15}
RES=${RES:-512}
PRECISION=${PRECISION:-bf16}
EXTRA=${EXTRA:-}
RUN_TIMEOUT=${RUN_TIMEOUT:-400}
BUDGET=${BUDGET:-420}
# shellcheck source=bench/gpu_env.sh
source bench/gpu_env.sh
# shellcheck disable=SC2086
run_row "$LOGS/dynamic_vram_${SIZE}_${RES}.txt" 60 "$PY" bench/bench_dynamic_vram.py --size "$SIZE" --res "$RES" \
    --precision "$PRECISION" --out "$LOGS/dynamic_vram.json" $EXTRA
echo "== done in $(( SECONDS - start )) s; logs in $LOGS"
exit $status
