"""Does a pruned chat model still answer? For each GGUF and each question: the probability that the
answer's first token ends the turn (the chat template's end-of-turn / EOS token), and the greedy
answer, both from llama.cpp with the GGUF's own chat template.

A pruned model whose repair dropped what only the template's tokens use ends every turn at once:
its answers are empty although its perplexity on plain text is fine (docs/quality-history.md, "Chat turns in the
repair's text").

    python tools/probe_chat.py --models dense=runs/demo/smollm2.f16.gguf pruned=runs/demo/x.gguf \
        --out tools/results/chat_probe_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lowmem_bonsai.chat import render  # noqa: E402
from lowmem_bonsai.llamacpp.runner import open_llama  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Who wrote Hamlet?", "Give me a tip for sleeping better.",
             "What is 2+2?", "Tell me about the moon.", "Name three colours.",
             "How do I boil an egg?", "Why is the sky blue?"]


def probe(gguf: Path, questions: list[str], n_tokens: int) -> list[dict]:
    rows = []
    with open_llama(gguf, n_ctx=512, logits_all=True, threads=1) as llm:
        template = llm.metadata.get("tokenizer.chat_template")
        if template is None:
            raise SystemExit(f"{gguf}: has no tokenizer.chat_template")
        eos = llm.token_eos()
        tc = {"eos_token": llm.detokenize([eos], special=True).decode(),
              "bos_token": llm.detokenize([llm.token_bos()], special=True).decode()}
        for q in questions:
            messages = [{"role": "user", "content": q}]
            prompt = render(template, messages, tc, add_generation_prompt=True)
            toks = llm.tokenize(prompt.encode(), add_bos=False, special=True)
            llm.reset()
            llm.eval(toks)
            logits = np.asarray(llm.scores[len(toks) - 1], dtype=np.float64)
            p = np.exp(logits - logits.max())
            p /= p.sum()
            out = llm.create_chat_completion(messages=messages, max_tokens=n_tokens, temperature=0.0)
            rows.append({"question": q, "p_end_first": float(p[eos]),
                         "answer": out["choices"][0]["message"]["content"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", required=True, help="NAME=FILE.gguf ...")
    ap.add_argument("--out", type=Path, required=True, help="JSON to write")
    ap.add_argument("-n", type=int, default=24, help="tokens per greedy answer")
    a = ap.parse_args()
    result = {}
    for spec in a.models:
        name, _, path = spec.partition("=")
        rows = probe(Path(path), QUESTIONS, a.n)
        empty = sum(not r["answer"].strip() for r in rows)
        result[name] = {"gguf": Path(path).name, "mean_p_end_first": float(np.mean([r["p_end_first"] for r in rows])),
                        "empty_answers": empty, "questions": rows}
        print(f"{name:24s} mean p(end of turn first) {result[name]['mean_p_end_first']:.3f}, "
              f"empty answers {empty} of {len(rows)}; {rows[0]['question']!r} -> {rows[0]['answer']!r}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
