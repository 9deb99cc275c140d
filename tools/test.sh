#!/usr/bin/env bash
# Set up (tools/setup.sh) and run the test suite. Without a GPU, the GPU tests (tests/test_cuda.py)
# skip in the main run and then run once more with the CPU standing in for the GPU, so their code
# stays working until a GPU runs them (tools/check_cuda.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
.venv/bin/python -m pytest -q "$@"
if [ $# -eq 0 ] && ! .venv/bin/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    LOWMEM_BONSAI_TEST_DEVICE=cpu .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_cuda.py
fi
