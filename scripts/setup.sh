#!/usr/bin/env bash
# Set up a development environment in .venv: torch, triton, build and test dependencies, and vdit
# itself built with its C++ (and, when a CUDA toolkit is found, CUDA) kernels.
# Honours VDIT_BUILD_CUDA, TORCH_CUDA_ARCH_LIST and MAX_JOBS (see setup.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# (pip's notes about unused local package indexes are filtered out of the log)
.venv/bin/pip install -q "setuptools>=64" wheel ninja pybind11 torch triton numpy safetensors tqdm \
    pillow imageio imageio-ffmpeg matplotlib diffusers transformers peft pytest pytest-benchmark hypothesis ruff 2>&1 | { grep -v "^WARNING: Location" || true; }
mkdir -p build
echo "[setup] building vdit (log: build/pip-install.log)"
if ! .venv/bin/pip install -v --no-build-isolation -e . > build/pip-install.log 2>&1; then
    tail -n 60 build/pip-install.log
    exit 1
fi
# Show what was compiled: the setup decisions and one line per compiled source.
grep -E "\[vdit setup\]|csrc/([a-z_]+/)?[a-z_]+\.(cpp|cu) -o" build/pip-install.log \
    | sed -E 's@^ *(\[[0-9]+/[0-9]+\]) ([^ ]+/)?([^ /]+) .* -c ([^ ]+) .*@\1 \3 \4@' | sort -V -u
.venv/bin/python -c "import vdit; print('[setup] vdit.build_info():', vdit.build_info())"
