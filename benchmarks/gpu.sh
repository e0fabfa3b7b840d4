#!/usr/bin/env bash
# Every GPU test and the GPU benchmarks, in under 8 minutes on one GPU (each step has its own
# time limit; the sum is 7.5 minutes). Without CUDA it prints "no CUDA: skipped" and exits 0.
#
#   benchmarks/gpu.sh                 # from the repository root; PYTHON=... to pick the interpreter
#
# 1. the tests marked gpu: tests/sampler/test_gpu.py (sampling and losses on the device) and
#    tests/trainer/test_gpu_pipeline.py (the sharded worker on the GPU, pinned rows);
# 2. benchmarks.loss on cuda: ours vs TensorFlow's op (TF's row is CPU-only; skipped if TF is
#    not installed);
# 3. benchmarks.sharded on cuda: training examples/s in-process and with 2 shards, sync and
#    async, batch 512 and 4,096.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA: skipped"
    exit 0
fi
"$PY" -c "import torch; print('GPU:', torch.cuda.get_device_name(), 'torch', torch.__version__)"
TF=""
"$PY" -c "import tensorflow" 2>/dev/null || TF="--no-tf"

echo "== GPU tests"
timeout 180 "$PY" -m pytest -q -p no:cacheprovider -m gpu \
    tests/sampler/test_gpu.py tests/trainer/test_gpu_pipeline.py
echo "== loss: ours vs TensorFlow's op ${TF:+(TensorFlow not installed)}"
timeout 90 "$PY" -m benchmarks.loss --device cuda --steps 20 --full-steps 2 $TF
echo "== training: in-process and 2 shards"
timeout 180 "$PY" -m benchmarks.sharded --device cuda --shards 2 --modes sync async \
    --batch 512 4096 --steps 20 --warmup 3
