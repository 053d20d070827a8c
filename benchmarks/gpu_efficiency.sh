#!/usr/bin/env bash
# The efficiency study (docs/results.md, "Where SMI is efficient") on one GPU, in one command,
# from the repository root; not yet run on a GPU:
#
#   bash benchmarks/gpu_efficiency.sh [OUT_DIR] [efficiency_study.py options]
#
# Runs `benchmarks/efficiency_study.py --preset gpu` (ResNet-18 at base width 16, 28 px,
# projector W-W-W, bf16; random init, then the width and batch tables: 22 cells) under a
# 580 s `timeout`. OUT_DIR (default $OUT, else runs/efficiency_gpu/) receives results.json,
# rewritten after every cell, and the log; the runs' folders go to a scratch directory. A call
# stopped by the limit leaves every finished cell: carry OUT_DIR/results.json back and run the
# same command again, it continues with the next cell. Data: as benchmarks/gpu_suite.sh.
set -uo pipefail
default_out=runs/efficiency_gpu
source "$(dirname "$0")/gpu_env.sh"
timeout -k 10 580 "$python" benchmarks/efficiency_study.py --preset gpu --out "$out_dir" \
  --runs-dir "$(mktemp -d)" "${args[@]}" 2>&1 | tee "$out_dir/efficiency.log"
