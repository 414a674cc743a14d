#!/usr/bin/env bash
# Ray for a GPU machine that has torch but no package index: the pinned Ray wheel and the
# dependencies such an image lacks (jsonschema's family), unpacked into one folder and packed
# as .gpu/ray-site.tar.xz (about 29 MB; the whole wheel is 79 MB). Left out: the Java jars and
# the libraries the project never imports (rllib, serve, llm, tune, train, the dashboard's web
# client). There:
#
#   mkdir -p /tmp/site && tar -C /tmp/site -xJf .gpu/ray-site.tar.xz
#   export PYTHONPATH=/tmp/site:$PWD
#   GPU_CHECK_SKIP_INSTALL=1 PYTHON=python3 bash bench/gpu_check.sh /tmp/gc
#
#   bash bench/ray_site.sh [PYTHON_VERSION]     # default 3.12, the target machine's python
set -euo pipefail
PYV=${1:-3.12}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RAY=$(grep -o '"ray\[default\]==[^"]*"' "$ROOT/pyproject.toml" | sed 's/.*==//; s/"//')
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYV" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$WORK/wheels" "ray==$RAY" jsonschema \
    jsonschema-specifications referencing rpds-py
mkdir "$WORK/site"
for wheel in "$WORK"/wheels/*.whl; do
    python3 -m zipfile -e "$wheel" "$WORK/site"
done
cd "$WORK/site"
rm -rf ray/jars ray/rllib ray/serve ray/llm ray/tune ray/train ray/dashboard/client/build
# zipfile drops the executable bits: the raylet, the GCS server and the other binaries need them.
find ray/core -type f -exec sh -c 'head -c4 "$1" | grep -q ELF && chmod 755 "$1"' _ {} \;
mkdir -p "$ROOT/.gpu"
tar -cJf "$ROOT/.gpu/ray-site.tar.xz" .
echo "wrote $ROOT/.gpu/ray-site.tar.xz ($(du -h "$ROOT/.gpu/ray-site.tar.xz" | cut -f1)); .gpu/ is for"
echo "the device's carry (git ignores it)"
