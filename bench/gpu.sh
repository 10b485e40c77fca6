#!/usr/bin/env bash
# haifctl on an NVIDIA GPU, held against llama.cpp's own benchmarks of the same model.
#
#   bench/gpu-prepare.sh   first, on a machine with a package registry: fills .gpu/ (ignored)
#   bench/gpu.sh           then, on the GPU machine, from a copy of the repository with .gpu/
#
# Needs there, and nothing from a network: an NVIDIA driver, CUDA's nvcc, CMake (ninja when
# present), and the Python named in .gpu/python-version, with pip. Every step has a timeout.
#   1. install .gpu/wheels into $WORK/site and unpack the llama-cpp-python sdist
#   2. build its llama.cpp with CUDA for $CUDA_ARCH as shared libraries (about 5 minutes on 16
#      cores; kept in $WORK, so a second run skips it), and point the bindings at that build
#      (PYTHONPATH=the sdist, LLAMA_CPP_LIB_PATH=build/bin)
#   3. write a TinyLlama-1.1B-shaped random model (bench/make_random_llama.py), quantise to Q4_0
#   4. llama-bench tg$TG and llama-batched-bench (-npp $PP -ntg $TG -npl $LEVELS), full offload
#   5. a haifctl cluster (one worker, $SLOTS slots, every layer on the GPU) and
#      `haifctl bench --concurrency $LEVELS --json` against its HTTP bridge
#   6. the ratios (bench/gpu_report.py): one stream against llama-bench tg, N streams against
#      llama-batched-bench
# Results land in $OUT (default .gpu/out), seven files: gpu.log (everything printed),
# summary.txt and summary.json, haifctl-bench.json, llama-bench.json, batched-bench.jsonl,
# build.log, and cluster-logs.tar.gz.
#
# Environment: OUT; WORK (scratch, default /tmp/haif-gpu); JOBS (default: every core); CUDA_ARCH
# (90: Hopper); LEVELS (1,16,64); SLOTS (default: the largest level); MODEL_SHAPE ("22 2048 32 4
# 5632 32000", TinyLlama-1.1B: layers, embedding, heads, KV heads, FFN, vocabulary); PYTHON
# (python3); GPU_DRY_RUN=1 runs it all without CUDA on a tiny model with the current Python's own
# packages, to check the script on any machine.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
DRY=${GPU_DRY_RUN:-0}
OUT=${OUT:-$ROOT/.gpu/out}
WORK=${WORK:-/tmp/haif-gpu}
PY=${PYTHON:-python3}
if [ "$DRY" = 1 ] && [ -z "${PYTHON:-}" ] && [ -x "$ROOT/.venv/bin/python" ]; then
    PY=$ROOT/.venv/bin/python  # the dry run uses this checkout's packages: `make` made them
fi
JOBS=${JOBS:-$(nproc)}
CUDA_ARCH=${CUDA_ARCH:-90}
PP=128
TG=128
if [ "$DRY" = 1 ]; then
    LEVELS=${LEVELS:-1,2}
    SHAPE=${MODEL_SHAPE:-2 64 4 2 128 512}
    NGL=0
else
    LEVELS=${LEVELS:-1,16,64}
    SHAPE=${MODEL_SHAPE:-22 2048 32 4 5632 32000}
    NGL=99
fi
if ! [[ $LEVELS =~ ^[0-9]+(,[0-9]+)*$ ]]; then
    echo "error: LEVELS must be a comma-separated list of whole numbers, not '$LEVELS'" >&2
    exit 2
fi
MAX_LEVEL=$(tr ',' '\n' <<<"$LEVELS" | sort -n | tail -n 1)
SLOTS=${SLOTS:-$MAX_LEVEL}

mkdir -p "$OUT" "$WORK"
rm -f "$OUT"/{gpu.log,summary.txt,summary.json,haifctl-bench.json,llama-bench.json} \
    "$OUT"/{batched-bench.jsonl,build.log,cluster-logs.tar.gz}
exec > >(tee -a "$OUT/gpu.log") 2>&1
TEE_PID=$!

STARTED=$SECONDS
FAILED=()
CLUSTER=0
step() { printf '\n== %s  [%ds]\n' "$*" "$((SECONDS - STARTED))"; }
die() { echo "error: $*" >&2; exit 1; }
failed() { echo "FAILED: $*" >&2; FAILED+=("$1"); }
haif() {  # haifctl with a time limit: haif SECONDS ARGS...
    local limit=$1
    shift
    timeout --kill-after=15 "$limit" "$PY" -m haifctl "$@"
}

