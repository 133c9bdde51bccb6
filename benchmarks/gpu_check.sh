#!/usr/bin/env bash
# The one script for a GPU machine. First what needs no build (PYTHONPATH=.): the tensor-core pass of the
# certified assignment against the same-run GEMM ceilings (benchmarks/tensor_core_assign.py: Triton and
# PyTorch only, one JSON line per row, 1M before 10M, a deadline). Then build there, run the CUDA tests
# (the Triton kernel and the certified epilogue on the GPU included) under timeouts, memcheck a small
# case, measure the card's ceilings, time the streamed assignment of a round
# (benchmarks/gpu_stream_assign.py), then the k-means benchmarks. Results go under $OUT (8 files at most
# come back). Usage (from the repository root): OUT=/tmp/gpu bash benchmarks/gpu_check.sh [SIZES...]
set -uo pipefail
OUT=${OUT:-$PWD/gpu-results}
mkdir -p "$OUT"
export MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
SIZES=("$@")
[ ${#SIZES[@]} -gt 0 ] || SIZES=(1000000x128x1024 1000000x256x256 1000000x256x1024 1000000x512x1024 1000000x256x8192 10000000x256x1024)
step() { echo "=== $* ($(date +%T))"; }

step machine
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; nvcc --version | tail -2; } \
  2>&1 | tee "$OUT/machine.txt"

step tensor-cores  # the Triton pass of the certified assignment against the same-run ceilings; no build
PYTHONPATH=$PWD timeout 330 python3 benchmarks/tensor_core_assign.py --json "$OUT/tensor_cores.json" \
  --deadline-s 270 2>&1 | tail -40

step build
if ! python3 -m pip install --no-deps --no-build-isolation -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; exit 1
fi
python3 -c "import xdc_fast.ops as o; print('extension', o.HAS_EXTENSION, 'cuda kernels', o.HAS_CUDA_KERNELS)" | tee -a "$OUT/machine.txt"

step tests
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_triton_assign.py tests/test_certified_epilogue.py \
  tests/test_ops.py tests/test_cluster.py 2>&1 | tee "$OUT/tests.log" | tail -25

step memcheck
timeout 180 compute-sanitizer --tool memcheck --error-exitcode 3 python3 benchmarks/sanitize_case.py > "$OUT/memcheck.log" 2>&1
echo "memcheck exit status $?" | tee -a "$OUT/memcheck.log"
grep -E "ERROR SUMMARY|sanitize case done" "$OUT/memcheck.log"

step ceilings
python3 benchmarks/gpu_ceilings.py --json "$OUT/ceilings.json" 2>&1 | tee -a "$OUT/machine.txt"

step stream-assign  # a round's streamed assignment: 20M x 256 float16 rows resident, k = 1024 and 8192
# Its JSON lines join machine.txt: $OUT already holds the 8 files that come back.
timeout 300 python3 benchmarks/gpu_stream_assign.py --json /dev/null --deadline-s 240 2>&1 | tee -a "$OUT/machine.txt"

step bench
python3 benchmarks/kmeans_sweep.py --device cuda --repeats 3 --sizes "${SIZES[@]}" --out "$OUT/kmeans_gpu.md" 2>&1 | tail -60
step done
