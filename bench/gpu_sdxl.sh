#!/usr/bin/env bash
# The SDXL GPU rows of BENCHMARKS.md, in one go (about 7 minutes on an H100/H200):
#
#     bash bench/gpu_sdxl.sh
#
# The full SDXL UNet layout (nodes/tiny_checkpoint.py "sdxl_full": 2.6 B parameters, random weights, detected by
# ComfyUI as SDXL), 1024 px (128x128 latents), bf16 autocast, rank 16, Kiln with attn+ff targets vs ComfyUI's
# TrainLoraNode (called in-process as the executor calls it; it always trains every weight), batch 1 and 4,
# gradient checkpointing off and on. bench_floor.py prints s/step, Kiln / TrainLoraNode, GFLOP/step and MFU (the
# FLOPs FlopCounterMode counts for one step of each trainer, over PEAK_TFLOPS: 989 = H100/H200 dense bf16) and
# each row's peak torch.cuda.max_memory_allocated. One log per configuration under $OUT (or bench/results).
#
# The checkpoint is built once (about a minute) at $KILN_SDXL_CKPT and reused by every configuration. Each
# configuration runs in its own process under RUN_TIMEOUT, all of them under BUDGET (560 s), in the order
# batch 1 off/on, batch 4 off/on: what the budget cannot fit is skipped and said so.
# ComfyUI: $COMFYUI_PATH, else a checkout copied into the repo's ignored .comfyui/ (carry it to the device
# machine); ComfyUI's requirements missing there travel as wheels in .whl/ (see BENCHMARKS.md section 5).
# Every setting can be overridden for a CPU smoke test, e.g.
#     SIZE=sdxl LATENT=8 BATCHES=1 STEPS="1 2" REPEATS=1 PEAK_TFLOPS=1 bash bench/gpu_sdxl.sh
set -uo pipefail
cd "$(dirname "$0")/.."

SIZE=${SIZE:-sdxl_full}
LATENT=${LATENT:-128}
BATCHES=${BATCHES:-"1 4"}
CKPT_MODES=${CKPT_MODES:-"off on"}
TARGETS=${TARGETS:-"attn+ff"}
DTYPE=${DTYPE:-bf16}
RANK=${RANK:-16}
STEPS=${STEPS:-"2 6"}           # short and long run: s/step = (t_long - t_short) / (long - short)
REPEATS=${REPEATS:-2}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
RUN_TIMEOUT=${RUN_TIMEOUT:-240}  # per configuration, so one slow case cannot eat the whole budget
BUDGET=${BUDGET:-560}            # all configurations together (seconds); a configuration gets what is left
KILN_SDXL_CKPT=${KILN_SDXL_CKPT:-/tmp/kiln-bench-${SIZE}.safetensors}
read -r SHORT LONG <<<"$STEPS"
# shellcheck source=bench/gpu_env.sh
source bench/gpu_env.sh
"$PY" - <<'EOF' || true
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "(CPU only: a smoke test, not the GPU rows)")
EOF

for batch in $BATCHES; do
    for ckpt in $CKPT_MODES; do
        flag=""; [ "$ckpt" = on ] && flag="--grad-ckpt"
        log="$LOGS/sdxl_${SIZE}_b${batch}_ckpt-${ckpt}.txt"
        # shellcheck disable=SC2086
        cmd=("$PY" bench/bench_floor.py --size "$SIZE" --latent "$LATENT" --batch "$batch" --rank "$RANK"
             --dtype "$DTYPE" --targets $TARGETS --no-peft --native --peak-tflops "$PEAK_TFLOPS"
             --short "$SHORT" --long "$LONG" --repeats "$REPEATS" --checkpoint "$KILN_SDXL_CKPT" $flag)
        run_row "$log" 30 "${cmd[@]}"
    done
done
echo "== done in $(( SECONDS - start )) s; logs in $LOGS"
exit $status
