#!/usr/bin/env bash
# The one-command GPU validation run, for a machine with an NVIDIA GPU (no internet needed):
# build vdit for the local GPU, run the whole test suite including `-m cuda`, run compute-sanitizer
# memcheck over a small pass of every CUDA and Triton kernel, run the GPU benchmarks (including every
# dense-attention candidate against vdit.plan's choice), and write benchmarks/results/<gpu>.md,
# <gpu>-attention.md, gpu-static.md and gpu-check.log. Prints a summary table last.
#
#   bash benchmarks/gpu_check.sh          # from the repository root; ~10 minutes on an H100
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=benchmarks/results
mkdir -p "$OUT"
LOG=$OUT/gpu-check.log
: > "$LOG"
declare -A RESULT

step() {  # step NAME COMMAND...: run, log, remember pass/fail
    local name=$1; shift
    echo "=== $name: $*" | tee -a "$LOG"
    if "$@" >> "$LOG" 2>&1; then RESULT[$name]=pass; else RESULT[$name]="FAIL ($?)"; fi
    tail -n 5 "$LOG"
}

ARCH=$($PY -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')")
export TORCH_CUDA_ARCH_LIST=$ARCH VDIT_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
step build "$PY" setup.py -q build_ext --inplace
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
step tests "$PY" -m pytest -q tests -x --continue-on-collection-errors
step cuda-tests "$PY" -m pytest -q tests -m cuda
if command -v compute-sanitizer > /dev/null; then
    step memcheck compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" benchmarks/gpu_smoke.py
else
    step memcheck "$PY" benchmarks/gpu_smoke.py  # no sanitizer on PATH: correctness pass only
    RESULT[memcheck]="${RESULT[memcheck]} (compute-sanitizer not found)"
fi
step benchmarks "$PY" -m vdit.bench.report --out "$OUT"
step attention-candidates "$PY" benchmarks/gpu_attention.py --out "$OUT"  # prints whether plan() chose the fastest
step gpu-static "$PY" -m vdit.kernels.triton.static_check --out "$OUT"

echo
echo "| step | result |"
echo "|---|---|"
for name in build tests cuda-tests memcheck benchmarks attention-candidates gpu-static; do
    echo "| $name | ${RESULT[$name]:-not run} |"
done
echo "log: $LOG"
