# Sourced by the GPU row scripts (bench/gpu_sdxl.sh, bench/gpu_flux.sh) from the repository root: the Python to use
# ($PYTHON, else .venv/bin/python, else python3) as $PY, ComfyUI from .comfyui/ when $COMFYUI_PATH is unset (a
# checkout carried to the device machine), ComfyUI's missing requirements from wheels in .whl/, unbuffered output,
# and the log folder $LOGS ($OUT, else bench/results).
LOGS=${OUT:-bench/results}
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
if [ -z "${COMFYUI_PATH:-}" ] && [ -f .comfyui/main.py ]; then export COMFYUI_PATH=$PWD/.comfyui; fi
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
export PYTHONUNBUFFERED=1
mkdir -p "$LOGS"
