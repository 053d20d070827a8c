#!/usr/bin/env bash
# The GPU suite in one command (docs/benchmarks.md, "GPU"), from the repository root:
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR] [gpu_suite.py options, e.g. --steps loss_cost]
#
# Runs from the checkout with PYTHONPATH=. and no install (the GPU machine has torch,
# torchvision, safetensors, huggingface_hub, PyYAML and tqdm but no network). OUT_DIR defaults
# to $OUT, else runs/gpu_suite/ (ignored); it receives results.json (rewritten after every
# measurement), suite.log and the exported model folder: at most 7 files. Fashion-MNIST is from
# $SMI_FASHION_MNIST_DIR, else data/fashion-mnist/ (an ignored folder that travels with the
# checkout: `make gpu-data` fills it), else Debian's /usr/share/datasets/fashion-mnist/.
# The step budgets sum to 515 s; `timeout` stops everything at 590 s whatever happens
# (SMI_GPU_SUITE_TIMEOUT=SECONDS changes that, e.g. for the CPU dry run of the tests).
set -uo pipefail
command="bash benchmarks/gpu_suite.sh $*"
default_out=runs/gpu_suite
source "$(dirname "$0")/gpu_env.sh"
export SMI_GPU_SUITE_COMMAND="$command"
timeout -k 10 "${SMI_GPU_SUITE_TIMEOUT:-590}" "$python" benchmarks/gpu_suite.py --out "$out_dir/results.json" \
  --artifacts "$out_dir" "${args[@]}" 2>&1 | tee "$out_dir/suite.log"
