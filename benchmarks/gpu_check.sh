#!/usr/bin/env bash
# The one-command GPU validation run, for a machine with an NVIDIA GPU (no internet needed):
# build vdit for the local GPU; check every dense-attention kernel's output, lse and causal alignment against
# the reference (kernels that disagree go into a quarantine file that the later steps' dispatch honours); the
# block-sparse smoke test (fwd + bwd, fp16 / bf16, every installed kernel); the whole test suite including
# `-m cuda`; compute-sanitizer memcheck over a small pass of every CUDA and Triton kernel and over the sparse
# smoke test; the GPU benchmarks (every dense-attention candidate against vdit.plan's choice, block-sparse
# timings beside the cost model's). Writes benchmarks/results/<gpu>.md, <gpu>-attention.md, <gpu>-sparse.md,
# <gpu>-dense-lse.md, <gpu>-quarantine.json, gpu-static.md and gpu-check.log. Prints a summary table last.
#
#   bash benchmarks/gpu_check.sh                      # from the repository root; ~15 minutes on an H100
#   bash benchmarks/gpu_check.sh build sparse-smoke   # only the named steps (names: the summary table's)
#   VDIT_RESULTS=/tmp/r bash benchmarks/gpu_check.sh  # results elsewhere than benchmarks/results
#   bash benchmarks/gpu_check.sh dense-lse sparse-smoke sparse-memcheck sparse-timing
#                                     # the attention checks alone (~5 minutes; Triton and the external
#                                     # kernels need no build step)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${VDIT_RESULTS:-benchmarks/results}
mkdir -p "$OUT"
LOG=$OUT/gpu-check.log
: > "$LOG"
declare -A RESULT
STEPS=(build dense-lse sparse-smoke tests cuda-tests memcheck sparse-memcheck benchmarks attention-candidates
       sparse-timing gpu-static)
ONLY=" $* "
for name in "$@"; do
    [[ " ${STEPS[*]} " == *" $name "* ]] || { echo "gpu_check.sh: no step '$name' (steps: ${STEPS[*]})" >&2; exit 2; }
done

selected() {  # selected NAME: no steps named on the command line, or NAME among them
    [[ "$ONLY" == "  " || "$ONLY" == *" $1 "* ]]
}

step() {  # step NAME COMMAND...: run, log, remember pass/fail (only selected steps)
    local name=$1; shift
    selected "$name" || return 0
    echo "=== $name: $*" | tee -a "$LOG"
    if "$@" >> "$LOG" 2>&1; then RESULT[$name]=pass; else RESULT[$name]="FAIL ($?)"; fi
    tail -n 5 "$LOG"
}

memcheck() {  # memcheck NAME SCRIPT ARGS...: under compute-sanitizer, or a correctness pass without it
    local name=$1; shift
    selected "$name" || return 0
    if command -v compute-sanitizer > /dev/null; then
        # No caching allocator: an access past a tensor's end lands outside any allocation, where memcheck sees it.
        step "$name" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
            "$PY" "$@"
    else
        echo "compute-sanitizer not found: $name runs $* without it (correctness only)" | tee -a "$LOG"
        step "$name" "$PY" "$@"
        RESULT[$name]="${RESULT[$name]} (compute-sanitizer not found)"
    fi
}

ARCH=$($PY -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')")
export TORCH_CUDA_ARCH_LIST=$ARCH VDIT_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
step build "$PY" setup.py -q build_ext --inplace
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
GPU=$("$PY" -c "import torch; from vdit.bench.gpu_timing import slug; print(slug(torch.cuda.get_device_name()))")
step dense-lse "$PY" benchmarks/gpu_dense_lse_check.py --out "$OUT" --quarantine "$OUT/$GPU-quarantine.json"
export VDIT_KERNEL_QUARANTINE=$OUT/$GPU-quarantine.json  # from here on, dispatch skips the kernels it lists
step sparse-smoke "$PY" benchmarks/gpu_sparse_check.py smoke
step tests "$PY" -m pytest -q tests -x --continue-on-collection-errors
step cuda-tests "$PY" -m pytest -q tests -m cuda
memcheck memcheck benchmarks/gpu_smoke.py
memcheck sparse-memcheck benchmarks/gpu_sparse_check.py smoke
step benchmarks "$PY" -m vdit.bench.report --out "$OUT"
step attention-candidates "$PY" benchmarks/gpu_attention.py --out "$OUT"  # prints whether plan() chose the fastest
step sparse-timing "$PY" benchmarks/gpu_sparse_check.py timing --out "$OUT"  # each time beside the cost model's
step gpu-static "$PY" -m vdit.kernels.triton.static_check --out "$OUT"

echo
echo "| step | result |"
echo "|---|---|"
for name in "${STEPS[@]}"; do
    echo "| $name | ${RESULT[$name]:-not run} |"
done
echo "log: $LOG"
