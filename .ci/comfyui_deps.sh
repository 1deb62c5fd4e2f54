#!/usr/bin/env bash
# Installs what a ComfyUI checkout needs to run headless on a CPU-only test machine.
# Test-machine workaround only: real users install ComfyUI the usual way.
#   usage: .ci/comfyui_deps.sh /path/to/ComfyUI
set -euo pipefail
comfy="$1"
here="$(cd "$(dirname "$0")" && pwd)"
py="${PYTHON:-python3}"
# ComfyUI's requirements, minus the torch family (the CPU wheel is pinned by constraints.txt;
# torchaudio has no build matching torch 2.13 and only ComfyUI's audio nodes need it).
grep -v -E '^(torch|torchaudio|torchvision)\s*$' "$comfy/requirements.txt" > /tmp/kiln-comfy-req.txt
"$py" -m pip install -q -c "$here/constraints.txt" -r /tmp/kiln-comfy-req.txt requests
# ComfyUI imports torchvision at start-up; the registry only has CUDA builds. 0.28.0 pins torch 2.13.0,
# which the CPU wheel satisfies; its pure-Python parts work once two fake-op registrations are guarded.
if ! "$py" -c 'import torchvision' >/dev/null 2>&1; then
  "$py" -m pip install -q --no-deps torchvision==0.28.0
  meta="$("$py" -c 'import importlib.util,os;print(os.path.join(os.path.dirname(importlib.util.find_spec("torchvision").origin),"_meta_registrations.py"))')"
  sed -i -E 's/^@torch\.library\.register_fake\("torchvision::(nms|qnms)"\)/@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda f: f))/' "$meta"
  "$py" -c 'import torchvision' || { echo "torchvision still fails to import" >&2; exit 1; }
fi
