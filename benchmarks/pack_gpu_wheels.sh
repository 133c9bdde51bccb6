#!/usr/bin/env bash
# Packs what an offline GPU machine lacks for the training check into pieces small enough to copy:
# the cp312 wheels of DALI (nvidia-dali-cuda130 2.4.0, ~190 MiB), its few missing dependencies and PyAV,
# unpacked, stripped of other Pythons' binaries and of headers, tarred and xz-compressed (~166 MB), then
# split into .dpk1/ .dpk2/ .dpk3/ (55 MiB each, .git/info/exclude keeps them out of git).
# Then, back to back while the machine stays warm (30 s), three device runs:
#   1. carry [".dpk1"]: mkdir -p /tmp/pk && cp .dpk1/* /tmp/pk/   (and start the build in the background:
#      see docs/gpu.md, "The training check")
#   2. carry [".dpk2"]: cp .dpk2/* /tmp/pk/
#   3. carry [".dpk3"]: cp .dpk3/* /tmp/pk/ && cd /tmp/pk && cat part.* > site.tar.xz && sha256sum -c SHA256
#      && mkdir -p /tmp/site && xz -dc -T16 site.tar.xz | tar -x -C /tmp/site, then
#      PYTHONPATH=/tmp/site OUT=$OUT bash benchmarks/gpu_train_check.sh
# Usage (repository root, needs network to PyPI): bash benchmarks/pack_gpu_wheels.sh [WORK]
set -euo pipefail
WORK=${1:-/tmp/xdc-gpu-wheels}
mkdir -p "$WORK/whl" .git/info
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$WORK/whl" nvidia-dali-cuda130==2.4.0 optree nvtx makefun gast astunparse av
rm -rf "$WORK/site" && mkdir "$WORK/site"
for wheel in "$WORK"/whl/*.whl; do (cd "$WORK/site" && unzip -qo "$wheel"); done
find "$WORK/site" -name "*cpython-3*so" ! -name "*cpython-312*" -delete
rm -rf "$WORK/site/nvidia/dali/include"
tar -C "$WORK/site" -cf - . | xz -6 -T2 > "$WORK/site.tar.xz"
grep -qx "/.dpk\*/" .git/info/exclude 2>/dev/null || echo "/.dpk*/" >> .git/info/exclude
rm -rf .dpk1 .dpk2 .dpk3 && mkdir .dpk1 .dpk2 .dpk3
split -b 55m -d -a 1 "$WORK/site.tar.xz" "$WORK/part."
mv "$WORK/part.0" .dpk1/ && mv "$WORK/part.1" .dpk2/ && mv "$WORK/part.2" .dpk3/
(cd "$WORK" && sha256sum site.tar.xz) > .dpk3/SHA256
du -sh .dpk1 .dpk2 .dpk3
