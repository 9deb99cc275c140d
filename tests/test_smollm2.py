"""The real SmolLM2-135M: our streamed perplexity of the imported checkpoint against llama.cpp's."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

from lowmem_bonsai.data import load_tokenizer, tokenize_file, windows
from lowmem_bonsai.evaluate import evaluate

from .conftest import WIKITEXT

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python missing"),
]


def llama_cpp_perplexity(gguf_path, seqs) -> float:
    from llama_cpp import Llama

    t = seqs.shape[1]
    llm = Llama(model_path=str(gguf_path), n_ctx=t, n_batch=t, logits_all=True, verbose=False,
                n_threads=2)
    total, n = 0.0, 0
    for s in seqs.tolist():
        llm.reset()
        llm.eval(s)
        logits = np.asarray(llm.scores[:t], dtype=np.float64)  # (T, vocab)
        m = logits.max(1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(logits - m).sum(1))
        total += float((lse[:-1] - logits[np.arange(t - 1), s[1:]]).sum())
        n += t - 1
    return math.exp(total / n)


def test_imported_smollm2_perplexity_matches_llama_cpp(smollm2):
    gguf_path, model_dir = smollm2
    ours = evaluate(model_dir=model_dir, data=WIKITEXT, seq_len=128, max_seqs=8)
    seqs = windows(tokenize_file(load_tokenizer(model_dir), WIKITEXT), seq_len=128, max_seqs=8)
    ref = llama_cpp_perplexity(gguf_path, seqs)
    assert ours.tokens == 8 * 127
    assert 5 < ref < 100  # a real language model, not noise
    assert abs(ours.perplexity / ref - 1) < 0.03, (ours.perplexity, ref)
