#!/usr/bin/env bash
# The GPU checks, as one prepared run for a machine with a CUDA GPU (a few minutes on one H200):
#   1. tests/test_cuda.py: the executor on the GPU against transformers and against itself on the
#      CPU (masks, prior statistics, teacher distribution), and a prune with the gpu-24gb profile;
#   2. tools/bench_throughput.py on a TinyLlama-1.1B-shaped random checkpoint in bf16, every way on
#      the GPU: this executor (streamed and from RAM) against the in-memory way, masks per second,
#      at two sizes of calibration per mask.
# Needs python3 with a CUDA torch, transformers, safetensors, tokenizers, typer, tqdm and pytest.
# Results (logs, JSON) land in $OUT when set, else runs/check_cuda.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/check_cuda}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; print(torch.__version__, torch.cuda.get_device_name())"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log"
python3 tools/make_checkpoint.py tinyllama-1.1b /tmp/tinyllama-random --force >/dev/null
# The CPU table's setting (8 masks x 2 x 128 tokens) and the default profile's (8 x 256 tokens per mask).
python3 tools/bench_throughput.py /tmp/tinyllama-random --device cuda --dtype bfloat16 --masks 8 \
    --seqs 2 --seq-len 128 --ways stream ram inmemory --out "$out/throughput_cuda_2x128.json" 2>&1 | tee "$out/bench_2x128.log"
python3 tools/bench_throughput.py /tmp/tinyllama-random --device cuda --dtype bfloat16 --masks 32 \
    --seqs 8 --seq-len 256 --ways stream ram inmemory --out "$out/throughput_cuda_8x256.json" 2>&1 | tee "$out/bench_8x256.log"