finish() {
    local rc=$?
    set +e
    if [ "$CLUSTER" = 1 ]; then
        step "stopping the cluster"
        haif 120 down
        tar czf "$OUT/cluster-logs.tar.gz" -C "$HAIF_HOME" logs 2>/dev/null
    fi
    if [ "$rc" = 0 ] && [ "${#FAILED[@]}" -gt 0 ]; then
        rc=1
    fi
    step "done: exit $rc${FAILED[*]:+ (failed: ${FAILED[*]})}; results in $OUT"
    exec >&- 2>&-
    wait "$TEE_PID" 2>/dev/null
    exit "$rc"
}
trap finish EXIT

# 1 -------------------------------------------------------------------------------------------
step "checks"
[ -d /usr/local/cuda/bin ] && PATH=$PATH:/usr/local/cuda/bin
command -v cmake >/dev/null || die "cmake is not installed"
command -v "$PY" >/dev/null || die "$PY is not installed (PYTHON names another)"
sdists=(.gpu/llama_cpp_python-*.tar.gz)
[ -f "${sdists[0]}" ] || die "no .gpu/llama_cpp_python-*.tar.gz: run bench/gpu-prepare.sh first, where pip works"
[ "${#sdists[@]}" = 1 ] || die "several sdists in .gpu/: ${sdists[*]}; keep one"
SDIST=${sdists[0]}
if [ "$DRY" != 1 ]; then
    command -v nvidia-smi >/dev/null || die "nvidia-smi is not there: no NVIDIA driver"
    command -v nvcc >/dev/null || die "nvcc is not on PATH (nor in /usr/local/cuda/bin)"
    timeout 60 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    nvcc --version | tail -n 2
    want=$(cat .gpu/python-version 2>/dev/null || echo "?")
    have=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    [ "$want" = "$have" ] || die ".gpu/wheels are for Python $want but $PY is $have: run GPU_PYTHON=$have bench/gpu-prepare.sh"
    compgen -G ".gpu/wheels/*.whl" >/dev/null || die "no .gpu/wheels: run bench/gpu-prepare.sh first"
fi
echo "levels $LEVELS, $SLOTS slots, model shape $SHAPE, $JOBS jobs, work in $WORK, results in $OUT"

