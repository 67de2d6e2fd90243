#!/usr/bin/env bash
# The GPU check (issue 15): pre-training and fine-tuning steps on CUDA at the paper's sizes,
# bounded in time (about 4 minutes), then the data-parallel fine-tuning test on every GPU.
#   scripts/gpu_check.sh            # needs a CUDA build of torch (docs/scale.md)
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch')"
timeout 480 python benchmarks/bench_gpu.py --seconds 90
