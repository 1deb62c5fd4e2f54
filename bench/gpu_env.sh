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

# run_row LOG MIN_SECONDS CMD...: one configuration in its own process, limited to RUN_TIMEOUT and to what is left of
# BUDGET since $start; skipped (and said so) when less than MIN_SECONDS is left. A failure sets status=1.
status=0
start=$SECONDS
run_row() {
    local log=$1 min=$2
    shift 2
    local left=$(( BUDGET - (SECONDS - start) ))
    local limit=$(( left < RUN_TIMEOUT ? left : RUN_TIMEOUT ))
    if [ "$limit" -lt "$min" ]; then echo "!! skipped (budget spent): $*" | tee "$log"; status=1; return 0; fi
    echo "== $(( SECONDS - start )) s, limit ${limit} s: $*" | tee "$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then echo "!! exit $rc (124: over its ${limit} s)" | tee -a "$log"; status=1; fi
    return 0
}
