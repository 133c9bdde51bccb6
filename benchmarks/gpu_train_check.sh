#!/usr/bin/env bash
# The training check for a GPU machine: build there, run the CUDA tests of the loaders,
# DALI and the engine, `bench train` (FLOPs, MFU against the same-run bf16 GEMM, both loaders), and smoke
# runs of pretrain (alone and under torchrun, NCCL), finetune and extract on CUDA, on synthetic H.264 data
# made there. Every step runs under `timeout`; its exit code and seconds go to $OUT/summary.md, its output
# to $OUT/steps.log (the machine sends back 8 files at most).
# Usage (from the repository root): OUT=/tmp/gpu bash benchmarks/gpu_train_check.sh
# Where PyAV and DALI are not installed and the GPU machine has no network: bring their cp312 wheels (av, nvidia-dali-cuda130
# and what DALI needs, `pip download` on a machine with network) in a folder and set WHEELS=that/folder, or
# unpack them beforehand into a folder on PYTHONPATH; whatever does not import is skipped, said so. BUILT=1 skips the
# build when an earlier call already built the package in the background (it saves a minute of the lease).
set -uo pipefail
OUT=${OUT:-$PWD/gpu-results}
WHEELS=${WHEELS:-wheels}
WORK=${WORK:-/tmp/xdc-train-check}
mkdir -p "$OUT" "$WORK"
export MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
SUMMARY="$OUT/summary.md"
LOG="$OUT/steps.log"
: > "$LOG"
printf '# GPU training check (%s)\n\n| step | exit | seconds |\n|---|---:|---:|\n' "$(date -u +%FT%TZ)" > "$SUMMARY"

# step NAME SECONDS COMMAND...: run COMMAND under timeout, output to steps.log, a row in summary.md.
step() {
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T))" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  echo "| $name | $rc$([ "$rc" = 124 ] && echo ' (timed out)') | $((SECONDS - t0)) |" >> "$SUMMARY"
  echo "    exit $rc in $((SECONDS - t0)) s" | tee -a "$LOG"
  return $rc
}
skip() { echo "| $1 | skipped: $2 | – |" >> "$SUMMARY"; echo "=== $1 skipped: $2" | tee -a "$LOG"; }

echo "=== machine" | tee -a "$LOG"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo "NVDEC (libnvcuvid): $(ldconfig -p | grep -c nvcuvid) libraries"; } 2>&1 | tee "$OUT/machine.txt" >> "$LOG"

if [ "${BUILT:-0}" = 1 ]; then
  step build-check 60 python3 -c "import xdc_fast.ops as o; assert o.HAS_CUDA_KERNELS, 'no CUDA kernels'" || exit 1
else
  step build 300 python3 -m pip install --no-deps --no-build-isolation -e . || { tail -40 "$LOG"; exit 1; }
fi
if [ -d "$WHEELS" ]; then
  step wheels 180 python3 -m pip install --no-index --find-links "$WHEELS" av nvidia-dali-cuda130
fi
HAVE_AV=0; python3 -c "import av" >> "$LOG" 2>&1 && HAVE_AV=1
HAVE_DALI=0; python3 -c "import nvidia.dali" >> "$LOG" 2>&1 && HAVE_DALI=1
HAVE_NVDEC=0; ldconfig -p | grep -q nvcuvid && HAVE_NVDEC=1
printf '\nPyAV: %s. DALI: %s. NVDEC library: %s.\n\n' \
  "$([ $HAVE_AV = 1 ] && echo yes || echo 'no: no synthetic data, so no smoke runs and no loader-fed bench rows')" \
  "$([ $HAVE_DALI = 1 ] && echo yes || echo 'no: the DALI tests skip and bench train has no dali row')" \
  "$([ $HAVE_NVDEC = 1 ] && echo yes || echo 'no: DALI cannot decode on this GPU')" | tee -a "$SUMMARY" >> "$LOG"
echo "| step | exit | seconds |" >> "$SUMMARY"; echo "|---|---:|---:|" >> "$SUMMARY"

step cuda-tests 150 python3 -m pytest -q -p no:cacheprovider -m cuda -rs \
  tests/test_loaders.py tests/data/test_dali_backend.py tests/test_engine.py

LOADERS=()
[ $HAVE_AV = 1 ] && LOADERS+=(--loader pyav)
[ $HAVE_DALI = 1 ] && [ $HAVE_AV = 1 ] && [ $HAVE_NVDEC = 1 ] && LOADERS+=(--loader dali)
step bench-train 150 xdc-fast bench train --device cuda --arch r2plus1d_18 --arch tiny --batch-size 32 \
  --steps 10 --workers 16 --no-round "${LOADERS[@]}" --json "$OUT/train.json"
# R(2+1)D-18 fed from clip shards as well as from files, DALI with one pipeline and with one per NVDEC
# engine (7 on an H100/H200): the share of the compute-only clips/s the loaders reach.
if [ $HAVE_DALI = 1 ] && [ $HAVE_AV = 1 ] && [ $HAVE_NVDEC = 1 ]; then
  step bench-train-shards 240 xdc-fast bench train --device cuda --arch r2plus1d_18 --batch-size 32 --steps 10 \
    --workers 16 --no-round --loader pyav --loader dali --shards --dali-pipelines 1 --dali-pipelines auto \
    --json "$OUT/train_shards.json"
else
  skip bench-train-shards "needs PyAV, DALI and NVDEC"
fi

if [ $HAVE_AV = 0 ]; then
  for s in data pretrain pretrain-torchrun finetune extract; do skip "$s" "PyAV is not installed"; done
else
  step data 60 python3 -c "
from xdc_fast.data.synthetic import SyntheticSpec, make_synthetic_dataset
from xdc_fast.data.prepare import prepare
make_synthetic_dataset('$WORK/media', SyntheticSpec(classes=4, videos_per_class=8, seconds=4.0, width=160, height=128))
prepare('$WORK/media', '$WORK/ds', workers=8, progress=False)"
  SMOKE=(--data "$WORK/ds" --config paper --device cuda --epochs 2 --clusters 8 --batch-size 8)
  step pretrain 120 xdc-fast pretrain "${SMOKE[@]}" --out "$WORK/run"
  step pretrain-torchrun 120 torchrun --nproc_per_node 1 -m xdc_fast.cli pretrain "${SMOKE[@]}" --out "$WORK/run-ddp"
  step finetune 60 xdc-fast finetune --data "$WORK/ds" --out "$WORK/ft" --checkpoint "$WORK/run/checkpoints/last.pt" \
    --device cuda --epochs 1 --batch-size 8
  step extract 45 xdc-fast extract --data "$WORK/ds" --out "$WORK/features.npz" \
    --checkpoint "$WORK/run/checkpoints/last.pt" --device cuda --batch-size 8
fi
# Where a step's GPU time goes (MFU is short of the 35% aimed at).
step train-profile 90 python3 benchmarks/train_profile.py --json "$OUT/train_profile.json"
# Last, as it may run long (torch.compile): which form of the step is fastest.
step train-variants 120 python3 benchmarks/train_variants.py --json "$OUT/train_variants.json"
echo "=== done ($(date +%T))" | tee -a "$LOG"
cat "$SUMMARY"
