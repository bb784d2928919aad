#!/usr/bin/env bash
# The CUDA rows of docs/results/overhead.md and the CUDA tests in one short run, for a machine with a GPU:
#
#   bash benchmarks/cuda_check.sh                  # about 9 min at most (TOTAL=540 seconds)
#   TOTAL=300 ROUNDS=5 bash benchmarks/cuda_check.sh   # shorter: the benchmark gets what is left
#   RESULTS=/some/dir bash benchmarks/cuda_check.sh    # where the tables go (default: $OUT/cuda if
#                                                      # $OUT is set, else bench_out/cuda)
#
# 0. benchmarks/op_counts.py --device cuda: the ATen ops and kernels of one measured step against
#    plain (to set beside the CPU's count of the same branches, `--paths cuda`).
# 1. pytest -m cuda: the CUDA tests (ghost norms against the exact per-sample reference on the
#    device, no host sync in a measured step, the default suite bit-identical and finite on CUDA,
#    the CUDA dispersion equal to the CPU's).
# 2. benchmarks/cuda_step_profile.py: the GPU's kernel time against the wall time of a step, with
#    and without GradientDispersion (is the step bound by the host?), and the ops whose device time
#    grew most; benchmarks/suite_memory.py: the default suite's peak device memory by callback and hook.
# 3. benchmarks/overhead_dispersion.py --device cuda --suite: ResNet-18 at batch 128 with GroupNorm
#    (target: dispersion every step <= 1.05x plain) and with train-mode BatchNorm, and the
#    AlexNet-style CNN at batch 128, GradientDispersion() every step vs plain, then ResNet-18 with
#    GroupNorm measured every 4th step and at 224x224 (batch 32: a step the GPU rather than the host
#    bounds), plus the default suite of configs/digits_mlp.yaml on the CNN (vs plain with the same
#    validation); time and
#    peak device memory as ratios to plain measured in the same run, rounds interleaved.  It gets
#    the time left of TOTAL and writes its tables after every round, so a run stopped there keeps
#    the rounds it finished.
#
# Without CUDA (torch.cuda.is_available() is False) it prints "not measured" and exits 0.
# Exit status otherwise: 0 when every step succeeded, 1 when one failed (a missed target is
# reported in the tables, not as a failure).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
START=$SECONDS
TOTAL=${TOTAL:-540}

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "CUDA rows: not measured (torch.cuda.is_available() is False on $(hostname))."
    echo "pytest -m cuda: not run (no CUDA device)."
    exit 0
fi

ROUNDS=${ROUNDS:-7}
RESULTS=${RESULTS:-${OUT:+$OUT/cuda}}
RESULTS=${RESULTS:-bench_out/cuda}
mkdir -p "$RESULTS"
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(hostname); nproc: $(nproc); CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
    "$PY" -c 'import torch, lightning; print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name(0), "lightning", lightning.__version__)'
    echo "uptime: $(uptime)"
} | tee "$RESULTS/machine.txt"

echo "== op_counts.py --device cuda"
timeout 60 "$PY" benchmarks/op_counts.py --device cuda --models mlp,cnn,resnet18-gn,transformer 2>&1 \
    | tee "$RESULTS/op_counts_cuda.txt"
counts=${PIPESTATUS[0]}

echo "== pytest -m cuda ($((SECONDS - START)) s so far)"
timeout 150 "$PY" -m pytest -m cuda -q -p no:cacheprovider -rs 2>&1 | tee "$RESULTS/pytest_cuda.txt"
tests=${PIPESTATUS[0]}

echo "== cuda_step_profile.py ($((SECONDS - START)) s so far)"
timeout 120 "$PY" benchmarks/cuda_step_profile.py --models cuda-resnet18-gn,cuda-cnn --rounds 2 --warmup 10 \
    --steps 10 --ops 25 --out "$RESULTS/cuda_step_profile.md"
profile=$?

echo "== suite_memory.py ($((SECONDS - START)) s so far)"
timeout 60 "$PY" benchmarks/suite_memory.py --steps 60 --epoch-steps 30 --out "$RESULTS/suite_memory.md"
memory=$?

left=$((TOTAL - (SECONDS - START) - 5))
[ "$left" -lt 60 ] && left=60  # at least a round's worth (timeout 0 would mean no limit)
echo "== overhead_dispersion.py --device cuda --suite --suite-models cuda-cnn --rounds $ROUNDS (${left} s left)"
timeout "$left" "$PY" benchmarks/overhead_dispersion.py --device cuda --suite --suite-models cuda-cnn \
    --rounds "$ROUNDS" --out "$RESULTS/cuda_dispersion.md" --json "$RESULTS/cuda_dispersion.json"
bench=$?
if [ $bench -eq 124 ]; then
    echo "overhead_dispersion.py: stopped after ${left} s; $RESULTS/cuda_dispersion.md holds the rounds it finished:"
    cat "$RESULTS/cuda_dispersion.md" 2>/dev/null
fi

echo "uptime after: $(uptime)" | tee -a "$RESULTS/machine.txt"
echo "== summary ($((SECONDS - START)) s): op_counts exit $counts, pytest -m cuda exit $tests," \
     "cuda_step_profile exit $profile, suite_memory exit $memory, overhead_dispersion exit $bench;" \
     "results in $RESULTS/"
[ $counts -eq 0 ] && [ $tests -eq 0 ] && [ $profile -eq 0 ] && [ $memory -eq 0 ] && { [ $bench -eq 0 ] || [ $bench -eq 124 ]; }
