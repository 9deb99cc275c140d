"""Running a GGUF with llama.cpp (through llama-cpp-python): text generation and perplexity.

Perplexity follows the protocol of :mod:`lowmem_bonsai.data` exactly, with llama.cpp doing both
the tokenizing (the GGUF's own vocabulary, no BOS, special tokens in the text parsed as HF does)
and the forward pass, so its figure and ``lowmem-bonsai eval`` of the checkpoint compare directly.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import check_windows, read_text_part, read_tokens, windows
from ..errors import UserError
from ..evaluate import EvalResult, perplexity_of
from .check import GgufSummary, checked_gguf, trained_context

log = logging.getLogger(__name__)

LLAMA_SEED_LIMIT = 2**32 - 1  # llama.cpp's seeds are uint32; 0xFFFFFFFF asks it for a random one


@contextlib.contextmanager
def open_llama(gguf: Path, *, n_ctx: int, logits_all: bool = False, seed: int = 0,
               threads: int | None = None, checked: GgufSummary | None = None) -> Iterator[Any]:
    """A ``llama_cpp.Llama`` on ``gguf``, closed afterwards; load failures become UserErrors.
    ``checked``: :func:`checked_gguf`'s summary of it, where the caller has one already."""
    path = (checked or checked_gguf(gguf)).path
    try:
        import llama_cpp
    except ImportError:
        raise UserError("running a GGUF needs llama-cpp-python; pip install llama-cpp-python") from None
    # Default: half the CPUs (llama-cpp-python's choice for generation, here for prompts too).
    # llama.cpp's threads spin while they wait: on a busy machine, all cores can be 10x slower.
    n = threads or max(1, (os.cpu_count() or 2) // 2)
    try:
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                              logits_all=logits_all, seed=seed, n_threads=n, n_threads_batch=n,
                              verbose=log.isEnabledFor(logging.DEBUG))  # --debug: llama.cpp's log
    except ValueError as exc:  # llama-cpp-python's wording for every load failure
        raise UserError(f"{path}: llama.cpp could not load it ({exc}); run with --debug to see "
                        "llama.cpp's log, or re-export the model") from None
    try:
        yield llm
    finally:
        llm.close()


def generate(*, gguf: Path, prompt: str, n_tokens: int = 64, chat: bool = False, seed: int = 0,
             temperature: float = 0.0, threads: int | None = None) -> str:
    """Continue ``prompt`` (or answer it as a user turn of the GGUF's chat template).

    temperature 0 is greedy decoding; above it, sampling is seeded by ``seed``.
    """
    if n_tokens < 1:
        raise UserError(f"-n {n_tokens}: expected at least 1 token to generate")
    if not prompt:
        raise UserError("--prompt is empty; pass some text to continue (or, with --chat, to answer)")
    if not 0 <= seed < LLAMA_SEED_LIMIT:
        raise UserError(f"--seed {seed}: expected 0 to {LLAMA_SEED_LIMIT - 1} (llama.cpp seeds are "
                        "32-bit, and its largest value means 'random')")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise UserError(f"--temperature {temperature}: expected 0 (greedy) or a positive number")
    checked = checked_gguf(gguf)
    trained = trained_context(checked)
    if trained is not None and n_tokens >= trained:  # else llama.cpp fails to size the context
        raise UserError(f"-n {n_tokens}: {gguf} has a context of {trained} tokens (prompt and answer "
                        "together); ask for fewer")
    # UTF-8 bytes bound the prompt's tokens; 256 more for a chat template's wrapping.
    n_ctx = max(512, len(prompt.encode("utf-8")) + n_tokens + 256)
    with open_llama(gguf, n_ctx=n_ctx, seed=seed, threads=threads, checked=checked) as llm:
        if chat:
            if "tokenizer.chat_template" not in llm.metadata:
                raise UserError(f"{gguf}: has no tokenizer.chat_template; expected one for --chat; "
                                "export from a checkpoint whose tokenizer_config.json has a "
                                "chat_template, or drop --chat")
            out = llm.create_chat_completion(messages=[{"role": "user", "content": prompt}],
                                             max_tokens=n_tokens, temperature=temperature, seed=seed)
            return out["choices"][0]["message"]["content"] or ""
        out = llm.create_completion(prompt, max_tokens=n_tokens, temperature=temperature, seed=seed)
        return out["choices"][0]["text"]


def _window_nll(llm: Any, window: list[int]) -> float:
    """Sum of next-token NLL over the T-1 predicted positions of one window."""
    t = len(window)
    llm.reset()
    llm.eval(window)
    logits = np.asarray(llm.scores[:t], dtype=np.float64)  # (T, vocab)
    m = logits.max(1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(logits - m).sum(1))  # (T,)
    return float((lse[:-1] - logits[np.arange(t - 1), window[1:]]).sum())


def gguf_perplexity(*, gguf: Path, data: Path, seq_len: int = 512, max_seqs: int | None = None,
                    skip: int = 0, threads: int | None = None,
                    on_batch: Callable[[int, int], None] | None = None) -> EvalResult:
    """Perplexity of a GGUF under llama.cpp, protocol of :mod:`lowmem_bonsai.data`."""
    start = time.perf_counter()
    need = check_windows(seq_len=seq_len, max_seqs=max_seqs, skip=skip)
    read_text_part(data, max_bytes=1 << 16)  # a missing or binary file is refused before llama.cpp loads
    with open_llama(gguf, n_ctx=seq_len, logits_all=True, threads=threads) as llm:
        ids = read_tokens(lambda text: llm.tokenize(text.encode("utf-8"), add_bos=False, special=True),
                          data, max_tokens=need)
        seqs = windows(ids, seq_len=seq_len, max_seqs=max_seqs, skip=skip, source=str(data))
        per_window = []
        for i, window in enumerate(seqs.tolist()):
            per_window.append(_window_nll(llm, window))
            if on_batch is not None:
                on_batch(i + 1, seqs.shape[0])
        file_type = llm.metadata.get("general.file_type", "?")
    tokens = seqs.shape[0] * (seq_len - 1)
    total = sum(per_window)  # not math.fsum: it raises on inf + -inf, where this says NaN below
    if not math.isfinite(total):
        raise UserError(f"{gguf}: llama.cpp's perplexity is NaN or Inf: the model's weights hold NaN "
                        "or Inf or its computation overflows; re-export it from a checkpoint whose "
                        "eval is finite")
    ppl, mean = perplexity_of(torch.tensor(total, dtype=torch.float64), tokens)
    result = EvalResult(perplexity=ppl, nll=mean, tokens=tokens, seq_len=seq_len,
                        sequences=seqs.shape[0], skip=skip, seconds=time.perf_counter() - start,
                        model=str(gguf), data=str(data), dtype=f"gguf(file_type={file_type})",
                        window_nll=tuple(x / (seq_len - 1) for x in per_window))
    log.info("llama.cpp perplexity %.4f over %d tokens", result.perplexity, tokens)
    return result
