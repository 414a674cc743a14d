#!/usr/bin/env bash
# The GPU check: one script, run on a machine with a GPU, that leaves everything docs/gpu.md
# needs in OUTDIR. Also runs on a CPU machine, where it says what it skipped.
#
#   bash bench/gpu_check.sh OUTDIR
#
# Steps (each bounded; the whole run is meant to fit in ~8 minutes on one GPU):
#   1. a fresh venv with the project, its dev tools and the pinned torch from PyPI (the default
#      Linux x86_64 wheel there is the CUDA build); GPU_CHECK_SKIP_INSTALL=1 uses $PYTHON
#      instead (default .venv/bin/python), e.g. on a CPU machine, or on a GPU machine with no
#      package index and torch preinstalled, with Ray put on PYTHONPATH (docs/gpu.md says how);
#   2. the environment: nvidia-smi, torch/CUDA versions, what torch sees (env.txt, env.json);
#   3. pytest -m gpu -v (pytest.txt, junit.xml);
#   4. throughput on the GPU: backprop on one actor against dni/cdni with 2 stages sharing the
#      GPU, an 8x4096 FCN at batch 1024 (throughput.json, throughput.txt);
#   5. CUDA tensors between two processes on one GPU, 1-64 MB: the host path the stages use
#      today against a raw device-to-device copy (transport_cuda.json, transport_cuda.txt).
# Steps 4 and 5 are skipped without a CUDA device. status.txt has one line per step.
# GPU_CHECK_BUDGET_S (default 540) bounds the whole script: a step gets at most what is left, and
# is skipped, saying so, when under 20 s are. A venv left by an earlier run is reused (the
# install is then a quick check) unless GPU_CHECK_FRESH=1.
set -u -o pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
STATUS="$OUT/status.txt"
: >"$STATUS"
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-540}

note() { echo "[gpu_check $(($(date +%s) - START))s] $*" | tee -a "$STATUS"; }

# step NAME LIMIT_S CMD...: run CMD with a time limit, its output in OUT/NAME.txt, and record
# the outcome; a failed step does not stop the later ones.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - ($(date +%s) - START) - 5))
    if [ "$left" -lt 20 ]; then
        note "$name: SKIPPED (the ${BUDGET}s budget is spent)"
        return 125
    fi
    [ "$left" -lt "$limit" ] && limit=$left
    local began=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.txt" 2>&1
    local rc=$?
    local what="ok"
    [ $rc -eq 124 ] && what="TIMED OUT after ${limit}s"
    [ $rc -ne 0 ] && [ $rc -ne 124 ] && what="FAILED (exit $rc)"
    note "$name: $what in $(($(date +%s) - began))s (output: $name.txt)"
    tail -n 5 "$OUT/$name.txt" | sed 's/^/    /'
    return $rc
}

# --- 1. the environment ------------------------------------------------------------------------
if [ "${GPU_CHECK_SKIP_INSTALL:-0}" = "1" ]; then
    PY=${PYTHON:-$ROOT/.venv/bin/python}
    note "install: skipped (GPU_CHECK_SKIP_INSTALL=1); using $PY"
else
    VENV=${GPU_CHECK_VENV:-/tmp/decoupled-gpu-venv}
    BASE=${GPU_CHECK_PYTHON:-$(command -v python3.12 || command -v python3)}
    [ "${GPU_CHECK_FRESH:-0}" = "1" ] && rm -rf "$VENV"
    if [ -x "$VENV/bin/python" ]; then
        note "install: reusing $VENV"
    elif ! "$BASE" -m venv "$VENV" 2>"$OUT/venv.txt"; then
        # Debian's python without its venv package: virtualenv from PyPI instead.
        "$BASE" -m pip install --user --quiet virtualenv >>"$OUT/venv.txt" 2>&1 &&
            "$BASE" -m virtualenv "$VENV" >>"$OUT/venv.txt" 2>&1 ||
            { note "install: FAILED: no venv from $BASE (see venv.txt)"; exit 1; }
    fi
    PY=$VENV/bin/python
    # The pinned torch (pyproject.toml) comes from PyPI, where the Linux x86_64 wheel is CUDA's.
    step install 300 "$PY" -m pip install --progress-bar off -e ".[dev]" ||
        { note "install failed: nothing else can run"; exit 1; }
fi

"$PY" - >"$OUT/env.json" 2>"$OUT/env.err" <<'EOF'
import json, platform
import torch
info = {
    "python": platform.python_version(),
    "torch": torch.__version__,
    "cuda": torch.version.cuda,
    "cuda_available": torch.cuda.is_available(),
    "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None,
}
try:
    import pynvml
    pynvml.nvmlInit()
    info["driver"] = pynvml.nvmlSystemGetDriverVersion()
except Exception as error:
    info["driver"] = f"unknown ({error})"
print(json.dumps(info, indent=1))
EOF
{
    date -u +"%Y-%m-%d %H:%M:%S UTC"
    uname -a
    nproc
    free -g | head -2
    nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    cat "$OUT/env.json"
} >"$OUT/env.txt" 2>&1
HAS_CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
note "environment: $(tr -d '\n' <"$OUT/env.json" | tr -s ' ')"

# --- 2. the gpu-marked tests -------------------------------------------------------------------
# On a CPU machine they must all be skipped cleanly: the run shows that too.
# --continue-on-collection-errors: a machine without PyPI (wandb not installable there) cannot
# import the W&B test modules, which hold no gpu test; the gpu tests still run.
step pytest 300 "$PY" -m pytest -m gpu -v -p no:cacheprovider --junitxml="$OUT/junit.xml" -rs \
    --continue-on-collection-errors
[ "$GPUS" -lt 2 ] && note "pytest: NCCL tests need 2 (3 for the chain) GPUs; this machine has $GPUS"

# --- 3. throughput and 4. transport on the GPU ------------------------------------------------
if [ "$HAS_CUDA" = "1" ]; then
    # "dni K=2 torch" also matches cdni: backprop, dni and cdni take about 25 + 65 + 65 s.
    step throughput 240 "$PY" bench/throughput.py --gpus 1 --only "dni K=2 torch" \
        --layers 8 --hidden 4096 --batch 1024 --steps 600 --repeats 1 --quiet 1 \
        --json "$OUT/throughput.json"
    step transport_cuda 90 "$PY" bench/transport.py --modes cuda-host cuda-d2d \
        --sizes 1M 4M 16M 64M --rounds 1 --repeats 3 --quiet 1 --json "$OUT/transport_cuda.json"
else
    note "throughput: skipped (no CUDA device)"
    note "transport_cuda: skipped (no CUDA device)"
fi
note "done in $(($(date +%s) - START))s; results in $OUT"
