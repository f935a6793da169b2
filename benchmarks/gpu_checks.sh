#!/usr/bin/env bash
# One pass of every GPU check, for the lent H100 (or any CUDA machine) on a source checkout:
#   bash benchmarks/gpu_checks.sh [OUTDIR]
# Runs the gpu-marked tests, then the demo on CUDA; logs go to OUTDIR (default ./gpu-out).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-out}}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export MAMBA_RT_CACHE_DIR=${MAMBA_RT_CACHE_DIR:-/tmp/mamba-rt-cache}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
python3 -c "import torch, onnx, onnxruntime, transformers; print('torch', torch.__version__, 'onnx', onnx.__version__, 'ort', onnxruntime.__version__, 'transformers', transformers.__version__)" | tee -a "$out/device.txt"
python3 -m pytest -q -p no:cacheprovider -m gpu -rs ${GPU_TESTS:-tests} 2>&1 | tee "$out/gpu-tests.log"
rc=${PIPESTATUS[0]}
python3 -m mamba_rt.cli demo --device cuda --backend torch --max-new-tokens 64 --dir /tmp/mamba-rt-demo \
  > "$out/demo.txt" 2>&1; echo "demo exit $?" >> "$out/demo.txt"
tail -3 "$out/demo.txt"
exit $rc