SITE=""
if [ "$DRY" != 1 ]; then
    step "installing .gpu/wheels"
    SITE=$WORK/site
    rm -rf "$SITE"
    timeout 600 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --disable-pip-version-check --target "$SITE" .gpu/wheels/*.whl
fi

SRC=$WORK/src/$(basename "$SDIST" .tar.gz)
if [ ! -f "$SRC/.unpacked" ]; then
    rm -rf "$WORK/src"
    mkdir -p "$WORK/src"
    tar xzf "$SDIST" -C "$WORK/src"
    touch "$SRC/.unpacked"
fi
[ -d "$SRC/llama_cpp" ] || die "$SDIST holds no llama_cpp/ package"

# 2 -------------------------------------------------------------------------------------------
step "building llama.cpp ($([ "$DRY" = 1 ] && echo CPU || echo "CUDA sm_$CUDA_ARCH"))"
BUILD=$WORK/build-$([ "$DRY" = 1 ] && echo cpu || echo "cuda$CUDA_ARCH")
BIN=$BUILD/bin
args=(-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF)
if [ "$DRY" = 1 ]; then
    args+=(-DGGML_CUDA=OFF)
else
    args+=(-DGGML_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCH")
fi
command -v ninja >/dev/null && [ ! -f "$BUILD/CMakeCache.txt" ] && args+=(-G Ninja)
built() {
    timeout 300 cmake -S "$SRC/vendor/llama.cpp" -B "$BUILD" "${args[@]}" >>"$OUT/build.log" 2>&1 &&
        timeout 2400 cmake --build "$BUILD" -j "$JOBS" \
            --target llama llama-bench llama-batched-bench llama-quantize >>"$OUT/build.log" 2>&1
}
if ! built; then
    tail -n 40 "$OUT/build.log"
    die "the build failed; all of its output is in $OUT/build.log"
fi
for f in libllama.so llama-bench llama-batched-bench llama-quantize; do
    [ -e "$BIN/$f" ] || die "the build made no $BIN/$f"
done
echo "built in $BIN"

export PYTHONPATH=$ROOT:$SRC${SITE:+:$SITE}
export LLAMA_CPP_LIB_PATH=$BIN
backend=$(timeout 120 "$PY" -c '
import llama_cpp
from haifctl.runtime.llamacpp import gpu_backend
print(llama_cpp.__version__, llama_cpp.__file__, *gpu_backend())
')
echo "bindings: $backend"
if [ "$DRY" != 1 ] && [[ $backend != *" cuda True" ]]; then
    die "the bindings cannot offload to CUDA with this build"
fi

# 3 -------------------------------------------------------------------------------------------
step "model: random weights, shape $SHAPE, Q4_0"
mkdir -p "$WORK/model"
MODEL=$WORK/model/random-${SHAPE// /-}-q4_0.gguf
if [ ! -s "$MODEL" ]; then
    F16=$WORK/model/random-f16.gguf
    # shellcheck disable=SC2086  # SHAPE is six numbers, one word each
    timeout 900 "$PY" bench/make_random_llama.py "$F16" $SHAPE
    timeout 600 "$BIN/llama-quantize" "$F16" "$MODEL.part" q4_0 >>"$OUT/build.log" 2>&1 ||
        die "llama-quantize failed; see $OUT/build.log"
    mv "$MODEL.part" "$MODEL"
    rm -f "$F16"
fi
ls -l "$MODEL"

# 4 -------------------------------------------------------------------------------------------
step "llama-bench tg$TG (one sequence)"
timeout 600 "$BIN/llama-bench" -m "$MODEL" -ngl "$NGL" -p 0 -n "$TG" -r 5 -o json \
    >"$OUT/llama-bench.json" || failed llama-bench
grep -E '"(avg_ts|n_gen|flash_attn|gpu_info|backends)"' "$OUT/llama-bench.json" || true

step "llama-batched-bench (-npp $PP -ntg $TG -npl $LEVELS)"
CTX=$((MAX_LEVEL * (PP + TG) + 256))
timeout 900 "$BIN/llama-batched-bench" -m "$MODEL" -ngl "$NGL" -c "$CTX" -b 2048 -ub 512 \
    -npp "$PP" -ntg "$TG" -npl "$LEVELS" --output-format jsonl >"$OUT/batched-bench.jsonl" ||
    failed llama-batched-bench
grep '^{' "$OUT/batched-bench.jsonl" || true

# 5 -------------------------------------------------------------------------------------------
# A function, so that a failure here still leaves llama.cpp's figures and the report. (set -e
# does not apply inside a function called as a condition: every step says `|| return`.)
haifctl_bench() {
    step "haifctl cluster: one worker, $SLOTS slots, n_gpu_layers $HAIF_N_GPU_LAYERS"
    rm -rf "$HAIF_HOME"
    haif 300 models register "$MODEL" --name random-llama || return
    CLUSTER=1
    haif 900 up --workers 1 --model random-llama --bridge-bind 127.0.0.1:0 --restart never \
        --timeout 600 || return
    haif 60 status --json >"$WORK/status.json" || return
    local info url device
    info=$("$PY" - "$WORK/status.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
bridge = next(d["endpoint"] for d in s["daemons"] if d["name"] == "bridge")
w = s["workers"][0]
print(bridge, f"{w['device']}/{w.get('gpu_name') or '-'}/slots={w['slots']}")
EOF
    ) || return
    read -r url device <<<"$info"
    echo "bridge $url, worker $device"
    if [ "$DRY" != 1 ] && [[ $device == cpu/* ]]; then
        echo "the worker runs on the CPU: its llama.cpp cannot offload" >&2
        return 1
    fi
    step "haifctl bench $url --concurrency $LEVELS"
    haif 1500 bench "$url" --model random-llama --concurrency "$LEVELS" --prompt-tokens "$PP" \
        --max-tokens "$TG" --timeout 300 --json >"$OUT/haifctl-bench.json"
}
export HAIF_HOME=$WORK/home
export HAIF_MODEL=random-llama  # what the cluster serves and the bridge defaults to
export HAIF_SLOTS=$SLOTS
HAIF_N_GPU_LAYERS=$([ "$DRY" = 1 ] && echo 0 || echo -1)
export HAIF_N_GPU_LAYERS
# a load test is one client sending as fast as it can: lift the per-client rate limit and the
# queue bound, so that neither is what gets measured
export HAIF_RATE_LIMIT=1000000 HAIF_RATE_BURST=1000000 HAIF_QUEUE_SIZE=4096
haifctl_bench || failed haifctl

# 6 -------------------------------------------------------------------------------------------
step "haifctl against llama.cpp"
timeout 120 "$PY" bench/gpu_report.py --haifctl "$OUT/haifctl-bench.json" \
    --llama-bench "$OUT/llama-bench.json" --batched "$OUT/batched-bench.jsonl" \
    --json-out "$OUT/summary.json" | tee "$OUT/summary.txt"
