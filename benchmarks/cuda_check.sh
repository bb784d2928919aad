#!/usr/bin/env bash
# The CUDA rows of docs/results/overhead.md in one short run, for a machine with a GPU:
#
#   bash benchmarks/cuda_check.sh                  # 5 rounds (about 6-8 min on one H200-class GPU)
#   ROUNDS=3 bash benchmarks/cuda_check.sh         # shorter
#   RESULTS=/some/dir bash benchmarks/cuda_check.sh   # where the tables go (default: $OUT/cuda if
#                                                  # $OUT is set, else bench_out/cuda)
#
# 1. benchmarks/overhead_dispersion.py --device cuda --suite: ResNet-18 at batch 128 with GroupNorm
#    (target: dispersion every step <= 1.05x plain) and with train-mode BatchNorm, and the
#    AlexNet-style CNN at batch 128, GradientDispersion() every step vs plain, plus the default
#    suite of configs/digits_mlp.yaml on the CNN (vs plain with the same validation); time and
#    peak device memory as ratios to plain measured in the same run, rounds interleaved.
# 2. pytest -m cuda: the CUDA test markers.
# (0. benchmarks/op_counts.py --device cuda: the ATen ops and kernels of one measured step against
#    plain, to set beside the CPU's count of the same branches, `--paths cuda`.)
#
# Without CUDA (torch.cuda.is_available() is False) it prints "not measured" and exits 0.
# Exit status otherwise: 0 when both steps succeeded, 1 when either failed (a missed target is
# reported in the tables, not as a failure).
set -uo pipefail
cd "$(dirname "$0")/.."

if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "CUDA rows: not measured (torch.cuda.is_available() is False on $(hostname))."
    echo "pytest -m cuda: not run (no CUDA device)."
    exit 0
fi

ROUNDS=${ROUNDS:-5}
RESULTS=${RESULTS:-${OUT:+$OUT/cuda}}
RESULTS=${RESULTS:-bench_out/cuda}
mkdir -p "$RESULTS"
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(hostname); nproc: $(nproc); CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
    python -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name(0))'
    echo "uptime: $(uptime)"
} | tee "$RESULTS/machine.txt"

echo "== op_counts.py --device cuda (the kernels a measured step launches; the CPU's count of the GPU's branches: --paths cuda)"
timeout 120 python benchmarks/op_counts.py --device cuda --models mlp,cnn,resnet18-gn,transformer 2>&1 | tee "$RESULTS/op_counts_cuda.txt"

echo "== overhead_dispersion.py --device cuda --suite --suite-models cuda-cnn --rounds $ROUNDS"
timeout 540 python benchmarks/overhead_dispersion.py --device cuda --suite --suite-models cuda-cnn --rounds "$ROUNDS" \
    --out "$RESULTS/cuda_dispersion.md" --json "$RESULTS/cuda_dispersion.json"
bench=$?
[ $bench -eq 124 ] && echo "overhead_dispersion.py: stopped after 540 s (rerun with ROUNDS=3)"

echo "== pytest -m cuda"
timeout 240 python -m pytest -m cuda -q -p no:cacheprovider 2>&1 | tee "$RESULTS/pytest_cuda.txt"
tests=${PIPESTATUS[0]}

echo "uptime after: $(uptime)" | tee -a "$RESULTS/machine.txt"
echo "== summary: overhead_dispersion exit $bench, pytest -m cuda exit $tests; results in $RESULTS/"
[ $bench -eq 0 ] && [ $tests -eq 0 ]
