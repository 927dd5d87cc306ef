#!/usr/bin/env bash
# One prepared run on a lent GPU machine (CUDA, torch from the machine's image): the test suite
# on that torch/Python, then the GPU benchmarks. Each step has its own time limit so one slow step
# cannot eat the others; every log lands in $OUT (or ./gpu-out when $OUT is unset).
# Wheels for packages the image lacks (dask, zarr, monai, ...) are read from .whl/ when present.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
step() {  # step NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; local rc=$?
  echo "   rc=$rc in $((SECONDS - t0))s"; tail -n 40 "$OUT/$name.log"
}
python3 -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name())"
python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())" || true
# two parts, each under the device's 10-minute limit per command: `gpu_session.sh 1`, then `2`
part=${1:-all}
if [[ $part == 1 || $part == all ]]; then
  step pytest 200 python3 -m pytest -q -n 14 -p no:cacheprovider -m "not faults" --timeout 180
  # this machine's onnxruntime has no CUDA provider: its 16-core CPU, quiet, for the ORT ratios
  step onnx_overhead_cpu 100 python3 bench/onnx_overhead.py --device cpu
  step dense_cuda 80 python3 bench/dense_throughput.py --device cuda --size 2048 --row-seconds 2 --sliding-repeats 3
  step dense_monai_cuda 60 python3 bench/dense_monai.py --device cuda
fi
if [[ $part == 2 || $part == all ]]; then
  # converted / original on CUDA, TF32 on and off side by side (each row's two settings share
  # one conversion); ORT's CUDA provider when this onnxruntime has one (else a one-line skip)
  step overhead_realistic_cuda 120 python3 bench/converted_overhead.py --device cuda --tf32 both --realistic
  step overhead_zoo_cuda 120 python3 bench/converted_overhead.py --device cuda --tf32 both --quick
  step onnx_overhead_cuda 120 python3 bench/onnx_overhead.py --device cuda --tf32 both --quick
fi
