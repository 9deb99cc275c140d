"""llama.cpp speed of dense and pruned models: file size, prompt and generation tokens/s.

Every model is exported at each type, then measured in one run on this machine, interleaved
(repeat r measures every file before repeat r+1 starts) so that load on the shared machine hits all
alike; medians are reported.

    python tools/bench_gguf_speed.py --models dense=runs/smollm2 b20=runs/bench_quality/bonsai-0.2 \
        b50=runs/bench_quality/bonsai-0.5 --types f16 q4_k_m --out runs/bench_gguf_speed
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lowmem_bonsai.llamacpp.to_gguf import export_gguf  # noqa: E402

PROMPT_TOKENS = 256
GEN_TOKENS = 64


def measure(path: Path, threads: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=PROMPT_TOKENS + GEN_TOKENS + 8, n_batch=PROMPT_TOKENS,
                n_threads=threads, n_threads_batch=threads, verbose=False, seed=0)
    prompt = [int(t) % llm.n_vocab() for t in range(1000, 1000 + PROMPT_TOKENS)]
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    prompt_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(GEN_TOKENS):
        tok = llm.sample(temp=0.0)
        llm.eval([tok])
    gen_s = time.perf_counter() - t0
    llm.close()
    return {"prompt_tok_s": PROMPT_TOKENS / prompt_s, "gen_tok_s": GEN_TOKENS / gen_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", required=True, help="label=checkpoint_dir")
    ap.add_argument("--types", nargs="+", default=["f16", "q4_k_m"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    files = {}
    for spec in a.models:
        label, model_dir = spec.split("=", 1)
        params = json.loads((Path(model_dir) / "report.json").read_text())["achieved_sparsity"] \
            if (Path(model_dir) / "report.json").is_file() else 0.0
        for t in a.types:
            path = a.out / f"{label}.{t}.gguf"
            if not path.is_file():
                export_gguf(model_dir=Path(model_dir), out=path, type=t, force=True)
            files[(label, t)] = (path, params)
    runs: dict[tuple[str, str], list[dict]] = {k: [] for k in files}
    for _ in range(a.repeats):
        for key, (path, _) in files.items():
            runs[key].append(measure(path, a.threads))
    rows = []
    for (label, t), (path, sparsity) in files.items():
        rows.append({
            "model": label, "type": t, "sparsity": sparsity, "file_mb": path.stat().st_size / 1e6,
            "prompt_tok_s": statistics.median(r["prompt_tok_s"] for r in runs[(label, t)]),
            "gen_tok_s": statistics.median(r["gen_tok_s"] for r in runs[(label, t)]),
            "threads": a.threads, "repeats": a.repeats,
        })
    for t in a.types:  # speed-ups against the dense model of the same type
        base = next((r for r in rows if r["type"] == t and r["sparsity"] == 0.0), None)
        for r in rows:
            if base and r["type"] == t:
                r["prompt_speedup"] = r["prompt_tok_s"] / base["prompt_tok_s"]
                r["gen_speedup"] = r["gen_tok_s"] / base["gen_tok_s"]
    (a.out / "results.json").write_text(json.dumps(rows, indent=2))
    print("| model | type | sparsity | file (MB) | prompt tok/s | gen tok/s | prompt x | gen x |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['type']} | {r['sparsity']:.2f} | {r['file_mb']:.0f} | "
              f"{r['prompt_tok_s']:.0f} | {r['gen_tok_s']:.1f} | {r.get('prompt_speedup', 1):.2f} | "
              f"{r.get('gen_speedup', 1):.2f} |")


if __name__ == "__main__":
    main()
