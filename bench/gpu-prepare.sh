#!/usr/bin/env bash
# Fills .gpu/ (ignored by git) with everything bench/gpu.sh needs on a GPU machine that has no
# network. Run it here, where pip reaches a package registry:
#
#   bench/gpu-prepare.sh [LLAMA_CPP_PYTHON_VERSION]
#
#   .gpu/llama_cpp_python-VERSION.tar.gz  the bindings' sdist (its vendored llama.cpp is what the
#                                         GPU machine builds), stripped of tests, models, docs and
#                                         unused backends: ~6 MB instead of 76
#   .gpu/wheels/*.whl                     haifctl's dependencies and the bindings', binary wheels
#                                         for CPython $GPU_PYTHON on x86-64 Linux (one version
#                                         of each; psycopg is left out: the run uses SQLite)
#   .gpu/python-version                   that Python version, which gpu.sh checks
#
# The version defaults to the llama-cpp-python installed in .venv (else 0.3.36); GPU_PYTHON
# (default 3.12, the GPU image's) names the Python the wheels are for; PYTHON runs pip here.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
GPU_PYTHON=${GPU_PYTHON:-3.12}
V=${1:-$("$PY" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))' \
    2>/dev/null || echo 0.3.36)}
tag=cp${GPU_PYTHON/./}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p .gpu
rm -rf .gpu/wheels .gpu/llama_cpp_python-*.tar.gz
mkdir -p .gpu/wheels

echo "== llama-cpp-python $V sdist"
timeout 600 "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$V" -d "$tmp"
tar xzf "$tmp/llama_cpp_python-$V.tar.gz" -C "$tmp"
src=$tmp/llama_cpp_python-$V
lcpp=$src/vendor/llama.cpp
rm -rf "${src:?}/.git" "${lcpp:?}/.git" \
    "${lcpp:?}"/{models,docs,media,tests,benches,build,tools/ui} "${lcpp:?}"/tools/mtmd/test-*.mp4
for backend in opencl vulkan sycl hexagon et cann openvino webgpu virtgpu; do
    rm -rf "$lcpp/ggml/src/ggml-$backend"
done
# what gpu.sh builds must still be there
for need in CMakeLists.txt tools/llama-bench tools/batched-bench tools/quantize ggml/src/ggml-cuda; do
    [ -e "$lcpp/$need" ] || { echo "error: the stripped sdist lacks vendor/llama.cpp/$need" >&2; exit 1; }
done
tar czf ".gpu/llama_cpp_python-$V.tar.gz" -C "$tmp" "llama_cpp_python-$V"

echo "== wheels for CPython $GPU_PYTHON (x86-64 Linux)"
# haifctl's dependencies from pyproject.toml, less the bindings (built there from the sdist) and
# psycopg (Postgres only), plus the bindings' own dependencies from their pyproject.toml
mapfile -t reqs < <("$PY" - "$src/pyproject.toml" <<'EOF'
import re, sys, tomllib
ours = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
theirs = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
name = lambda r: re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower()
seen = set()
for r in ours + theirs:
    if name(r) in ("llama-cpp-python", "psycopg") or name(r) in seen:
        continue
    seen.add(name(r))
    print(r)
EOF
)
platforms=()
for p in manylinux_2_{39,38,36,35,34,31,28,27,24,17,12,5}_x86_64 manylinux2014_x86_64 manylinux2010_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
timeout 900 "$PY" -m pip download -q --only-binary=:all: --python-version "$GPU_PYTHON" \
    --implementation cp --abi "$tag" --abi abi3 --abi none "${platforms[@]}" \
    -d .gpu/wheels "${reqs[@]}"
echo "$GPU_PYTHON" > .gpu/python-version

# two versions of one package would make the install there fail: say so now
dups=$(for f in .gpu/wheels/*.whl; do basename "$f" | cut -d- -f1 | tr 'A-Z-' 'a-z_'; done | sort | uniq -d)
[ -z "$dups" ] || { echo "error: several versions of: $dups" >&2; exit 1; }

wheels=(.gpu/wheels/*.whl)
size=$(du -sm .gpu --exclude=out | cut -f1)
echo "== .gpu: $size MiB (${#wheels[@]} wheels, llama-cpp-python $V)"
if [ "$size" -gt 56 ]; then
    echo "warning: over 56 MiB; a device call carries 64 MiB with the working tree" >&2
fi
