#!/usr/bin/env bash
# Installs what a ComfyUI checkout needs to run headless on a CPU-only test machine.
# Test-machine workaround only: real users install ComfyUI the usual way.
#   usage: PYTHON=/path/to/venv/bin/python .ci/comfyui_deps.sh /path/to/ComfyUI
# One ComfyUI per environment: versions pin different frontend and template packages (v0.3.64's server will not
# start with v0.33's templates package), so the oldest supported ComfyUI gets a virtual environment of its own.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="${PYTHON:-python3}"
[ "$#" -eq 1 ] || { echo "usage: $0 COMFYUI_PATH" >&2; exit 2; }
comfy="$1"
# ComfyUI's requirements, minus the torch family: the CPU wheel is pinned by constraints.txt, and the registry has
# only CUDA builds of torchvision/torchaudio (handled below).
grep -v -E '^(torch|torchaudio|torchvision)\s*$' "$comfy/requirements.txt" > /tmp/kiln-comfy-req.txt
"$py" -m pip install -q --disable-pip-version-check -c "$here/constraints.txt" -r /tmp/kiln-comfy-req.txt requests
site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# ComfyUI imports torchvision at start-up; the registry only has CUDA builds. 0.28.0 pins torch 2.13.0,
# which the CPU wheel satisfies; its pure-Python parts work once two fake-op registrations are guarded.
if ! "$py" -c 'import torchvision' >/dev/null 2>&1; then
  "$py" -m pip install -q --disable-pip-version-check --no-deps torchvision==0.28.0
  meta="$site/torchvision/_meta_registrations.py"
  sed -i -E 's/^@torch\.library\.register_fake\("torchvision::(nms|qnms)"\)/@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda f: f))/' "$meta"
  "$py" -c 'import torchvision' || { echo "torchvision still fails to import" >&2; exit 1; }
fi
# ComfyUI >= 0.3.7x imports torchaudio at start-up (comfy/sd.py -> the LTX audio VAE). The registry has only CUDA
# builds; their Python parts import on a CPU once the two CUDA-linked libraries are removed (torchaudio then reports
# its extension unavailable, which only ComfyUI's audio nodes notice).
if grep -q -E '^torchaudio' "$comfy/requirements.txt" && ! "$py" -c 'import torchaudio' >/dev/null 2>&1; then
  "$py" -m pip install -q --disable-pip-version-check --no-deps torchaudio==2.11.1
  rm -f "$site"/torchaudio/lib/_torchaudio*.so "$site"/torchaudio/lib/libtorchaudio*.so
  "$py" -c 'import torchaudio' || { echo "torchaudio still fails to import" >&2; exit 1; }
fi
